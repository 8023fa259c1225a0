"""lm_head-sized products (4 x 131 MB) at N tokens: [in, out] weights (x @ W, what the
per_expert layout stores for lm_head and attention) vs [out, in] weights, token-major and
feature-major (W @ xT behind an optimization barrier).
  python docs/cpu_probe/lm_head_layout.py 1,4,16,64
"""
import time, numpy as np, jax, jax.numpy as jnp, sys
D, V = 1024, 32000
rng = np.random.default_rng(0)
Ws = [jnp.asarray(rng.standard_normal((D, V), np.float32)) for _ in range(4)]     # 4 x 131 MB in x out
Wt = [jnp.asarray(np.asarray(w).T.copy()) for w in Ws]                           # out x in
bar = jax.lax.optimization_barrier
for B in [int(b) for b in sys.argv[1].split(",")]:
    x = jnp.asarray(rng.standard_normal((B, D), np.float32))
    fs = {"x@W": jax.jit(lambda x, Ws, Wt: [x @ W for W in Ws]),
          "(W^T x^T)^T in-x-out": jax.jit(lambda x, Ws, Wt: [bar(jnp.einsum("DN,BD->NB", W, x)).T for W in Ws]),
          "Wt x^T out-x-in": jax.jit(lambda x, Ws, Wt: [bar(jnp.einsum("ND,BD->NB", W, x)).T for W in Wt]),
          "x Wt^T out-x-in": jax.jit(lambda x, Ws, Wt: [jnp.einsum("BD,ND->BN", x, W) for W in Wt])}
    r0 = fs["x@W"](x, Ws, Wt)
    for n, f in fs.items():
        assert max(float(jnp.abs(a - b).max()) for a, b in zip(r0, f(x, Ws, Wt))) < 1e-2, n
    ts = {n: [] for n in fs}
    for rep in range(8):
        for n, f in fs.items():
            t0 = time.perf_counter(); jax.block_until_ready(f(x, Ws, Wt)); ts[n].append(time.perf_counter() - t0)
    gb = 4 * D * V * 4 / 1e9
    print(B, "  ".join(f"{n} {gb/np.median(t):.1f} GB/s" for n, t in ts.items()), flush=True)
