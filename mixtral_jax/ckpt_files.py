"""A checkpoint directory on disk: what makes one ours, its digests, and replacing one safely.

Every checkpoint that `convert` or `save` writes ends with `digests.json`: the
size and xxh3-128 digest of every other file in it. `verify` checks them, so a
flipped byte, a truncated or missing file, or an edited config.json is found
before any of it is loaded (xxh3 hashes at ~27 GB/s on one core here, so the
cost is reading the files; see docs/performance.md#checkpoint-digests).

A checkpoint is built in a staging directory beside its destination
(`OUT.tmp-XXXX`, marked as ours with the writer's host and pid) and swapped in
only when complete: an existing checkpoint is first renamed aside
(`OUT.old-XXXX`), then removed. Nothing else is ever deleted: `--overwrite`
replaces only a directory that holds one of our checkpoints, and a staging or
set-aside directory is removed only when its marker names a writer that is no
longer running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator

import xxhash
from absl import logging

DIGESTS_FILE = "digests.json"
CONFIG_FILE = "config.json"
_ORBAX_FILES = ("_METADATA", "_CHECKPOINT_METADATA")  # what Orbax's StandardCheckpointer always writes
_MARKER = ".mixtral_jax_staging"  # inside a staging / set-aside directory: {"host", "pid"}
_STAGING, _ASIDE = ".tmp-", ".old-"
_READ_BLOCK = 2**20
_PROGRESS_EVERY_S = 5.0


class CheckpointError(ValueError):
    """A checkpoint directory is missing, damaged, or does not match its config (one sentence)."""


def is_checkpoint(path: str) -> bool:
    """Whether `path` holds a checkpoint written by convert or save (digests, or config + Orbax metadata)."""
    has = lambda name: os.path.isfile(os.path.join(path, name))
    return has(DIGESTS_FILE) or (has(CONFIG_FILE) and all(has(f) for f in _ORBAX_FILES))


def _files(root: str) -> list[str]:
    """Every file under `root` but the digests, as sorted relative paths."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != DIGESTS_FILE:
                out.append(rel)
    return sorted(out)


