"""First-call compile time of generate_stream at batch 1/2/4/8, with the decode step's single-row
expert branch (`moe_per_expert_masked(..., single_row=True)`) on or off.

Each call is a new process's first prefill (16-token prompts) plus decode step for that batch,
summed from jax's backend_compile events.
  PYTHONPATH=. python docs/cpu_probe/decode_first_call.py CKPT_DIR on|off
With MIXTRAL_JAX_CPU_KERNEL=0 the decode steps run XLA ops; by default (where
the C++ kernel builds) decode steps of up to 8 rows run the kernel instead, and
on|off no longer matters for them.
"""
import sys
import numpy as np
import mixtral_jax as mj
from common import compile_seconds
from mixtral_jax import moe

ckpt, mode = sys.argv[1], sys.argv[2]
if mode == "off":
    masked = moe.moe_per_expert_masked
    moe.moe_per_expert_masked = lambda x, p, k, skip_unused=True, single_row=False: masked(x, p, k, skip_unused)
compile_s = compile_seconds()
model = mj.load(ckpt, dtype="float32")
rng = np.random.default_rng(0)
out = []
for batch in (1, 2, 4, 8):
    compile_s.clear()
    list(mj.generate_stream(model, rng.integers(3, model.cfg.vocab_size, (batch, 16)).tolist(), 3, stop_tokens=[]))
    out.append(f"batch {batch}: {sum(compile_s):.1f} s")
print(f"single_row {mode}: " + "; ".join(out), flush=True)
