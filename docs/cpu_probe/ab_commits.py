"""Decode tok/s of two versions of mixtral_jax in ONE process, alternating, on the same checkpoint.

This host's speed drifts by 15-40% between runs, so comparing two bench runs hides
changes of a few percent. This loads an older commit's package (via `git archive`,
renamed to mixtral_jax_old) next to the working tree's, checks both give the same
greedy tokens, and alternates them (4 timed runs each per batch size).

  PYTHONPATH=. python docs/cpu_probe/ab_commits.py OLD_COMMIT CKPT_DIR 1:48,4:48,16:16,64:8,p512

CKPT_DIR: a converted checkpoint, e.g. `python -m mixtral_jax.bench --workdir W` leaves
one in W/converted. Each batch:new_tokens pair is one row of decode tok/s; pT is a
batch-1 prefill of a T-token prompt (tok/s from the time to the first token).
"""
import os, re, subprocess, sys, tempfile, time
import numpy as np

old_commit, ckpt, cases = sys.argv[1], sys.argv[2], sys.argv[3]
root = subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip()
tmp = tempfile.mkdtemp()
subprocess.run(f"git -C {root} archive {old_commit} mixtral_jax | tar -x -C {tmp}", shell=True, check=True)
os.rename(f"{tmp}/mixtral_jax", f"{tmp}/mixtral_jax_old")
for dirpath, _, files in os.walk(f"{tmp}/mixtral_jax_old"):
    for f in files:
        if f.endswith(".py"):
            path = os.path.join(dirpath, f)
            text = open(path).read()
            # Also the FFI target names (mixtral_jax_moe_cpu_<key>): with an unchanged kernel
            # source both versions would register the same name twice.
            open(path, "w").write(re.sub(r"\bmixtral_jax(?=\b|_moe_cpu|_linear_cpu)", "mixtral_jax_old", text))
sys.path[:0] = [tmp, root]
import mixtral_jax as new, mixtral_jax_old as old  # noqa: E402

libs = {"old": old, "new": new}
models = {k: lib.load(ckpt, dtype="float32") for k, lib in libs.items()}
rng = np.random.default_rng(0)


def prefill(k, prompt):
    t0 = time.perf_counter()
    for t in libs[k].generate_stream(models[k], [prompt], max_new_tokens=1, stop_tokens=[]):
        return len(prompt) / (time.perf_counter() - t0), t


def run(k, prompts, n):
    stamps, steps = [], []
    for t in libs[k].generate_stream(models[k], prompts, max_new_tokens=n, stop_tokens=[]):
        stamps.append(time.perf_counter()); steps.append(t)
    return len(prompts) * (n - 1) / (stamps[-1] - stamps[0]), np.stack(steps, 1)


print(f"old = {old_commit}, new = working tree, checkpoint {ckpt}", flush=True)
for case in cases.split(","):
    if case.startswith("p"):
        prompt = rng.integers(3, models["new"].cfg.vocab_size, int(case[1:])).tolist()
        first = {k: prefill(k, prompt)[1] for k in libs}
        assert (first["old"] == first["new"]).all(), "prefill: the two versions' first tokens differ"
        rates = {k: [] for k in libs}
        for rep in range(6):
            for k in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                rates[k].append(prefill(k, prompt)[0])
        mo, mn = np.median(rates["old"]), np.median(rates["new"])
        print(f"prefill {len(prompt)}: old {mo:6.1f} tok/s  new {mn:6.1f} tok/s  new/old {mn / mo:.3f}  "
              f"(old {[round(r, 1) for r in rates['old']]}, new {[round(r, 1) for r in rates['new']]})", flush=True)
        continue
    b, n = map(int, case.split(":"))
    prompts = rng.integers(3, models["new"].cfg.vocab_size, (b, 16)).tolist()
    toks = {k: run(k, prompts, n)[1] for k in libs}  # warm-up: compiles
    assert (toks["old"] == toks["new"]).all(), f"batch {b}: the two versions' greedy tokens differ"
    rates = {k: [] for k in libs}
    for rep in range(4):
        for k in (("old", "new") if rep % 2 == 0 else ("new", "old")):
            rates[k].append(run(k, prompts, n)[0])
    mo, mn = np.median(rates["old"]), np.median(rates["new"])
    print(f"batch {b:3d}: old {mo:6.1f} tok/s  new {mn:6.1f} tok/s  new/old {mn / mo:.3f}  "
          f"(old {[round(r, 1) for r in rates['old']]}, new {[round(r, 1) for r in rates['new']]})", flush=True)
