"""TPU compiler figures for the MoE block and a prefill, from abstract topologies (no TPU needed).

    TPU_SKIP_MDS_QUERY=1 ALLOW_MULTIPLE_LIBTPU_LOAD=1 python benchmarks/moe_compile.py [--json]

Compiles, for the TPU compiler's own cost and memory analysis and collectives:
  block   one 8x7B MoE block, bf16, 8 × 2048 tokens, v5e:2x4 expert=8 (dropless and capacity 1.25)
  layer2  an 8x7B-shaped model cut to 2 layers, bf16, prefill of 8 × 2048 tokens, v5e:1x1
          (FLOPs from a compile with the layer scan unrolled: the cost analysis counts a scan body once)
  full    8x7B, bf16, prefill of 8 × 2048 tokens (cache 4096) on v5e:2x4 expert=8: memory
Figures go to docs/performance.md ("MoE"). Run from the repository root (PYTHONPATH=. for another copy).
"""

from __future__ import annotations

import argparse
import importlib
import dataclasses
import functools
import json
import os
import re
import sys

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec as P

import mixtral_jax as mj
from mixtral_jax import expert_parallel, model as model_lib, moe, sharding
generate_lib = importlib.import_module("mixtral_jax.generate")  # the module; mixtral_jax.generate is the function

COLLECTIVES = ("ragged-all-to-all", "all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute")
BYTES = {"bf16": 2, "f32": 4, "s32": 4, "u32": 4, "f16": 2, "s8": 1, "u8": 1, "pred": 1, "s64": 8}


def tpu_devices(topology: str):
    chips = [int(c) for c in topology.split(":")[1].split("x")]
    bounds = (min(chips[0], 2), min(chips[1], 2) if len(chips) > 1 else 1, 1)
    return topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                        chips_per_host_bounds=bounds, num_slices=1,
                                        wrap=(False, False, False)).devices


def collectives(hlo: str) -> dict[str, list[int]]:
    """Bytes of each collective's result (the largest array of its result type), by kind."""
    out: dict[str, list[int]] = {}
    for line in hlo.splitlines():
        m = re.search(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not m:
            continue
        arrays = [BYTES.get(t, 4) * eval("*".join(dims.split(",")) or "1")
                  for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))]
        out.setdefault(m.group(2), []).append(max(arrays) if arrays else 0)
    return out


def analyse(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    coll = collectives(compiled.as_text())
    return {"flops": cost.get("flops", 0.0), "bytes_accessed": cost.get("bytes accessed", 0.0),
            "argument_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes,
            "peak_bytes": mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes,
            "collectives": {k: {"count": len(v), "bytes": sum(v), "largest": max(v)} for k, v in coll.items()}}


def abstract(shape, dtype, mesh, axes):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.named_sharding(mesh, axes, shape))


def moe_block(cfg, mesh, tokens: int, capacity_factor=None, dtype=jnp.bfloat16):
    """One MoE block (expert-parallel on a mesh of several devices, grouped on one)."""
    d, f, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    p = {"router": abstract((d, e), dtype, mesh, ("embed", None)),
         "w1": abstract((e, d, f), dtype, mesh, ("experts", "embed", "ffn")),
         "w3": abstract((e, d, f), dtype, mesh, ("experts", "embed", "ffn")),
         "w2": abstract((e, f, d), dtype, mesh, ("experts", "ffn", "embed"))}
    x = jax.ShapeDtypeStruct((tokens, d), dtype, sharding=NamedSharding(mesh, P(sharding.MESH_AXES)))
    fn = jax.jit(lambda x, p: moe.moe(x, p, k, mesh=mesh, capacity_factor=capacity_factor))
    out = analyse(fn.lower(x, p).compile())
    out["ideal_flops"] = 2 * tokens * k * 3 * d * f / mesh.size
    if mesh.size > 1 and hasattr(moe, "exchange_plan"):  # absent before (the "before" figures)
        s = dict(mesh.shape)
        out["plan"] = expert_parallel.exchange_plan(tokens, e, k, s["expert"], s["data"], capacity_factor)
    return out


