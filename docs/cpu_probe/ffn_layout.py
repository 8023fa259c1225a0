"""Expert FFN on HF [out, in] weights: token-major x @ Wᵀ vs feature-major W @ xᵀ.

16 experts (705 MB, more than L3) per call, N tokens each:
  std        einsum("ND,FD->NF") ... (token-major; what XLA picks for x @ W.T)
  T          feature-major W @ xᵀ, then .T: XLA folds the transpose back and
             picks a slow form
  T+barrier  feature-major with `lax.optimization_barrier` before the final
             .T: what `moe.expert_ffn_t` does
  python docs/cpu_probe/ffn_layout.py 1,2,4,8,16,32,64,128,256
"""
import time, numpy as np, jax, jax.numpy as jnp
F, D, NE = 3584, 1024, 16   # 16 experts x 44 MB = 705 MB
rng = np.random.default_rng(0)
ex = [{n: jnp.asarray(rng.standard_normal(s, np.float32) * 0.02) for n, s in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F)))} for _ in range(NE)]
def std(x, w):
    h = jax.nn.silu(jnp.einsum("ND,FD->NF", x, w["w1"])) * jnp.einsum("ND,FD->NF", x, w["w3"])
    return jnp.einsum("NF,DF->ND", h, w["w2"])
def tr(x, w, barrier):
    xt = x.T
    h = jax.nn.silu(jnp.einsum("FD,DN->FN", w["w1"], xt)) * jnp.einsum("FD,DN->FN", w["w3"], xt)
    yt = jnp.einsum("DF,FN->DN", w["w2"], h)
    if barrier: yt = jax.lax.optimization_barrier(yt)
    return yt.T
def run(B):
    x = jnp.asarray(rng.standard_normal((B, D), np.float32))
    fs = {"std": jax.jit(lambda x, ex: sum(std(x, w) for w in ex)),
          "T": jax.jit(lambda x, ex: sum(tr(x, w, False) for w in ex)),
          "T+barrier": jax.jit(lambda x, ex: sum(tr(x, w, True) for w in ex))}
    r0 = fs["std"](x, ex)
    for n, f in fs.items():
        print(n, float(jnp.abs(f(x, ex) - r0).max() / jnp.abs(r0).max()))
    ts = {n: [] for n in fs}
    for rep in range(8):
        for n, f in fs.items():
            t0 = time.perf_counter(); jax.block_until_ready(f(x, ex)); ts[n].append(time.perf_counter() - t0)
    print(B, "  ".join(f"{n} {np.median(t)*1e3:.1f} ms (best {min(t)*1e3:.1f})" for n, t in ts.items()), flush=True)
import sys
for B in [int(b) for b in sys.argv[1].split(",")]:
    run(B)
