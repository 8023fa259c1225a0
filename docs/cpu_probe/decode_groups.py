"""Decode-step MoE on per_expert buffers: masked M=B experts vs grouped blocks of about the group's size.

Two layers of the bench model's experts (16 x 44 MB = 705 MB, more than L3),
B tokens, a random router, run back to back as in a decode step:
  masked      every chosen expert runs on all B rows, gated, behind a lax.cond
              (what the library did for B <= 16 before; kept here as `masked`)
  grouped     each chosen expert runs on its own rows, gathered into a block
              of size 1, 2, 4, 8, 16, 32, ... (moe_per_expert_grouped, default sizes)
  grouped16   the same with only GROUP_STEP multiples (what it did for B > 16)
  groupedall  every size 1..B (up to 64)
Routings differ per rep (a few x's cycled); all variants see the same ones.
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


def masked(x, p, k=2):
    weights, experts = moe.route(x, p["router"], k)
    out = jnp.zeros(x.shape, jnp.float32)
    for e, w in enumerate(p["experts"]):
        chosen = experts == e
        gate = jnp.sum(jnp.where(chosen, weights, 0.0), axis=1)
        run = lambda x, gate, w=w: gate[:, None] * moe.expert_ffn_t(x, w)
        out = out + jax.lax.cond(jnp.any(chosen), run, lambda x, gate: jnp.zeros(x.shape, jnp.float32), x, gate)
    return out


def stack(f):
    return jax.jit(lambda x, layers: sum(f(x, p) for p in layers))


def run(B, reps=12):
    xs = [jnp.asarray(rng.standard_normal((B, D), np.float32)) for _ in range(4)]
    fs = {"masked": stack(masked),
          "grouped": stack(lambda x, p: moe.moe_per_expert_grouped(x, p, 2)),
          "grouped16": stack(lambda x, p: moe.moe_per_expert_grouped(x, p, 2, tuple(s for s in range(16, 257, 16) if s < B) + (B,) if B <= 256 else None)),
          "groupedall": stack(lambda x, p: moe.moe_per_expert_grouped(x, p, 2, tuple(range(1, min(B, 64) + 1))))}
    ref = [fs["masked"](x, layers) for x in xs]
    for n, f in fs.items():
        err = max(float(jnp.abs(f(x, layers) - r).max() / jnp.abs(r).max()) for x, r in zip(xs, ref))
        assert err < 1e-5, (n, err)
    ts = {n: [] for n in fs}
    for rep in range(reps):
        x = xs[rep % len(xs)]
        for n, f in fs.items():
            t0 = time.perf_counter(); jax.block_until_ready(f(x, layers)); ts[n].append(time.perf_counter() - t0)
    print(f"B={B:3d} " + "  ".join(f"{n} {np.median(t)*1e3:6.1f} ms (best {min(t)*1e3:6.1f})" for n, t in ts.items()), flush=True)


for B in [int(b) for b in sys.argv[1].split(",")]:
    run(B)
