"""Decode-step MoE on per_expert buffers: masked M=B experts vs grouped blocks of about the group's size.

Two layers of the bench model's experts (16 x 44 MB = 705 MB, more than L3),
B tokens, a random router, run back to back as in a decode step:
  masked      every chosen expert runs on all B rows, gated, behind a lax.cond
              (moe_per_expert_masked: the library's path for B <= 8)
  grouped     each chosen expert runs on its own rows, gathered into one block
              (moe_per_expert_grouped with its default sizes: 16-multiples, plus
              8 when the mean group is under 16 rows; the path for B > 8)
  grouped16   the same with 16-multiples only
  grouped1248 the same with 1, 2, 4, 8 and 16-multiples
Routings differ per rep (a few x's cycled); all variants see the same ones.
Also prints the compile time of each variant for 8 layers (the bench model's
depth), since each block size is one more branch per expert.
  PYTHONPATH=. python docs/cpu_probe/decode_groups.py 1,4,16,64
"""
import sys, time, numpy as np, jax, jax.numpy as jnp
from mixtral_jax import moe

F, D, E, L = 3584, 1024, 8, 2
rng = np.random.default_rng(0)
layers = [{"router": jnp.asarray(rng.standard_normal((D, E), np.float32)),
           "experts": [{n: jnp.asarray(rng.standard_normal(s, np.float32) * 0.02)
                        for n, s in (("w1", (F, D)), ("w3", (F, D)), ("w2", (D, F)))} for _ in range(E)]}
          for _ in range(L)]


def stack(f):
    return jax.jit(lambda x, layers: sum(f(x, p) for p in layers))


def sizes16(b, small=()):
    return tuple(s for s in list(small) + list(range(16, 257, 16)) if s < min(b, 256)) + (min(b, 256),)


def run(B, reps=12):
    xs = [jnp.asarray(rng.standard_normal((B, D), np.float32)) for _ in range(4)]
    fs = {"masked": lambda x, p: moe.moe_per_expert_masked(x, p, 2),
          "grouped": lambda x, p: moe.moe_per_expert_grouped(x, p, 2),
          "grouped16": lambda x, p: moe.moe_per_expert_grouped(x, p, 2, sizes16(B)),
          "grouped1248": lambda x, p: moe.moe_per_expert_grouped(x, p, 2, sizes16(B, (1, 2, 4, 8)))}
    compile_s = {}
    for n, f in fs.items():  # compile time at the bench model's 8 layers (weights as shapes only)
        abstract = [jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), layers[0])] * 8
        t0 = time.perf_counter(); stack(f).lower(xs[0], abstract).compile(); compile_s[n] = time.perf_counter() - t0
    fs = {n: stack(f) for n, f in fs.items()}
    ref = [fs["masked"](x, layers) for x in xs]
    for n, f in fs.items():
        err = max(float(jnp.abs(f(x, layers) - r).max() / jnp.abs(r).max()) for x, r in zip(xs, ref))
        assert err < 1e-5, (n, err)
    ts = {n: [] for n in fs}
    for rep in range(reps):
        x = xs[rep % len(xs)]
        for n, f in fs.items():
            t0 = time.perf_counter(); jax.block_until_ready(f(x, layers)); ts[n].append(time.perf_counter() - t0)
    print(f"B={B:3d} " + "  ".join(f"{n} {np.median(t)*1e3:5.1f} ms (best {min(t)*1e3:5.1f}; compile {compile_s[n]:.1f} s)"
                                   for n, t in ts.items()), flush=True)


for B in [int(b) for b in sys.argv[1].split(",")]:
    run(B)
