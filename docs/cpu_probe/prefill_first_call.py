"""First-call time (mostly compile) of a short prompt's prefill: masked vs grouped MoE path.

Loads a converted checkpoint and times `generate(..., max_new_tokens=1)` on a T-token prompt
right after `jax.clear_caches()`, with moe.MASKED_MAX_ONE_SHOT = T (the prompt's MoE runs
masked) or T - 1 (grouped), alternating; then a second call (run time only).
The first row also pays the process's one-time warm-up.
  PYTHONPATH=. python docs/cpu_probe/prefill_first_call.py CKPT_DIR 16
"""
import sys, time
import numpy as np, jax
import mixtral_jax as mj
from mixtral_jax import moe

ckpt, t = sys.argv[1], int(sys.argv[2])
m = mj.load(ckpt, dtype="float32")
prompt = np.random.default_rng(0).integers(3, m.cfg.vocab_size, t).tolist()
for rep in range(3):
    for name, limit in (("grouped", t - 1), ("masked", t)):
        moe.MASKED_MAX_ONE_SHOT = limit
        jax.clear_caches()
        t0 = time.perf_counter(); mj.generate(m, [prompt], max_new_tokens=1); t1 = time.perf_counter()
        mj.generate(m, [prompt], max_new_tokens=1); t2 = time.perf_counter()
        print(f"{t}-token prompt, {name:7s}: first call {t1 - t0:.1f} s, second {t2 - t1:.2f} s", flush=True)
