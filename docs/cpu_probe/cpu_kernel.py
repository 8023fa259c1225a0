"""The C++ CPU MoE kernel against XLA ops, and its chunk size, on L layers of random experts.

  PYTHONPATH=. python docs/cpu_probe/cpu_kernel.py [D F E L] [TOKENS] [CHUNKS_KB]

Defaults: the bench model's experts (D 1024, F 3584, 8 experts, 8 layers),
tokens 1,2,4,8,16,32,64, chunks 16,64,256,512,1024,2048 KB (at one token).
Each case chains L MoE blocks in one jit (x += 0.1 * moe(x)), top-2, and times
the kernel (`moe.moe_kernel`) and XLA ops (`moe.moe` with the kernel off:
masked experts up to 8 tokens, grouped blocks beyond), alternating, 3 rounds
of 10 calls; the median call is reported. The two outputs are compared
(float32 sums in a different order, which can also flip a near-tie in a
later layer's routing).
"""
import sys

import jax.numpy as jnp
import numpy as np

from common import chain, median_of_rounds, moe_layers, xla_block
from mixtral_jax import cpu_kernel, moe

D, F, E, L = (int(a) for a in sys.argv[1:5]) if len(sys.argv) > 4 else (1024, 3584, 8, 8)
TOKENS = [int(t) for t in (sys.argv[5] if len(sys.argv) > 5 else "1,2,4,8,16,32,64").split(",")]
CHUNKS = [int(c) * 1024 for c in (sys.argv[6] if len(sys.argv) > 6 else "16,64,256,512,1024,2048").split(",")]
assert cpu_kernel.available(), "the kernel did not build"

rng = np.random.default_rng(0)
layers = moe_layers(rng, D, F, E, L)
print(f"D {D}, F {F}, {E} experts, {L} layers: {E * L * 3 * F * D * 4 / 1e9:.2f} GB of experts, "
      f"{2 * L * 3 * F * D * 4 / 1e6:.0f} MB read per token at top-2")


def timed(fns, x):
    return median_of_rounds(fns, (x, layers), calls=10)


kernel, xla = chain(lambda x, p: moe.moe_kernel(x, p, 2)), chain(xla_block)
print("\ntokens | kernel ms | XLA ops ms | XLA / kernel | max |diff| / max |XLA|")
for n in TOKENS:
    x = jnp.asarray(rng.standard_normal((n, D), np.float32))
    a, b = kernel(x, layers), xla(x, layers)
    diff = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    t = timed({"kernel": kernel, "xla": xla}, x)
    print(f"{n:6d} | {t['kernel'] * 1e3:9.2f} | {t['xla'] * 1e3:10.2f} | {t['xla'] / t['kernel']:12.2f} | {diff:.1e}")

print("\nchunk KB (one token) | kernel ms | GB/s of the chosen experts")
x = jnp.asarray(rng.standard_normal((1, D), np.float32))
fns = {c: chain(lambda x, p, c=c: moe.moe_kernel(x, p, 2, chunk_bytes=c)) for c in CHUNKS}
t = timed(fns, x)
for c in CHUNKS:
    print(f"{c // 1024:20d} | {t[c] * 1e3:9.2f} | {2 * L * 3 * F * D * 4 / t[c] / 1e9:.1f}")
