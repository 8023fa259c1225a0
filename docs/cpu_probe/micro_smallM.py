"""Small-M product x[M,1024] @ W (one expert matrix, 14.7 MB, separate buffer) on XLA:CPU:
layout [D,F] ("in x out", x @ W) vs [F,D] ("out x in", torch layout) vs M separate
row matvecs (the W re-reads come from the 260 MB L3).  Cycles through NS
matrices (> L3) so the first read of each is from DRAM.  Reports ms per
matrix and GB/s of weight bytes (each matrix counted once)."""
import os
import numpy as np
import jax, jax.numpy as jnp
from jax import lax
from common import bench, RefMatvec, bench_interleaved

D, F = 1024, 3584
NS = 24   # 24 x 14.7 MB = 352 MB > L3
rng = np.random.default_rng(0)
Ws = [jnp.asarray(rng.standard_normal((D, F), dtype=np.float32)) for _ in range(NS)]
Wts = [jnp.asarray(np.asarray(W).T.copy()) for W in Ws]
ref = RefMatvec()
mb = D * F * 4

def chain(mv):
    # apply the same product to all NS matrices inside one jit (sequential dependency)
    def f(x, Ws):
        acc = jnp.zeros((x.shape[0], F), jnp.float32)
        for W in Ws:
            y = mv(x, W)
            acc = acc + y
            x = x + 1e-3 * y[:, :D]          # dependency so the products run in order
        return acc
    return f

forms = {
    'x @ W   (W [D,F], in x out)':       (lambda x, W: x @ W, 'in'),
    'x . Wt  (Wt [F,D], out x in)':      (lambda x, W: jnp.einsum('bd,fd->bf', x, W), 'out'),
    'Wt @ x.T -> .T (out x in)':         (lambda x, W: (W @ x.T).T, 'out'),
    'row loop: M matvecs x[i]@W':        (lambda x, W: jnp.concatenate([x[i:i+1] @ W for i in range(x.shape[0])], 0), 'in'),
    'row loop: M matvecs, out x in':     (lambda x, W: jnp.concatenate([jnp.einsum('bd,fd->bf', x[i:i+1], W) for i in range(x.shape[0])], 0), 'out'),
}
print("XLA_FLAGS=", os.environ.get('XLA_FLAGS', ''))
print(f"{'form':34s} {'M':>3s} {'ms/matrix':>9s} {'GB/s':>6s} {'GFLOP/s':>7s} {'refGB/s':>7s} {'frac':>5s}")
for M in [int(m) for m in os.environ.get('MS', '1,2,4,8,16,32').split(',')]:
    x = jnp.asarray(rng.standard_normal((M, D), dtype=np.float32))
    for name, (mv, lay) in forms.items():
        if name.startswith('row loop') and (M > 16 or os.environ.get('NOROW')): continue
        c = jax.jit(chain(mv)).lower(x, Ws if lay == 'in' else Wts).compile()
        med, rbw, _ = bench_interleaved(c, (x, Ws if lay == 'in' else Wts), ref, reps=7)
        t = med / NS
        print(f"{name:34s} {M:3d} {t*1e3:9.3f} {mb/t/1e9:6.1f} {2*M*D*F/t/1e9:7.1f} {rbw:7.1f} {mb/t/1e9/rbw:5.2f}", flush=True)
