"""Micro: FFI moe_mv kernel vs XLA dot on a separate buffer, per expert matrix,
stacked array of G=24 matrices (352 MB > L3), M rows sharing one expert."""
import numpy as np, jax, jax.numpy as jnp
from common import RefMatvec, bench_interleaved
from ffi_moe import moe_mv
D, F, G = 1024, 3584, 24
rng = np.random.default_rng(0)
W = jnp.asarray(rng.standard_normal((G, D, F), dtype=np.float32))
Wl = [jnp.asarray(np.asarray(W[g])) for g in range(G)]
ref = RefMatvec(); mb = D * F * 4
for M in (1, 2, 4, 8, 16):
    x = jnp.asarray(rng.standard_normal((M, D), dtype=np.float32))
    def ffi_all(x, W):
        return [moe_mv(x, W, jnp.full((M,), g, jnp.int32)) for g in range(G)]
    def xla_all(x, Wl):
        return [x @ w for w in Wl]
    yf = jax.jit(ffi_all)(x, W); yx = jax.jit(xla_all)(x, Wl)
    err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(yf, yx))
    for name, f, arg in (('ffi moe_mv (stacked, in place)', jax.jit(ffi_all), W), ('xla x@W (separate buffers)', jax.jit(xla_all), Wl)):
        med, rbw, _ = bench_interleaved(f, (x, arg), ref, reps=9)
        t = med / G
        print(f"M={M:2d} {name:32s} {t*1e3:7.3f} ms/matrix  {mb/t/1e9:6.1f} GB/s  ref {rbw:5.1f} GB/s  frac {mb/t/1e9/rbw:4.2f}  maxabs diff {err:.1e}", flush=True)
