"""Compile the 8x7B LoRA train step for a TPU slice (libtpu, no TPU needed) and print its memory per chip.

    TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu \
        python benchmarks/plan_train.py v5e:2x4 expert=2,tensor=4 4 1024 8 [LAYERS]

Arguments: topology, mesh, batch, sequence length, LoRA rank, and optionally
fewer layers (to see how memory grows with depth). The step is the one
`python -m mixtral_jax.train` runs (finetune._step: one micro-batch, remat,
AdamW on the adapters), over abstract bfloat16 weights in their shardings.
"""

import dataclasses
import functools
import json
import os
import sys
import time

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import mixtral_jax as mj
from mixtral_jax import finetune, lora as lora_lib, model as model_lib, plan, sharding, topology


def main(topo, spec, batch, seq, rank, layers=None):
    start = time.time()
    cfg = mj.load_config("8x7b")
    if layers:
        cfg = dataclasses.replace(cfg, num_hidden_layers=layers)
    mesh = sharding.make_mesh(spec, topology.tpu_devices(topo))
    tc = finetune.TrainConfig(lora_rank=rank)
    base = model_lib.abstract_params(cfg, "bfloat16", mesh)
    adapter_shardings = lora_lib.lora_shardings(cfg, rank, mesh)
    adapters = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            jax.eval_shape(functools.partial(lora_lib.init_lora, cfg, rank)), adapter_shardings)
    state = jax.eval_shape(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p,
                                      "opt_state": finetune.optimizer(tc).init(p)}, adapters)

    def placed(path, leaf):
        # Adam's moments are sharded like the adapters they follow (same keys under layers/); counts replicated.
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        s = NamedSharding(mesh, P())
        if leaf.ndim:
            s = adapter_shardings
            for k in keys[keys.index("layers"):]:
                s = s[k]
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s)

    state = jax.tree_util.tree_map_with_path(placed, state)
    ids = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32,
                               sharding=sharding.named_sharding(mesh, (None, "batch", "seq"), (1, batch, seq)))
    step = jax.jit(functools.partial(finetune._step, cfg=cfg, tc=tc, mesh=mesh), donate_argnums=0)
    compiled = step.lower(state, base, {"tokens": ids, "loss_mask": ids, "segment_ids": ids}).compile()
    m = compiled.memory_analysis()
    gib = 2 ** 30
    print(json.dumps({"layers": cfg.num_hidden_layers, "topology": topo, "mesh": spec, "batch": batch,
                      "seq_len": seq, "lora_rank": rank, "argument_gib": m.argument_size_in_bytes / gib,
                      "temp_gib": m.temp_size_in_bytes / gib, "peak_gib_per_chip": plan._peak(m) / gib,
                      "compile_s": time.time() - start}))


if __name__ == "__main__":
    topo_, spec_, batch_, seq_, rank_, *rest = sys.argv[1:]
    main(topo_, spec_, int(batch_), int(seq_), int(rank_), int(rest[0]) if rest else None)
