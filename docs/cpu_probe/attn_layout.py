"""Attention projections of the bench model (D=1024, 16 heads, 4 kv heads, Dh=64) at N tokens,
8 layers' worth of weights (84 MB):
  current   wq [D, H, Dh], wk / wv [D, K, Dh], wo [H*Dh, D]: three input einsums + one output
  fused_fm  one [(H+2K)*Dh, D] qkv buffer and wo [D, H*Dh], both [out, in], computed feature-major
            (W @ xT behind an optimization barrier, as moe.expert_ffn_t)
  fused_tm  the same buffers, token-major (x @ Wt)
  python docs/cpu_probe/attn_layout.py 1,4,16,64,512
"""
import sys, time, numpy as np, jax, jax.numpy as jnp
D, H, K, Dh, L = 1024, 16, 4, 64, 8
rng = np.random.default_rng(0)
w = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32) * 0.02)
cur = [{"wq": w(D, H, Dh), "wk": w(D, K, Dh), "wv": w(D, K, Dh), "wo": w(H * Dh, D)} for _ in range(L)]
fused = [{"wqkv": jnp.concatenate([p["wq"].reshape(D, -1), p["wk"].reshape(D, -1), p["wv"].reshape(D, -1)], 1).T,
          "wo": p["wo"].T} for p in cur]
fused = [jax.tree.map(lambda a: jnp.asarray(np.ascontiguousarray(np.asarray(a))), p) for p in fused]
bar = jax.lax.optimization_barrier


# Each returns q, k, v of x and the output projection of a separate input o [N, H*Dh] (the
# attention core's output in the model), so no product feeds another here.
def f_cur(x, o, ps):
    return [(jnp.einsum("ND,DHE->NHE", x, p["wq"]), jnp.einsum("ND,DKE->NKE", x, p["wk"]),
             jnp.einsum("ND,DKE->NKE", x, p["wv"]), o @ p["wo"]) for p in ps]


def f_fm(x, o, ps):
    return [(bar(jnp.einsum("FD,DN->FN", p["wqkv"], x.T)).T, bar(jnp.einsum("DF,FN->DN", p["wo"], o.T)).T) for p in ps]


def f_tm(x, o, ps):
    return [(x @ p["wqkv"].T, o @ p["wo"].T) for p in ps]


def flat(outs):
    return [jnp.concatenate([a.reshape(a.shape[0], -1) for a in t], 1) for t in outs]


nbytes = sum(a.nbytes for p in cur for a in p.values())
for n in [int(b) for b in sys.argv[1].split(",")]:
    x = jnp.asarray(rng.standard_normal((n, D), np.float32))
    o = jnp.asarray(rng.standard_normal((n, H * Dh), np.float32))
    fs = {"current": jax.jit(f_cur), "fused_fm": jax.jit(f_fm), "fused_tm": jax.jit(f_tm)}
    ref = flat(fs["current"](x, o, cur))
    for name, f in fs.items():
        got = flat(f(x, o, cur if name == "current" else fused))
        assert max(float(jnp.abs(a - b).max() / jnp.abs(a).max()) for a, b in zip(ref, got)) < 1e-4, name
    ts = {name: [] for name in fs}
    for rep in range(10):
        for name, f in fs.items():
            t0 = time.perf_counter(); jax.block_until_ready(f(x, o, cur if name == "current" else fused)); ts[name].append(time.perf_counter() - t0)
    print(f"N={n:4d} " + "  ".join(f"{name} {np.median(t)*1e3:6.2f} ms ({nbytes/np.median(t)/1e9:5.1f} GB/s)" for name, t in ts.items()), flush=True)