def _digest(path: str, progress: Callable[[int], None] | None = None) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(_READ_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress:
                progress(n)
    return h.hexdigest()


class _Progress:
    """Bytes done of a total, logged every few seconds with the rate (and an ETA)."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self.start = self.last = time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            logging.info("%s: %.2f / %.2f GB (%.2f GB/s, %.0f s left)", self.what, self.done / 1e9,
                         self.total / 1e9, rate / 1e9, (self.total - self.done) / max(rate, 1.0))


def write_digests(root: str) -> None:
    """Writes `digests.json` for every file now in the checkpoint directory `root` (call it last)."""
    files = _files(root)
    entries = {rel: {"bytes": os.path.getsize(os.path.join(root, rel)),
                     "xxh3_128": _digest(os.path.join(root, rel))} for rel in files}
    with open(os.path.join(root, DIGESTS_FILE), "w") as f:
        json.dump({"format": 1, "files": entries, "self": _self_digest(entries)}, f, indent=1)
        f.write("\n")


def _self_digest(entries: dict) -> str:
    """A digest of the listing itself, so damage to digests.json is named as such."""
    return xxhash.xxh3_128(json.dumps(entries, sort_keys=True).encode()).hexdigest()


def verify(root: str, process_index: int = 0, process_count: int = 1) -> None:
    """Checks every file listed in `root/digests.json`: present, the right size, the right digest.

    With several processes each checks its share of the files (every
    `process_count`-th by size); the caller combines their verdicts.

    Raises:
      CheckpointError naming the first bad file.
    """
    digests_path = os.path.join(root, DIGESTS_FILE)
    if not os.path.isfile(digests_path):
        raise CheckpointError(
            f"checkpoint {root} has no {DIGESTS_FILE}, so its files cannot be verified (an unfinished write, or "
            "a checkpoint from an older mixtral_jax); convert it again, or load it unverified with verify=False.")
    try:
        with open(digests_path) as f:
            listing = json.load(f)
        if listing["self"] != _self_digest(listing["files"]):
            raise ValueError("its own digest does not match")
        entries = {rel: (int(e["bytes"]), str(e["xxh3_128"])) for rel, e in listing["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{digests_path} is damaged ({e}); convert or save the checkpoint again.") from None
    for rel, (size, _) in entries.items():  # cheap checks everywhere first: missing or wrong-sized files
        path = os.path.join(root, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete, "
                                  "convert or save it again.")
        have = os.path.getsize(path)
        if have != size:
            raise CheckpointError(f"checkpoint file {path} has {have} bytes but was written with {size}; it is "
                                  f"{'truncated' if have < size else 'damaged'}, convert or save the checkpoint again.")
    mine = sorted(entries, key=lambda rel: (-entries[rel][0], rel))[process_index::process_count]
    progress = _Progress(f"verifying {root}", sum(entries[rel][0] for rel in mine))
    for rel in mine:
        path = os.path.join(root, rel)
        if _digest(path, progress) != entries[rel][1]:
            raise CheckpointError(f"checkpoint file {path} does not match its digest: its contents changed "
                                  "after it was written (disk or copy damage); convert or save the checkpoint again.")


# ---------------------------------------------------------------------------------------------
# Building a checkpoint beside its destination and swapping it in.

def check_destination(out: str, overwrite: bool, protect: tuple[str, ...] = ()) -> None:
    """Refuses, in one sentence, an `out` whose replacement could destroy data.

    Args:
      out: absolute destination path.
      overwrite: whether an existing checkpoint at `out` may be replaced.
      protect: directories (the conversion's input) that `out` may not equal, contain, or lie inside.
    """
    real = os.path.realpath(out)
    for src in protect:
        src_real = os.path.realpath(src)
        if real == src_real or src_real.startswith(real + os.sep) or real.startswith(src_real + os.sep):
            relation = ("is" if real == src_real else "contains" if src_real.startswith(real + os.sep)
                        else "is inside")
            raise ValueError(f"--out {out} {relation} the input directory {src}; choose an output directory "
                             "outside the input (nothing was written or deleted).")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out} exists and is not a directory; choose another --out.")
    if os.path.isdir(out) and os.listdir(out):
        if not is_checkpoint(out):
            raise FileExistsError(f"{out} is not empty and is not a mixtral_jax checkpoint; --overwrite only "
                                  "replaces checkpoints, so choose a new or empty --out (nothing was deleted).")
        if not overwrite:
            raise FileExistsError(f"{out} already holds a checkpoint; pass --overwrite to replace it.")


def _writer_alive(marker: dict) -> bool:
    if marker.get("host") != socket.gethostname():
        return True  # cannot tell: leave it
    try:
        os.kill(int(marker["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, TypeError, ValueError):
        return True
    return True


def clean_stale(out: str) -> None:
    """Removes the staging and set-aside directories of earlier writes to `out` whose writer is gone.

    Only directories named `OUT.tmp-*` / `OUT.old-*` that hold our marker are
    touched; one whose writer still runs (or runs on another host) is reported.
    """
    parent, base = os.path.split(out)
    if not os.path.isdir(parent):
        return
    for name in sorted(os.listdir(parent)):
        if not (name.startswith(base + _STAGING) or name.startswith(base + _ASIDE)):
            continue
        path = os.path.join(parent, name)
        try:
            with open(os.path.join(path, _MARKER)) as f:
                marker = json.load(f)
        except (OSError, ValueError):
            continue  # not ours
        if _writer_alive(marker):
            logging.warning("%s belongs to a write by process %s on %s that may still be running; left alone.",
                            path, marker.get("pid"), marker.get("host"))
            continue
        kind = "staging directory of an interrupted write" if _STAGING in name else "old checkpoint set aside"
        logging.warning("removing %s (%s to %s)", path, kind, out)
        shutil.rmtree(path)


def mark_ours(path: str) -> None:
    """Marks the new directory `path` as a staging directory of this process (see `clean_stale`)."""
    with open(os.path.join(path, _MARKER), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)


def _marked_dir(parent: str, prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    mark_ours(path)
    return path


@contextlib.contextmanager
def staged(out: str) -> Iterator[str]:
    """Yields a fresh directory to build the checkpoint for `out` in; on success swaps it in.

    The new checkpoint is complete (digests written) before the old one at
    `out`, if any, is renamed aside and then removed. On any error the staging
    directory is removed and `out` is untouched. Call `check_destination` first.
    """
    parent, base = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    clean_stale(out)
    staging = _marked_dir(parent, base + _STAGING)
    built = os.path.join(staging, "checkpoint")
    try:
        yield built
        write_digests(built)
        aside = None
        if os.path.isdir(out):
            aside = _marked_dir(parent, base + _ASIDE)
            os.rename(out, os.path.join(aside, "checkpoint"))
        os.rename(built, out)
        if aside:
            shutil.rmtree(aside)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
