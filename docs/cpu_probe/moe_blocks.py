"""The kernel's MoE on N rows, whole or split into blocks of rows (one kernel call each), in one process.

  PYTHONPATH=. python docs/cpu_probe/moe_blocks.py N BLOCK,BLOCK,... [rounds]

4 layers of bench-model experts (D=1024, F=3584, 8 experts, top-2, random weights), float32.
Written before moe_cpu split long inputs itself (kPanelBlockRows = 1024): with that, every
block size above 1024 runs as 1024-row blocks inside the kernel.
"""
import sys, time, numpy as np, jax, jax.numpy as jnp
from common import chain, moe_layers
from mixtral_jax import moe
rng = np.random.default_rng(0); D, F, E, L = 1024, 3584, 8, 4
n = int(sys.argv[1]); blocks = [int(b) for b in sys.argv[2].split(",")]; rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
layers = moe_layers(rng, D, F, E, L)
x = jnp.asarray(rng.standard_normal((n, D), np.float32))


def blocks_of(block):  # the MoE of each `block` rows as its own kernel call
    return lambda x, p: jnp.concatenate([moe.moe_kernel(x[s:s + block], p, 2) for s in range(0, n, block)])


fs = [chain(blocks_of(b)) for b in blocks]
outs = [f(x, layers) for f in fs]
print("max diff vs first", [float(jnp.max(jnp.abs(o - outs[0]))) for o in outs])
ts = [[] for _ in fs]
for _ in range(rounds):
    for i, f in enumerate(fs):
        t = time.perf_counter(); f(x, layers).block_until_ready(); ts[i].append(time.perf_counter() - t)
flop = L * n * 2 * 3 * 2 * D * F
for b, t in zip(blocks, ts):
    print(f"n={n} block {b}: {np.median(t)*1e3:.1f} ms  {flop/np.median(t)/1e9:.0f} useful GFLOP/s")
