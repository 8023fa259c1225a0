"""The kernel's MoE on N rows, whole or split into blocks of rows (one kernel call each), in one process.

  PYTHONPATH=. python docs/cpu_probe/moe_blocks.py N BLOCK,BLOCK,... [rounds]

4 layers of bench-model experts (D=1024, F=3584, 8 experts, top-2, random weights), float32.
Written before moe_cpu split long inputs itself (kPanelBlockRows = 1024): with that, every
block size above 1024 runs as 1024-row blocks inside the kernel.
"""
import sys, time, numpy as np, jax, jax.numpy as jnp
from mixtral_jax import cpu_kernel, moe
rng = np.random.default_rng(0); D, F, E, L = 1024, 3584, 8, 4
n = int(sys.argv[1]); blocks = [int(b) for b in sys.argv[2].split(",")]; rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
normal = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32) * 0.05)
layers = [{"router": normal(D, E) * 40 / np.sqrt(D), "experts": [{"w1": normal(F, D), "w3": normal(F, D), "w2": normal(D, F)} for _ in range(E)]} for _ in range(L)]
x = jnp.asarray(rng.standard_normal((n, D), np.float32))
def chain(block):
    def run(x, layers):
        for p in layers:
            ys = [moe.moe_kernel(x[s:s + block], p, 2) for s in range(0, n, block)]
            x = x + 0.1 * (ys[0] if len(ys) == 1 else jnp.concatenate(ys))
        return x
    return jax.jit(run)
fs = [chain(b) for b in blocks]
outs = [f(x, layers) for f in fs]
print("max diff vs first", [float(jnp.max(jnp.abs(o - outs[0]))) for o in outs])
ts = [[] for _ in fs]
for _ in range(rounds):
    for i, f in enumerate(fs):
        t = time.perf_counter(); f(x, layers).block_until_ready(); ts[i].append(time.perf_counter() - t)
flop = L * n * 2 * 3 * 2 * D * F
for b, t in zip(blocks, ts):
    print(f"n={n} block {b}: {np.median(t)*1e3:.1f} ms  {flop/np.median(t)/1e9:.0f} useful GFLOP/s")
