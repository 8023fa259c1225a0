"""Micro-benchmark: one expert matvec x[B,D] @ W[e] out of a stacked W[E,D,F]
(E=8, 117 MB), e a runtime value.  Shows which formulations copy the slice.
Useful bytes = one expert = D*F*4 = 14.7 MB."""
import os, sys
import numpy as np
import jax, jax.numpy as jnp
from jax import lax
from common import bench, hlo_materialisations, wait_quiet

D, F, E = 1024, 3584, 8
NS = int(os.environ.get('NSTACK', '4'))   # several stacks, cycled, so the slice isn't L3-resident
rng = np.random.default_rng(0)
Ws = [jnp.asarray(rng.standard_normal((E, D, F), dtype=np.float32)) for _ in range(NS)]
Wts = [jnp.swapaxes(W, 1, 2).copy() for W in Ws]                       # [E, F, D] torch layout
lists = [[W[i] for i in range(E)] for W in Ws]                         # unstacked (separate buffers)
mb = D * F * 4


def mk(name, f):
    return name, f

forms = {
  'W[e] index -> dot':            lambda x, W, Wt, Wl, e: x @ W[e],
  'dynamic_slice -> dot':         lambda x, W, Wt, Wl, e: x @ lax.dynamic_slice(W, (e, 0, 0), (1, D, F))[0],
  'W[3] static slice -> dot':     lambda x, W, Wt, Wl, e: x @ W[3],
  'mul+reduce axis0 (in x out)':  lambda x, W, Wt, Wl, e: jnp.sum(x[:, :, None] * W[e][None], axis=1),
  'Wt[e] dot (out x in)':         lambda x, W, Wt, Wl, e: jnp.einsum('bd,fd->bf', x, Wt[e]),
  'mul+reduce minor (out x in)':  lambda x, W, Wt, Wl, e: jnp.sum(x[:, None, :] * Wt[e][None], axis=-1),
  'switch(e) static slices':      lambda x, W, Wt, Wl, e: lax.switch(e, [lambda x, i=i: x @ W[i] for i in range(E)], x),
  'switch(e) unstacked list':     lambda x, W, Wt, Wl, e: lax.switch(e, [lambda x, i=i: x @ Wl[i] for i in range(E)], x),
  'unstacked list, static [3]':   lambda x, W, Wt, Wl, e: x @ Wl[3],
  'dense all E (bd,edf->bef)':    lambda x, W, Wt, Wl, e: jnp.einsum('bd,edf->bef', x, W),
  'dense all E batched (ebd,edf)':lambda x, W, Wt, Wl, e: jnp.einsum('ebd,edf->ebf', jnp.broadcast_to(x, (E,) + x.shape), W),
  'dense all E torch (ebd,efd)':  lambda x, W, Wt, Wl, e: jnp.einsum('ebd,efd->ebf', jnp.broadcast_to(x, (E,) + x.shape), Wt),
}
only = os.environ.get('ONLY')
print("XLA_FLAGS=", os.environ.get('XLA_FLAGS', ''))
for B in [int(b) for b in os.environ.get('BS', '1,4').split(',')]:
    x = jnp.asarray(rng.standard_normal((B, D), dtype=np.float32))
    e = jnp.int32(5)
    for name, f in forms.items():
        if only and only not in name: continue
        jf = jax.jit(f)
        c = jf.lower(x, Ws[0], Wts[0], lists[0], e).compile()
        mats = hlo_materialisations(c.as_text())
        i = [0]
        def run():
            i[0] = (i[0] + 1) % NS
            return c(x, Ws[i[0]], Wts[i[0]], lists[i[0]], e)
        wait_quiet(); med, mn, _ = bench(run, reps=11, warmup=3)
        useful = mb * (E if 'dense' in name else 1)
        print(f"B={B:2d} {name:32s} {med*1e3:7.2f} ms  {useful/med/1e9:6.1f} GB/s   big buffers: {mats if mats else 'none'}", flush=True)
