"""Compile time of generate's first call, per batch and prompt length, with or without the C++ kernel.

For each BxT case: jax.clear_caches(), then generate_stream on B random T-token prompts
for 3 new tokens (the prefill, then decode steps), summing jax's backend_compile events.
  for k in 1 0; do MIXTRAL_JAX_CPU_KERNEL=$k PYTHONPATH=. python docs/cpu_probe/first_call.py CKPT_DIR 16x16,64x16,1x512; done
With the kernel (the default where it builds) every float32 MoE block is one custom call;
with MIXTRAL_JAX_CPU_KERNEL=0 they are XLA ops (masked experts up to 8 rows, grouped blocks beyond).
"""
import os, sys, time
import numpy as np, jax
import mixtral_jax as mj
from common import compile_seconds

ckpt, cases = sys.argv[1], sys.argv[2]
compile_s = compile_seconds()
model = mj.load(ckpt, dtype="float32")
rng = np.random.default_rng(0)
out = []
for case in cases.split(","):
    batch, length = (int(v) for v in case.split("x"))
    prompts = rng.integers(3, model.cfg.vocab_size, (batch, length)).tolist()
    jax.clear_caches()
    compile_s.clear()
    t0 = time.perf_counter()
    list(mj.generate_stream(model, prompts, 3, stop_tokens=[]))
    out.append(f"{case}: compile {sum(compile_s):.1f} s (first call {time.perf_counter() - t0:.1f} s)")
print(f"kernel={os.environ.get('MIXTRAL_JAX_CPU_KERNEL', '1')}: " + "; ".join(out), flush=True)
