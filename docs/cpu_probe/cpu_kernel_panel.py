"""The C++ MoE kernel's two paths against each other and against XLA ops, by token count.

  PYTHONPATH=. python docs/cpu_probe/cpu_kernel_panel.py [TOKENS]

On 8 layers of the bench model's experts (D 1024, F 3584, 8 experts, top-2; as
cpu_kernel.py), each case chains the 8 MoE blocks in one jit (x += 0.1 * moe(x))
and times, alternating, 3 rounds of 5 calls (median call):
  rowdot  moe_cpu with panel_min_rows huge: row-dot products (the decode path)
  panel   moe_cpu with panel_min_rows 1: register tiles over packed panels
  xla     moe.moe with the kernel off: masked experts up to 8 tokens, grouped blocks beyond
Useful GFLOP/s counts top-2's 2 * 3 * D * F per token and layer, no padding.
Default tokens 8,16,24,32,64,128,512.
"""
import sys

import jax.numpy as jnp
import numpy as np

from common import chain, median_of_rounds, moe_layers, xla_block
from mixtral_jax import cpu_kernel, moe

TOKENS = [int(t) for t in (sys.argv[1] if len(sys.argv) > 1 else "8,16,24,32,64,128,512").split(",")]
D, F, E, L = 1024, 3584, 8, 8
assert cpu_kernel.available(), "the kernel did not build"
rng = np.random.default_rng(0)
layers = moe_layers(rng, D, F, E, L)


def kernel(panel_min_rows):
    return chain(lambda x, p: moe.moe_kernel(x, p, 2, panel_min_rows=panel_min_rows))


fns = {"rowdot": kernel(1 << 30), "panel": kernel(1), "xla": chain(xla_block)}
print("tokens | rowdot ms | panel ms | XLA ops ms | useful GFLOP/s of the fastest | max |diff| / max |XLA|")
for n in TOKENS:
    x = jnp.asarray(rng.standard_normal((n, D), np.float32))
    outs = {name: fn(x, layers) for name, fn in fns.items()}
    diff = max(float(jnp.max(jnp.abs(outs[k] - outs["xla"])) / jnp.max(jnp.abs(outs["xla"]))) for k in ("rowdot", "panel"))
    t = median_of_rounds(fns, (x, layers), calls=5)
    best = min(t, key=t.get)
    print(f"{n:6d} | {t['rowdot'] * 1e3:9.1f} | {t['panel'] * 1e3:8.1f} | {t['xla'] * 1e3:10.1f} | "
          f"{L * n * 2 * 3 * 2 * D * F / t[best] / 1e9:5.0f} ({best}) | {diff:.1e}", flush=True)
