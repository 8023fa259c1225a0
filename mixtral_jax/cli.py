"""Flag parsing shared by the command-line programs (sample, serve, train)."""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing (pass as `app.run(main, flags_parser=parse_flags)`), with --help exiting 0 and a
    bad flag as one sentence with exit status 2."""
    argv = [a if a != "-h" else "--help" for a in argv]
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}; see --help.", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        # absl's --help/--helpshort/--helpfull print the usage, then exit with status 1.
        if e.code == 1 and any(a.lstrip("-").split("=")[0] in ("help", "helpshort", "helpfull", "?")
                               for a in argv[1:] if a.startswith("-")):
            sys.exit(0)
        raise
