"""Rounding error of the expert-parallel MoE block in bfloat16, per mesh, against a float64 loop.

    python benchmarks/moe_numerics.py            # the working tree
    PYTHONPATH=OLD_CHECKOUT python benchmarks/moe_numerics.py   # another version, same inputs

Inputs and weights are bfloat16 values; the reference is float64 arithmetic on exactly those
values (router choices from float32 routing, as the block makes them), so the figures are the
arithmetic's rounding alone: relative RMS and max error of the block's output, 8 virtual CPU
devices. Used to choose the dtype the F-partials return in (docs/planning.md).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import mixtral_jax as mj
from mixtral_jax import expert_parallel, moe, sharding

E, D, F, N, K = 8, 512, 2048, 256, 2
MESHES = ("expert=8", "tensor=8", "expert=2,tensor=4", "expert=4,tensor=2")
AXES = {"w1": ("experts", "embed", "ffn"), "w3": ("experts", "embed", "ffn"), "w2": ("experts", "ffn", "embed")}


def main():
    rng = np.random.default_rng(0)
    p = {"router": rng.standard_normal((D, E)) * 0.05, "w1": rng.standard_normal((E, D, F)) / np.sqrt(D),
         "w3": rng.standard_normal((E, D, F)) / np.sqrt(D), "w2": rng.standard_normal((E, F, D)) / np.sqrt(F)}
    p16 = {n: jnp.asarray(w, jnp.bfloat16) for n, w in p.items()}
    x16 = jnp.asarray(rng.standard_normal((N, D)), jnp.bfloat16)
    w64 = {n: np.asarray(w, np.float64) for n, w in p16.items()}
    x64 = np.asarray(x16, np.float64)
    gates, chosen = (np.asarray(a) for a in moe.route(jnp.asarray(x64, jnp.float32),
                                                      jnp.asarray(w64["router"], jnp.float32), K))
    ref = np.zeros((N, D))
    for n in range(N):
        for j in range(K):
            e = chosen[n, j]
            h = x64[n] @ w64["w1"][e]
            ref[n] += gates[n, j] * ((h / (1 + np.exp(-h)) * (x64[n] @ w64["w3"][e])) @ w64["w2"][e])
    for spec in MESHES:
        mesh = mj.make_mesh(spec)
        shardings = {"router": NamedSharding(mesh, P()),
                     **{n: NamedSharding(mesh, sharding.logical_to_spec(a, mesh, p16[n].shape)) for n, a in AXES.items()}}
        out = jax.jit(lambda x, p: expert_parallel.moe_expert_parallel(x, p, K, mesh)[0])(x16, jax.device_put(p16, shardings))
        d = np.asarray(out, np.float64) - ref
        print(f"{spec:20s} relative RMS {np.sqrt((d ** 2).mean() / (ref ** 2).mean()):.3e}  "
              f"max {np.abs(d).max() / np.abs(ref).max():.3e}")


if __name__ == "__main__":
    main()
