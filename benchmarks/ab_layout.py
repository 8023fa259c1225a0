"""Decode (batch 1) and prefill (512 tokens) tok/s of the stacked and per_expert layouts, one process, alternating.

  python benchmarks/ab_layout.py CKPT_DIR   (a float32-loadable checkpoint, e.g. the bench model's)
"""
import sys

import _alternate
import mixtral_jax as mj
ckpt = sys.argv[1]
models = {l: mj.load(ckpt, dtype="float32", layout=l) for l in ("per_expert", "stacked")}
for name, med in _alternate.medians(models, 4).items():
    print(f"{name}: per_expert {med['per_expert']:.1f} tok/s, stacked {med['stacked']:.1f} tok/s, "
          f"stacked/per_expert {med['stacked'] / med['per_expert']:.2f}", flush=True)
