"""The C++ MoE kernel with bfloat16 expert weights vs float32 ones, by token count.

  PYTHONPATH=. python docs/cpu_probe/bf16_experts.py [TOKENS]

On 8 layers of the bench model's experts (D 1024, F 3584, 8 experts, top-2; as
cpu_kernel_panel.py), each case chains the 8 MoE blocks in one jit and times,
alternating, 3 rounds of 5 calls (median call). The same weights: float32, and
rounded to bfloat16 (widened back to float32 in the kernel, so both compute in
float32). Row-dot products up to 16 rows, panels from 17 (the kernel's default).
Weight GB/s counts the chosen experts' bytes read once per call.
Default tokens 1,2,4,8,16,32,64,512.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from common import chain, median_of_rounds, moe_layers
from mixtral_jax import cpu_kernel, moe

TOKENS = [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else "1,2,4,8,16,32,64,512").split(",")]
D, F, E, L = 1024, 3584, 8, 8
assert cpu_kernel.available(), "the kernel did not build"
rng = np.random.default_rng(0)
bf16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16) if w.ndim == 2 and w.shape[1] != E else w,
                    moe_layers(rng, D, F, E, L))
for layer in bf16:
    layer["router"] = layer["router"].astype(jnp.float32)
f32 = jax.tree.map(lambda w: w.astype(jnp.float32), bf16)  # the same values, widened
run = chain(lambda x, p: moe.moe_kernel(x, p, 2))
fns = {"float32": lambda x: run(x, f32), "bfloat16": lambda x: run(x, bf16)}


def chosen_experts(x):
    """Experts some row chose, summed over the chained layers (as the chain computes them)."""
    total = 0
    for p in f32:
        _, e = moe.route(x, p["router"], 2)
        total += len(set(np.asarray(e).ravel().tolist()))
        x = x + 0.1 * moe.moe_kernel(x, p, 2)
    return total


print("tokens | float32 ms | bfloat16 ms | f32/bf16 | weight GB/s f32, bf16 | max |diff| / max |f32|")
for n in TOKENS:
    x = jnp.asarray(rng.standard_normal((n, D), np.float32))
    a, b = fns["float32"](x), fns["bfloat16"](x)
    diff = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    t = median_of_rounds(fns, (x,), calls=5)
    bytes32 = chosen_experts(x) * 3 * D * F * 4
    print(f"{n:6d} | {t['float32'] * 1e3:10.1f} | {t['bfloat16'] * 1e3:11.1f} | {t['float32'] / t['bfloat16']:8.2f} | "
          f"{bytes32 / t['float32'] / 1e9:5.1f}, {bytes32 / 2 / t['bfloat16'] / 1e9:5.1f} | {diff:.1e}", flush=True)