def prefill(cfg, mesh, batch: int, prompt_len: int, max_seq_len: int, dtype="bfloat16"):
    """generate.prefill on abstract params and cache (mesh of one device: the single-device path)."""
    params = model_lib.abstract_params(cfg, dtype, mesh)
    shapes = sharding.cache_shapes(cfg, batch, max_seq_len)
    cache_sh = sharding.cache_shardings(cfg, batch, max_seq_len, mesh)
    cache = {"k": jax.ShapeDtypeStruct(shapes["k"], jnp.dtype(dtype), sharding=cache_sh["k"]),
             "v": jax.ShapeDtypeStruct(shapes["v"], jnp.dtype(dtype), sharding=cache_sh["v"]),
             "pos": jax.ShapeDtypeStruct(shapes["pos"], jnp.int32, sharding=cache_sh["pos"])}
    rows = sharding.named_sharding(mesh, ("batch", "seq"), (batch, prompt_len))
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rows)
    key = jax.eval_shape(lambda: jax.random.key(0))
    lowered = generate_lib.prefill.lower(params, tokens, tokens, cache, key, cfg=cfg, strategy="sparse",
                                         sampling=generate_lib.SamplingParams(),
                                         mesh=mesh if mesh.size > 1 else None, capacity_factor=None)
    out = analyse(lowered.compile())
    out["ideal_flops"] = ideal_prefill_flops(cfg, batch, prompt_len) / mesh.size
    return out


def ideal_prefill_flops(cfg, batch: int, t: int) -> float:
    """2 × tokens × (k·3·D·F + attention projections + router) per layer, causal attention, last lm_head."""
    d, f, h, kv, dh = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n = batch * t
    per_layer = 2 * n * (cfg.num_experts_per_tok * 3 * d * f + d * (h + 2 * kv) * dh + h * dh * d
                         + d * cfg.num_local_experts)
    attention = 2 * 2 * batch * h * dh * t * (t + 1) / 2  # QK and PV over the causal half
    return cfg.num_hidden_layers * (per_layer + attention) + 2 * batch * d * cfg.vocab_size


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", default="block,layer2,full")
    args = parser.parse_args()
    cfg = mj.load_config("8x7b")
    results = {}
    todo = args.only.split(",")
    if "block" in todo:
        mesh = sharding.make_mesh("expert=8", list(tpu_devices("v5e:2x4")))
        for cf in (None, 1.25):
            results[f"block v5e:2x4 expert=8 capacity_factor={cf}"] = moe_block(cfg, mesh, 8 * 2048, cf)
    if "layer2" in todo:
        mesh = sharding.make_mesh("", list(tpu_devices("v5e:1x1")))
        cfg2 = dataclasses.replace(cfg, num_hidden_layers=2)
        results["prefill 2 layers v5e:1x1"] = prefill(cfg2, mesh, 8, 2048, 4096)
        # The cost analysis counts a scan body once: the FLOPs of the same prefill with the layers unrolled.
        scan = jax.lax.scan
        jax.lax.scan = functools.partial(scan, unroll=True)
        jax.clear_caches()  # else prefill's cached trace (with the scan) is reused
        try:
            results["prefill 2 layers v5e:1x1 (layers unrolled, for FLOPs)"] = prefill(cfg2, mesh, 8, 2048, 4096)
        finally:
            jax.lax.scan = scan
        results["block v5e:1x1"] = moe_block(cfg, mesh, 8 * 2048)
    if "full" in todo:
        mesh = sharding.make_mesh("expert=8", list(tpu_devices("v5e:2x4")))
        results["prefill 8x7B v5e:2x4 expert=8"] = prefill(cfg, mesh, 8, 2048, 4096)
    for name, r in results.items():
        print(f"{name}: flops {r['flops']:.3e} (ideal {r['ideal_flops']:.3e}, {r['flops'] / r['ideal_flops']:.2f}x), "
              f"peak {r['peak_bytes'] / 2**30:.2f} GiB (temp {r['temp_bytes'] / 2**30:.2f})")
        for kind, c in sorted(r["collectives"].items()):
            print(f"    {kind}: {c['count']}x, {c['bytes'] / 2**20:.1f} MiB (largest {c['largest'] / 2**20:.1f} MiB)")
        if "plan" in r:
            print("    plan:", r["plan"])
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(main())
