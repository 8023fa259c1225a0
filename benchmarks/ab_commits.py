"""Decode and prefill tok/s of an older commit against the working tree, in ONE process, alternating.

This host's speed drifts 15-40% between runs, so two bench runs hide a change
of a few percent. This script loads an older commit's package (`git archive`,
renamed mixtral_jax_old) next to the working tree's, checks that both produce
the same greedy tokens, then alternates them (the side that goes first swaps
every round) and prints the medians and new/old.

  python benchmarks/ab_commits.py OLD_COMMIT CKPT_DIR 1:48,4:48,16:16,64:8,p512

CKPT_DIR: a converted checkpoint (`python -m mixtral_jax.bench --workdir W`
leaves the bench model's in W/converted). CASES: `B:N` is decode at batch B
with N new tokens (16-token prompts); `pT` is a batch-1 prefill of a T-token
prompt (tok/s from the time to the first token). Uses the public API only.
"""

import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROUNDS = {"decode": 4, "prefill": 6}


def usage(message: str) -> None:
    print(f"error: {message}\nusage: python benchmarks/ab_commits.py OLD_COMMIT CKPT_DIR CASES "
          "(e.g. 1:48,4:48,p512)", file=sys.stderr)
    sys.exit(2)


def parse_cases(text: str) -> list[tuple[str, int, int]]:
    """"1:48,p512" -> [("decode", 1, 48), ("prefill", 1, 512)]."""
    cases = []
    for case in text.split(","):
        if re.fullmatch(r"p\d+", case):
            cases.append(("prefill", 1, int(case[1:])))
        elif re.fullmatch(r"\d+:\d+", case) and int(case.split(":")[1]) >= 2:
            cases.append(("decode", *map(int, case.split(":"))))
        else:
            usage(f"{case!r} is neither B:N (decode, N >= 2) nor pT (prefill)")
    return cases


def import_old(root: str, commit: str):
    """The package at `commit`, importable as mixtral_jax_old."""
    tmp = tempfile.mkdtemp()
    archive = subprocess.run(f"git -C {root} archive {commit} mixtral_jax | tar -x -C {tmp}", shell=True,
                             capture_output=True, text=True)
    if archive.returncode != 0:
        usage(f"git archive {commit} failed: {archive.stderr.strip()}")
    os.rename(f"{tmp}/mixtral_jax", f"{tmp}/mixtral_jax_old")
    for dirpath, _, files in os.walk(f"{tmp}/mixtral_jax_old"):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    text = f.read()
                # The FFI target names too (mixtral_jax_moe_cpu_<key>): with an unchanged kernel
                # source both versions would register the same name twice.
                with open(path, "w") as f:
                    f.write(re.sub(r"\bmixtral_jax(?=\b|_moe_cpu|_linear_cpu)", "mixtral_jax_old", text))
    sys.path.insert(0, tmp)
    import mixtral_jax_old

    return mixtral_jax_old


def timed(lib, model, prompts, n):
    """(tok/s, new tokens [B, n]): prefill (n == 1) from the time to the first token, decode from first to last."""
    t0 = time.perf_counter()
    stamps, steps = [], []
    for step in lib.generate_stream(model, prompts, max_new_tokens=n, stop_tokens=[]):
        stamps.append(time.perf_counter())
        steps.append(step)
    if n == 1:
        return len(prompts[0]) / (stamps[0] - t0), np.stack(steps, 1)
    return len(prompts) * (n - 1) / (stamps[-1] - stamps[0]), np.stack(steps, 1)


def main(argv):
    if len(argv) != 4:
        usage("three arguments needed")
    old_commit, ckpt, cases = argv[1], argv[2], parse_cases(argv[3])
    if not os.path.isdir(ckpt):
        usage(f"{ckpt} is not a directory; convert a checkpoint first")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout
    sys.path.insert(0, root)
    import mixtral_jax as new

    libs = {"old": import_old(root, old_commit), "new": new}
    models = {k: lib.load(ckpt, dtype="float32") for k, lib in libs.items()}
    vocab = models["new"].cfg.vocab_size
    rng = np.random.default_rng(0)
    print(f"old = {old_commit}, new = working tree, checkpoint {ckpt}", flush=True)
    for kind, batch, size in cases:
        prompt_len, n = (size, 1) if kind == "prefill" else (16, size)
        prompts = rng.integers(3, vocab, (batch, prompt_len)).tolist()
        tokens = {k: timed(libs[k], models[k], prompts, n)[1] for k in libs}  # warm-up: compiles
        if not (tokens["old"] == tokens["new"]).all():
            print(f"error: {kind} {batch}x{size}: the two versions' greedy tokens differ", file=sys.stderr)
            sys.exit(1)
        rates = {k: [] for k in libs}
        for rnd in range(ROUNDS[kind]):
            for k in ("old", "new") if rnd % 2 == 0 else ("new", "old"):
                rates[k].append(timed(libs[k], models[k], prompts, n)[0])
        mo, mn = np.median(rates["old"]), np.median(rates["new"])
        label = f"prefill {prompt_len}" if kind == "prefill" else f"batch {batch:3d}"
        print(f"{label}: old {mo:6.1f} tok/s  new {mn:6.1f} tok/s  new/old {mn / mo:.3f}  "
              f"(old {[round(r, 1) for r in rates['old']]}, new {[round(r, 1) for r in rates['new']]})", flush=True)


if __name__ == "__main__":
    main(sys.argv)
