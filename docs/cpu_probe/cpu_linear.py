"""One row times [out, in] weights: the C++ kernel (`cpu_kernel.linear_cpu`) vs XLA (`layers.linear_t`).

  PYTHONPATH=. python docs/cpu_probe/cpu_linear.py 1,4,8

The bench model's decode products: 8 layers of wqkv [1536, 1024] and wo [1024, 1024], then the
lm_head [32000, 1024], chained in one jit; 5 rounds of 10 calls, alternating, median round.
"""
import sys, time, numpy as np, jax, jax.numpy as jnp
from mixtral_jax import cpu_kernel, layers
assert cpu_kernel.available()
rng = np.random.default_rng(0)
L = 8
ws = [(jnp.asarray(rng.standard_normal((1536, 1024), np.float32) * .03), jnp.asarray(rng.standard_normal((1024, 1024), np.float32) * .03)) for _ in range(L)]
head = jnp.asarray(rng.standard_normal((32000, 1024), np.float32) * .03)
def chain(lin):
    def f(x, ws, head):
        for a, b in ws:
            x = x + lin(lin(x, a)[:, :1024], b)
        return lin(x, head)
    return jax.jit(f)
xla_linear = lambda x, w: jax.lax.optimization_barrier(jnp.einsum("OI,IN->ON", w, x.T)).T  # linear_t, XLA branch
k, xla = chain(cpu_kernel.linear_cpu), chain(xla_linear)
for n in [int(v) for v in sys.argv[1].split(",")]:
    x = jnp.asarray(rng.standard_normal((n, 1024), np.float32))
    a, b = k(x, ws, head), xla(x, ws, head)
    print(n, "rel diff", float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))))
    t = {"k": [], "x": []}
    for _ in range(5):
        for name, f in (("k", k), ("x", xla)):
            f(x, ws, head).block_until_ready(); t0 = time.perf_counter()
            for _ in range(10): f(x, ws, head).block_until_ready()
            t[name].append((time.perf_counter() - t0) / 10)
    mk, mx = sorted(t["k"])[2], sorted(t["x"])[2]
    print(f"rows {n}: kernel {mk*1e3:.2f} ms, XLA {mx*1e3:.2f} ms, XLA/kernel {mx/mk:.2f}  ({(8*(1536+1024)*1024+32000*1024)*4/mk/1e9:.1f} GB/s kernel)")
