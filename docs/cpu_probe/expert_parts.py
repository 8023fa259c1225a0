"""Expert FFN with each matrix cut along F into P separate buffers, by row count and matrix size.

An idea tried and NOT kept (FINDINGS.md, "Expert matrices in parts"). The FFN
is a sum over F, so w1, w3 [F, D] cut by rows and w2 [D, F] by columns give P
smaller, independent products whose outputs add up. Layers of 2 experts run as
a chain like a decode step (each layer's output feeds the next), computed
feature-major like `moe.expert_ffn_t`; the P variants alternate; also the
first-call compile time.
  PYTHONPATH=. python docs/cpu_probe/expert_parts.py ROWS PARTS [D F LAYERS]
  e.g. ... 1,2,4,8,16,64,128 1,2,4            (bench model: D 1024, F 3584, 8 layers)
       ... 1,4 1,2 4096 14336 1               (8x7B-sized experts)
"""
import sys, time
import numpy as np, jax, jax.numpy as jnp

rows, parts = ([int(v) for v in a.split(",")] for a in sys.argv[1:3])
D, F, L = (int(v) for v in sys.argv[3:6]) if len(sys.argv) > 3 else (1024, 3584, 8)
rng = np.random.default_rng(0)


def split(w, p):
    b = [F * i // p for i in range(p + 1)]
    return {"w1": [jnp.array(w["w1"][lo:hi]) for lo, hi in zip(b, b[1:])],
            "w3": [jnp.array(w["w3"][lo:hi]) for lo, hi in zip(b, b[1:])],
            "w2": [jnp.array(np.ascontiguousarray(w["w2"][:, lo:hi])) for lo, hi in zip(b, b[1:])]}


params = {p: [] for p in parts}
for _ in range(L):
    layer = [{n: rng.standard_normal(s, np.float32) * 0.02 for n, s in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F)))}
             for _ in range(2)]
    for p in parts:
        params[p].append([split(w, p) for w in layer])
    del layer


def ffn(x, w):
    xt, yt = x.T, 0.0
    for w1, w3, w2 in zip(w["w1"], w["w3"], w["w2"]):
        h = jax.nn.silu(jnp.einsum("FD,DN->FN", w1, xt)) * jnp.einsum("FD,DN->FN", w3, xt)
        yt = yt + jnp.einsum("DF,FN->DN", w2, h)
    return jax.lax.optimization_barrier(yt).T


def chain(x, layers):
    for experts in layers:
        x = x + sum(ffn(x, w) for w in experts)
        x = x / (1 + jnp.abs(x).max(axis=-1, keepdims=True))
    return x


print(f"D {D}, F {F}: one matrix {F * D * 4 / 1e6:.1f} MB; {L} layers x 2 experts = {L * 6 * F * D * 4 / 1e9:.2f} GB")
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
