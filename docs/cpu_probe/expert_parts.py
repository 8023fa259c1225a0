"""Expert FFN with each matrix cut along F into P buffers (`moe.EXPERT_PARTS`), by row count.

8 layers, 2 experts each (705 MB, more than L3), run as a chain like a decode
step: each layer's output (both experts, summed) feeds the next layer. Runs
the library's `moe.expert_ffn_t` on `moe.split_expert(..., parts=P)`, the P
variants alternating; also the first-call compile time of the 8 layers.
  PYTHONPATH=. python docs/cpu_probe/expert_parts.py 1,2,4,8,16,64,128 1,2,4
"""
import sys, time
import numpy as np, jax, jax.numpy as jnp
from mixtral_jax import moe

F, D, L = 3584, 1024, 8
rows, parts = ([int(v) for v in a.split(",")] for a in sys.argv[1:3])
rng = np.random.default_rng(0)
hf = [[{n: rng.standard_normal(s, np.float32) * 0.02 for n, s in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F)))}
       for _ in range(2)] for _ in range(L)]
params = {p: [[jax.tree.map(lambda a: jnp.array(a, copy=True), moe.split_expert(w["w1"], w["w3"], w["w2"], p))
               for w in layer] for layer in hf] for p in parts}


def chain(x, layers):
    for experts in layers:
        x = x + sum(moe.expert_ffn_t(x, w) for w in experts)
        x = x / (1 + jnp.abs(x).max(axis=-1, keepdims=True))
    return x


for m in rows:
    x = jnp.asarray(rng.standard_normal((m, D), np.float32))
    fs, compile_s = {}, {}
    for p in parts:
        t0 = time.perf_counter()
        fs[p] = jax.jit(chain).lower(x, params[p]).compile()
        compile_s[p] = time.perf_counter() - t0
    ref = np.asarray(fs[parts[0]](x, params[parts[0]]))
    diff = max(float(np.abs(np.asarray(fs[p](x, params[p])) - ref).max()) for p in parts)
    ts = {p: [] for p in parts}
    for rep in range(9):
        for p in parts:
            t0 = time.perf_counter(); jax.block_until_ready(fs[p](x, params[p])); ts[p].append(time.perf_counter() - t0)
    print(f"rows {m:4d}: " + "  ".join(f"P={p} {np.median(ts[p]) * 1e3:6.1f} ms (compile {compile_s[p]:.1f} s)"
                                       for p in parts) + f"  max diff {diff:.1e}", flush=True)
