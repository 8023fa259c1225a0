"""The KV cache's layout in a decode step: ours (row-major [L, B, K, S, Dh]) against the one the TPU
compiler picks when asked (`Layout.AUTO`), for 8x7B cut to 2 layers on v5e:2x4, batch 8, cache 4096.

    TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/cache_layout.py [MESH ...]

Prints, per mesh, the top-level layout copies (`hlo.entry_copy_bytes`) and the cost analysis' bytes
accessed of each compile, and the layout chosen. Where a device holds several rows and few KV heads
(e.g. `expert=2,tensor=4`), XLA keeps the loop-carried cache in another layout and copies the whole
cache into it and back at every step (docs/planning.md).
"""

import dataclasses
import os
import sys

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
from jax.experimental.layout import Format, Layout

import mixtral_jax as mj
from mixtral_jax import hlo, model as model_lib, plan, sharding, topology
from mixtral_jax.generate import SamplingParams, decode_step

BATCH, CACHE_LEN = 8, 4096


def main(meshes):
    cfg = dataclasses.replace(mj.load_config("8x7b"), num_hidden_layers=2, vocab_size=1024)
    for spec in meshes:
        mesh = sharding.make_mesh(spec, topology.tpu_devices("v5e:2x4"))
        params = model_lib.abstract_params(cfg, jnp.bfloat16, mesh)
        cache = plan._abstract_cache(cfg, BATCH, CACHE_LEN, mesh, jnp.bfloat16)
        ids = jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=sharding.named_sharding(mesh, ("batch",), (BATCH,)))
        key = jax.eval_shape(lambda: jax.random.key(0))
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        static = dict(cfg=cfg, strategy="sparse", sampling=SamplingParams(), mesh=mesh, capacity_factor=None)

        def step(params, tokens, positions, index, cache, key, i):
            return decode_step(params, tokens, positions, index, cache, key, i, **static)

        auto = {n: Format(Layout.AUTO, c.sharding) for n, c in cache.items()}
        args = (params, ids, ids, scalar, cache, key, scalar)
        for name, fn in (("row-major", step), ("compiler's choice", jax.jit(
                step, in_shardings=(None,) * 4 + (auto, None, None), out_shardings=(None, None, auto),
                donate_argnums=(4,)))):
            compiled = jax.jit(step, donate_argnums=(4,)).lower(*args).compile() if fn is step else \
                fn.lower(*args).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            layout = compiled.input_formats[0][4]["k"].layout
            print(f"{spec:20s} {name:18s} layout copies {hlo.entry_copy_bytes(compiled.as_text()) / 1e6:8.1f} MB, "
                  f"bytes accessed {cost['bytes accessed'] / 1e6:8.1f} MB, k major_to_minor {layout.major_to_minor}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["expert=8", "expert=2,tensor=4", "tensor=8"])
