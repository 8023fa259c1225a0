"""Micro-benchmark: does XLA:CPU parallelise one 14.7 MB matvec over the 2 cores,
does it run independent matvecs concurrently, and what does a slice copy cost?
Cycles through NS copies of every buffer so reads come from DRAM, not L3."""
import os
import numpy as np
import jax, jax.numpy as jnp
from jax import lax
from common import bench, hlo_materialisations, wait_quiet

D, F, E = 1024, 3584, 8
NS = 6
rng = np.random.default_rng(0)
mb = D * F * 4
sets = []
for s in range(NS):
    W = jnp.asarray(rng.standard_normal((E, D, F), dtype=np.float32))
    sets.append(dict(W=W, A=W[0] + 0, Bm=W[1] + 0, C=W[2] + 0, Dm=W[3] + 0,
                     A13=jnp.concatenate([W[0], W[1]], 1), P2=W[:2] + 0, P4=W[:4] + 0))
sets = jax.block_until_ready(sets)
e2 = jnp.array([5, 2], jnp.int32)

forms = {
  '1 matvec [D,F] (param)':            (1, lambda x, S: x @ S['A']),
  '2 indep matvecs (params)':          (2, lambda x, S: (x @ S['A'], x @ S['Bm'])),
  '4 indep matvecs (params)':          (4, lambda x, S: (x @ S['A'], x @ S['Bm'], x @ S['C'], x @ S['Dm'])),
  '1 matvec [D,2F] (w1|w3 fused)':     (2, lambda x, S: x @ S['A13']),
  'batched dot [2,D,F] (param)':       (2, lambda x, S: jnp.einsum('kbd,kdf->kbf', jnp.broadcast_to(x, (2,) + x.shape), S['P2'])),
  'batched dot [4,D,F] (param)':       (4, lambda x, S: jnp.einsum('kbd,kdf->kbf', jnp.broadcast_to(x, (4,) + x.shape), S['P4'])),
  'dyn-slice copy only W[e]':          (1, lambda x, S: S['W'][e2[0]]),
  'dyn-slice W[e] -> matvec':          (1, lambda x, S: x @ S['W'][e2[0]]),
  '2x dyn-slice -> matvec':            (2, lambda x, S: (x @ S['W'][e2[0]], x @ S['W'][e2[1]])),
  'gather W[e2] [2,D,F] -> batched':   (2, lambda x, S: jnp.einsum('kbd,kdf->kbf', jnp.broadcast_to(x, (2,) + x.shape), S['W'][e2])),
  'dense 8 batched (ebd,edf)':         (8, lambda x, S: jnp.einsum('ebd,edf->ebf', jnp.broadcast_to(x, (E,) + x.shape), S['W'])),
}
print("XLA_FLAGS=", os.environ.get('XLA_FLAGS', ''))
for B in [int(b) for b in os.environ.get('BS', '1').split(',')]:
    x = jnp.asarray(rng.standard_normal((B, D), dtype=np.float32))
    for name, (nmat, f) in forms.items():
        c = jax.jit(f).lower(x, sets[0]).compile()
        mats = hlo_materialisations(c.as_text())
        i = [0]
        def run():
            i[0] = (i[0] + 1) % NS
            return c(x, sets[i[0]])
        wait_quiet(); med, mn, _ = bench(run, reps=15, warmup=3)
        print(f"B={B:2d} {name:34s} {med*1e3:7.3f} ms (min {mn*1e3:6.3f})  {nmat*mb/med/1e9:6.1f} GB/s  big: {mats if mats else 'none'}", flush=True)
