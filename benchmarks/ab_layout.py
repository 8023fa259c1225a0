"""Decode (batch 1) and prefill (512 tokens) tok/s of the stacked and per_expert layouts, one process, alternating.

  python benchmarks/ab_layout.py CKPT_DIR   (a float32-loadable checkpoint, e.g. the bench model's)
"""
import sys, time
import numpy as np
import mixtral_jax as mj
ckpt = sys.argv[1]
models = {l: mj.load(ckpt, dtype="float32", layout=l) for l in ("per_expert", "stacked")}
rng = np.random.default_rng(0)
prompt16 = rng.integers(3, 32000, 16).tolist()
prompt512 = rng.integers(3, 32000, 512).tolist()
def decode(m, n=32):
    stamps = []
    for _ in mj.generate_stream(m, [prompt16], max_new_tokens=n, stop_tokens=[]):
        stamps.append(time.perf_counter())
    return (n - 1) / (stamps[-1] - stamps[0])
def prefill(m):
    t0 = time.perf_counter()
    for _ in mj.generate_stream(m, [prompt512], max_new_tokens=1, stop_tokens=[]):
        return 512 / (time.perf_counter() - t0)
for name, fn in (("decode b1", decode), ("prefill 512", prefill)):
    for m in models.values():
        fn(m)  # compile
    rates = {l: [] for l in models}
    for rep in range(4):
        for l in (list(models) if rep % 2 == 0 else list(models)[::-1]):
            rates[l].append(fn(models[l]))
    med = {l: float(np.median(r)) for l, r in rates.items()}
    print(f"{name}: per_expert {med['per_expert']:.1f} tok/s, stacked {med['stacked']:.1f} tok/s, "
          f"stacked/per_expert {med['stacked'] / med['per_expert']:.2f}", flush=True)
