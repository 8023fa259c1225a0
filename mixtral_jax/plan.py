"""Dry run: will this model fit this mesh, and how fast can it go? AOT-compile prefill and decode.

Nothing is allocated: parameters and the KV cache are `jax.ShapeDtypeStruct`s
carrying their shardings, and `generate.prefill` and `generate.decode_step`
are lowered and compiled for a mesh of devices that need not exist. Two
targets:

  a TPU topology  (`topology="v5e:2x4"`, libtpu installed): the TPU compiler
                  compiles the real dtype for that slice. Its memory analysis
                  gives the peak bytes per device, its cost analysis the FLOPs
                  and HBM bytes, and the optimized HLO every collective; a
                  roofline over the chip's published figures (topology.CHIPS)
                  turns them into an estimated decode step time and prefill rate.
  virtual CPUs    (no topology): XLA:CPU compiles in float32 whatever `dtype`
                  is (it has no bf16 matmul; a bf16 compile would convert whole
                  stacked weights to f32 up front). Parameter and cache bytes are
                  exact; the float32 temporaries are an upper bound for bf16.
                  No speed estimate.

XLA's cost analysis counts a loop body once, and the layers run as one
`lax.scan`: the full model's figures hold embedding + head + ONE layer. The
per-layer share comes from compiles of the same step and model with the
vocabulary cut to one row per tensor shard, so that embedding, lm_head and
sampling cost next to nothing and their figures are one layer's: whole model
= full compile + (L - 1) × that share. The cut model keeps all L layers
because the body's code depends on them (with one layer XLA drops the loop,
with two it prefetches whole stacked weights on chip). The cost model also
charges the in-place KV-cache update inside the loop with the whole
[L, ..., S, ...] cache, so a layer's bytes come from compiles with a short
cache plus the real read of S slots (see `_whole_model_costs`;
docs/planning.md has the figures). Collectives need no such step:
`hlo.collectives` multiplies each by the trip count of the loops around it.

The virtual CPU devices must exist before JAX starts its CPU backend: a CLI
calls `ensure_virtual_devices(n)` first; `dry_run` called later in a process
that has too few devices re-runs itself in a fresh Python process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from mixtral_jax import expert_parallel, hlo, model as model_lib, moe, quant, sharding, topology as topology_lib
from mixtral_jax.config import MixtralConfig, load_config
from mixtral_jax.generate import SamplingParams, decode_step, prefill

DEFAULT_PROMPT_LEN = 2048
GIB = 2**30
# The TPU compiler's refusal of a program larger than HBM (sizes in binary units).
_OUT_OF_HBM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def mesh_size(mesh_spec: str) -> int:
    """Number of devices a mesh spec like "expert=8,tensor=8" needs."""
    return math.prod(sharding.parse_mesh_spec(mesh_spec).values())


def ensure_virtual_devices(n: int) -> bool:
    """Asks JAX for `n` virtual CPU devices; call before any JAX computation.

    Returns:
      True if the setting took effect, False if JAX's backends were already
      running (then `dry_run` plans in a subprocess instead).
    """
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        return False
    return True


def _bytes_per_device(abstract_tree) -> int:
    """Sum over arrays of itemsize × elements of one shard (shardings divide evenly here)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(abstract_tree))


def _abstract_cache(cfg: MixtralConfig, batch: int, cache_len: int, mesh, dtype) -> dict[str, jax.ShapeDtypeStruct]:
    shardings = sharding.cache_shardings(cfg, batch, cache_len, mesh)
    return {name: jax.ShapeDtypeStruct(shape, jnp.int32 if name == "pos" else dtype, sharding=shardings[name])
            for name, shape in sharding.cache_shapes(cfg, batch, cache_len).items()}


def _compile(step: str, cfg: MixtralConfig, mesh, batch: int, prompt_len: int, cache_len: int, dtype,
             capacity_factor: float | None, quantize: str | None = None, chunked: bool = False):
    """`generate.prefill` or `generate.decode_step` compiled for abstract params (experts quantized with
    `quantize`) and a `cache_len`-slot cache; `chunked`: the prefill of one `prompt_len`-token chunk of a
    longer prompt (written at a traced slot, its queries reading the whole cache)."""
    params = model_lib.abstract_params(cfg, dtype, mesh, quantize=quantize)
    cache = _abstract_cache(cfg, batch, cache_len, mesh, dtype)

    def ids(shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.named_sharding(
            mesh, ("batch", "seq")[:len(shape)], shape))

    key = jax.eval_shape(lambda: jax.random.key(0))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    static = dict(cfg=cfg, strategy="sparse", sampling=SamplingParams(), mesh=mesh, capacity_factor=capacity_factor)
    if step == "prefill":
        return prefill.lower(params, ids((batch, prompt_len)), ids((batch, prompt_len)), cache, key,
                             scalar if chunked else None, **static).compile()
    return decode_step.lower(params, ids((batch,)), ids((batch,)), scalar, cache, key, scalar, **static).compile()


def _peak(m) -> int:
    """Bytes live at once on a device (from a compile's memory_analysis): inputs, outputs not aliased to
    inputs (the donated cache is), temporaries."""
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def _cost(compiled) -> tuple[float, float]:
    """(FLOPs, HBM bytes accessed) per device from XLA's cost analysis (a loop body counted once)."""
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return float(c.get("flops", 0.0)), float(c.get("bytes accessed", 0.0))


def _short_shape(shape: str) -> str:
    """bf16[8,1,64]{2,1,0:T(2,128)} -> bf16[8,1,64] (layouts dropped)."""
    return re.sub(r"\{[^{}]*\}", "", shape)


def _whole_model_costs(step: str, cfg: MixtralConfig, mesh, batch: int, prompt_len: int, cache_len: int, dtype,
                       capacity_factor: float | None, full, full_text: str,
                       quantize: str | None = None, chunked: bool = False) -> tuple[float, float, int, list]:
    """(FLOPs, HBM bytes, the part of those in top-level layout copies, the extra compiles made) of
    a whole `step`; `full` is its compile (`full_text` its HLO), whose cost analysis counts the layer
    scan's body once.

    Compiles of the same step with the vocabulary cut to one row per tensor shard hold one layer
    (embedding, lm_head and sampling then cost next to nothing). FLOPs: full + (L - 1) x the cut
    compile's. Bytes: the cost model charges the in-place KV-cache update in the loop with the
    whole [L, ..., S, ...] cache, so the layer's bytes come from cut compiles with a short cache:
    decode at 16 and 32 slots, whose difference per slot less the cache's own bytes per slot is
    that charge (removed), plus the real read of S slots; prefill at the prompt's T slots (it reads
    no others), the charge for those left in; a chunk of a chunked prefill at all S slots (it reads them).
    """
    num_layers = cfg.num_hidden_layers
    cut = dataclasses.replace(cfg, vocab_size=mesh.shape["tensor"])
    copies = hlo.entry_copy_bytes(full_text)
    compile_cut = lambda slots: _compile(step, cut, mesh, batch, prompt_len, slots, dtype, capacity_factor, quantize,
                                         chunked)
    cut_full_cache = compile_cut(cache_len)
    (flops, hbm), (layer_flops, cut_hbm) = _cost(full), _cost(cut_full_cache)
    # The vocabulary's part (embedding, lm_head, sampling), and the program's top-level layout copies
    # (which both compiles make, e.g. of the whole cache around the loop).
    outside_hbm = hbm - cut_hbm + copies
    extra = [cut_full_cache]
    if step == "prefill":
        short = compile_cut(prompt_len) if prompt_len < cache_len and not chunked else cut_full_cache
        layer_hbm = _cost(short)[1]
        extra += [short] if short is not cut_full_cache else []
    elif cache_len > 32:
        c16, c32 = compile_cut(16), compile_cut(32)
        slope = (_cost(c32)[1] - _cost(c16)[1]) / 16
        shard = sharding.cache_shardings(cfg, batch, cache_len, mesh)["k"].shard_shape(
            sharding.cache_shapes(cfg, batch, cache_len)["k"])  # [L, B, K, S, Dh] on one device
        slot = 2 * shard[1] * shard[2] * shard[4] * jnp.dtype(dtype).itemsize  # k and v, one layer
        layer_hbm = _cost(c16)[1] - 16 * slope + slot * cache_len
        extra += [c16, c32]
    else:
        layer_hbm = cut_hbm
    return flops + (num_layers - 1) * layer_flops, outside_hbm + num_layers * layer_hbm, copies, extra


def _step_report(step: str, cfg: MixtralConfig, mesh, batch: int, prompt_len: int, cache_len: int, dtype,
                 capacity_factor: float | None, chip, quantize: str | None = None,
                 chunked: bool = False) -> dict[str, Any]:
    """Memory, whole-model costs, collectives and roofline estimate of one step on a TPU mesh (a prefill
    step: `prompt_len` tokens per row, one chunk of a longer prompt when `chunked`).

    A step that does not fit the chip's HBM does not compile: then only what the compiler says
    (`does_not_fit`: bytes needed and available per device) is reported.
    """
    t0 = time.perf_counter()
    try:
        compiled = _compile(step, cfg, mesh, batch, prompt_len, cache_len, dtype, capacity_factor, quantize, chunked)
    except jax.errors.JaxRuntimeError as e:
        m = _OUT_OF_HBM.search(str(e))
        if not m:
            raise
        need, have = (float(x) * _UNITS[u] for x, u in (m.group(1, 2), m.group(3, 4)))
        return {"does_not_fit": {"needed_bytes_per_device": int(need), "available_bytes_per_device": int(have),
                                 "message": m.group(0)},
                "peak_bytes_per_device": int(need), "temp_bytes_per_device": None}
    t1 = time.perf_counter()
    text = compiled.as_text()
    flops, hbm, copies, extra = _whole_model_costs(step, cfg, mesh, batch, prompt_len, cache_len, dtype,
                                                   capacity_factor, compiled, text, quantize, chunked)
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    found = hlo.collectives(text)
    # Loops other than the layer scan (trip count L; none left when L is 1) have their bodies counted
    # once by the cost analysis, which then undercounts.
    extra_loops = [l for t in [text] + [c.as_text() for c in extra] for l in hlo.loops(t)
                   if l.trips != cfg.num_hidden_layers]
    coll = hlo.total_bytes(found)
    tokens = batch * (prompt_len if step == "prefill" else 1)
    times = {"compute": flops / chip.bf16_flops, "hbm": hbm / chip.hbm_bytes_per_s, "ici": coll / chip.ici_bytes_per_s}
    step_s = max(times.values())
    return {
        "temp_bytes_per_device": m.temp_size_in_bytes,
        "peak_bytes_per_device": _peak(m),
        "flops_per_device": flops,
        "hbm_bytes_per_device": hbm,
        "layout_copy_bytes_per_device": copies,
        "collective_bytes_per_device": coll,
        "collectives": [{"op": c.op, "shape": _short_shape(c.shape), "bytes": c.bytes, "count": c.count,
                         "group_size": c.group_size, "op_name": c.op_name}
                        for c in sorted(found, key=lambda c: -c.bytes_per_call)],
        "costs_exact": not extra_loops,
        "est_step_s": step_s,
        "bound": max(times, key=times.get),
        "roofline_s": times,
        "est_tokens_per_s": tokens / step_s,
        "compile_seconds": {"step": round(t1 - t0, 1), "per_layer_share": round(t2 - t1, 1)},
    }


def _prefill_step(prompt_len: int, prefill_chunk: int | None) -> tuple[int, bool]:
    """(tokens per row of one prefill step, whether it is a chunk of a longer prompt)."""
    chunked = prefill_chunk is not None and prefill_chunk < prompt_len
    return (prefill_chunk if chunked else prompt_len), chunked


def _validate(cfg: MixtralConfig, mesh_spec: str, batch: int, max_seq_len: int | None, prompt_len: int | None):
    max_seq_len = cfg.max_position_embeddings if max_seq_len is None else max_seq_len
    prompt_len = min(max_seq_len, DEFAULT_PROMPT_LEN) if prompt_len is None else prompt_len
    if not 1 <= prompt_len <= max_seq_len:
        raise ValueError(f"prompt_len {prompt_len} must be between 1 and max_seq_len {max_seq_len}.")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}.")
    sizes = sharding.parse_mesh_spec(mesh_spec)
    sharding.check_mesh(cfg, jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes)))
    return max_seq_len, prompt_len


def dry_run(cfg: MixtralConfig | str, mesh_spec: str, batch: int = 1, max_seq_len: int | None = None,
            prompt_len: int | None = None, dtype: str = "bfloat16", device_memory_gb: float | None = None,
            capacity_factor: float | None = None, topology: str | None = None,
            quantize: str | None = None, prefill_chunk: int | None = None) -> dict[str, Any]:
    """Plans serving `cfg` on `mesh_spec`, allocating nothing.

    Args:
      cfg: a config or anything `load_config` takes ("8x22b", a path).
      mesh_spec: e.g. "expert=8,tensor=8" (axes data, expert, tensor).
      batch: sequences decoded together (B).
      max_seq_len: KV-cache length S (default: the model's max positions).
      prompt_len: prefill length T (default: min(S, 2048)); prefill attends over its own T slots.
      dtype: parameter and cache dtype.
      device_memory_gb: memory per device in GiB (2**30 bytes) to check against
        (default with a topology: the chip's HBM).
      capacity_factor: expert-parallel capacity (None: dropless).
      topology: a TPU slice such as "v5e:2x4" or "v5p:4x4x4" to compile for with
        the TPU compiler (needs libtpu); None plans on virtual CPU devices.
      quantize: a quant.MODES mode: the weights it covers quantized (quant.py), counted and compiled as such.
      prefill_chunk: a prompt longer than this is prefilled in chunks of it (`generate`'s
        `prefill_chunk`): the prefill step planned is one chunk, reading the whole cache.

    Returns:
      A JSON-able dict: platform, topology, devices, batch, prompt_len, prefill_step_len (tokens per row
      of one prefill step: the chunk, or the prompt), max_seq_len, capacity_factor, fits (None without a memory size),
      params_bytes_per_device, kv_cache_bytes_per_device, peak_bytes_per_device,
      prefill_flops_per_device, decode_hbm_bytes_per_device,
      decode_collective_bytes_per_device, prefill_collective_bytes_per_device,
      est_decode_step_s, est_prefill_tokens_per_s (the last six None on CPU),
      per-step details under "prefill" and "decode", and the MoE's rows and
      exchange per layer for each step under "moe" (`moe_rows`).
    """
    cfg = cfg if isinstance(cfg, MixtralConfig) else load_config(cfg)
    max_seq_len, prompt_len = _validate(cfg, mesh_spec, batch, max_seq_len, prompt_len)
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 (or None: the whole prompt at once), got {prefill_chunk}.")
    step_len, chunked = _prefill_step(prompt_len, prefill_chunk)
    dtype = jnp.dtype(dtype)
    quant.check_mode(quantize)
    quant.check_split(cfg.intermediate_size, quantize, sharding.parse_mesh_spec(mesh_spec).get("tensor", 1))
    if topology is None:
        return _dry_run_cpu(cfg, mesh_spec, batch, max_seq_len, prompt_len, dtype, device_memory_gb, capacity_factor,
                            quantize, prefill_chunk)

    topo = topology_lib.parse_topology(topology)
    mesh = sharding.make_mesh(mesh_spec, topology_lib.tpu_devices(topo))
    chip = topo.chip
    run = (cfg, mesh, batch, step_len, max_seq_len, dtype, capacity_factor, chip, quantize)
    pre, dec = _step_report("prefill", *run, chunked), _step_report("decode", *run)
    params = model_lib.abstract_params(cfg, dtype, mesh, quantize=quantize)
    peak = max(pre["peak_bytes_per_device"], dec["peak_bytes_per_device"])
    memory_gb = chip.hbm_gib if device_memory_gb is None else device_memory_gb
    compiled = "does_not_fit" not in pre and "does_not_fit" not in dec
    get = lambda r, key: r[key] if compiled else None
    return {
        **_common(cfg, mesh, dtype, batch, prompt_len, step_len, max_seq_len, capacity_factor, params),
        "quantize": quantize, "platform": "tpu", "topology": topo.name, "chip": chip.name,
        "compiled_as": f"{dtype.name} by the TPU compiler (libtpu) for {topo.name}",
        "peak_bytes_per_device": peak,
        "device_memory_gb": memory_gb,
        "fits": compiled and peak <= memory_gb * GIB,
        "prefill_flops_per_device": get(pre, "flops_per_device"),
        "decode_hbm_bytes_per_device": get(dec, "hbm_bytes_per_device"),
        "decode_collective_bytes_per_device": get(dec, "collective_bytes_per_device"),
        "prefill_collective_bytes_per_device": get(pre, "collective_bytes_per_device"),
        "est_decode_step_s": get(dec, "est_step_s"),
        "est_prefill_tokens_per_s": get(pre, "est_tokens_per_s"),
        "prefill": pre, "decode": dec,
    }


def moe_rows(cfg: MixtralConfig, mesh, tokens: int, capacity_factor: float | None, dtype) -> dict[str, Any]:
    """The MoE block's rows and exchange per device and layer for `tokens` tokens, from the design's
    arithmetic (`expert_parallel.exchange_plan`), against the ideal: the tokens × k assignments split over the
    data × expert shards (each of a shard's `tensor` devices computes its slice of F for them).

    Returns:
      exchange_plan's tokens_per_device, buffer_rows (the static worst case, which the compiler's
      FLOPs count), rows_balanced (rows received at balanced routing) and rows_sent_balanced; and
      ideal_rows; buffer_ratio, balanced_ratio (to the ideal); grouped_ffn ("batched product" up to
      moe.DENSE_MAX_ROWS rows: every local expert on every row of the buffer, whatever the routing;
      else "ragged_dot": the rows received); rows_computed_balanced and computed_ratio; exchange
      (the collective: "ragged-all-to-all", "all-to-all" of fixed slots where the compiler lacks
      it, None on one device); buffer_bytes (buffer_rows × D × itemsize); and at balanced routing
      sent_bytes_balanced and returned_bytes_balanced (rows, F-partials when tensor > 1, come
      back in `dtype`), what a ragged exchange moves (an all-to-all moves its whole slots).
    """
    sizes = dict(mesh.shape)
    num_experts, k, d = cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size
    rows = expert_parallel.exchange_plan(tokens, num_experts, k, sizes["expert"], sizes["data"], capacity_factor)
    ideal = tokens * k / (sizes["data"] * sizes["expert"])
    batched = rows["buffer_rows"] <= moe.DENSE_MAX_ROWS
    computed = rows["buffer_rows"] * num_experts // sizes["expert"] if batched else rows["rows_balanced"]
    itemsize = jnp.dtype(dtype).itemsize
    exchange = None if mesh.size == 1 else (
        "ragged-all-to-all" if expert_parallel.has_ragged_all_to_all(mesh.devices) else "all-to-all")
    return {
        **rows, "ideal_rows": ideal,
        "buffer_ratio": rows["buffer_rows"] / ideal, "balanced_ratio": rows["rows_balanced"] / ideal,
        "grouped_ffn": "batched product" if batched else "ragged_dot",
        "rows_computed_balanced": computed, "computed_ratio": computed / ideal,
        "exchange": exchange,
        "buffer_bytes": rows["buffer_rows"] * d * itemsize,
        "sent_bytes_balanced": rows["rows_sent_balanced"] * d * itemsize,
        "returned_bytes_balanced": rows["rows_sent_balanced"] * d * itemsize,
    }


def _common(cfg, mesh, dtype, batch, prompt_len, step_len, max_seq_len, capacity_factor, params) -> dict[str, Any]:
    cache = _abstract_cache(cfg, batch, max_seq_len, mesh, dtype)
    return {
        "config": cfg.name, "mesh": dict(mesh.shape), "devices": mesh.size, "dtype": dtype.name, "batch": batch,
        "prompt_len": prompt_len, "prefill_step_len": step_len, "max_seq_len": max_seq_len,
        "capacity_factor": capacity_factor,
        "params_bytes_per_device": _bytes_per_device(params),
        "params_bytes_total": sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params)),
        "kv_cache_bytes_per_device": _bytes_per_device(cache),
        "moe": {"prefill": moe_rows(cfg, mesh, batch * step_len, capacity_factor, dtype),
                "decode": moe_rows(cfg, mesh, batch, capacity_factor, dtype)},
    }


def _dry_run_cpu(cfg, mesh_spec, batch, max_seq_len, prompt_len, dtype, device_memory_gb, capacity_factor,
                 quantize=None, prefill_chunk=None):
    """The plan on virtual CPU devices: exact params and cache, float32 temporaries as an upper bound."""
    n = mesh_size(mesh_spec)
    if len(jax.devices("cpu")) < n:
        return _dry_run_in_subprocess(cfg, mesh_spec, n, batch=batch, max_seq_len=max_seq_len, prompt_len=prompt_len,
                                      dtype=dtype.name, device_memory_gb=device_memory_gb,
                                      capacity_factor=capacity_factor, quantize=quantize,
                                      prefill_chunk=prefill_chunk)
    mesh = sharding.make_mesh(mesh_spec, jax.devices("cpu")[:n])
    t0 = time.perf_counter()
    step_len, chunked = _prefill_step(prompt_len, prefill_chunk)
    prefill_c = _compile("prefill", cfg, mesh, batch, step_len, max_seq_len, jnp.float32, capacity_factor, quantize,
                         chunked)
    t1 = time.perf_counter()
    decode_c = _compile("decode", cfg, mesh, batch, prompt_len, max_seq_len, jnp.float32, capacity_factor, quantize)
    seconds = (t1 - t0, time.perf_counter() - t1)
    common = _common(cfg, mesh, dtype, batch, prompt_len, step_len, max_seq_len, capacity_factor,
                     model_lib.abstract_params(cfg, dtype, mesh, quantize=quantize))
    temps = {"prefill": prefill_c.memory_analysis().temp_size_in_bytes,
             "decode": decode_c.memory_analysis().temp_size_in_bytes}
    peak = common["params_bytes_per_device"] + common["kv_cache_bytes_per_device"] + max(temps.values())
    return {
        **common, "quantize": quantize, "platform": "cpu", "topology": None, "chip": None,
        "compiled_as": "float32 by XLA:CPU on virtual devices: temporaries are an upper bound for "
                       f"{dtype.name} (pass a TPU topology for the TPU compiler's own figures)",
        "peak_bytes_per_device": peak,
        "device_memory_gb": device_memory_gb,
        "fits": None if device_memory_gb is None else peak <= device_memory_gb * GIB,
        "prefill_flops_per_device": None, "decode_hbm_bytes_per_device": None,
        "decode_collective_bytes_per_device": None, "prefill_collective_bytes_per_device": None,
        "est_decode_step_s": None, "est_prefill_tokens_per_s": None,
        "prefill": {"temp_bytes_per_device": temps["prefill"]}, "decode": {"temp_bytes_per_device": temps["decode"]},
        "compile_seconds": {"prefill": round(seconds[0], 1), "decode": round(seconds[1], 1)},
    }


def _dry_run_in_subprocess(cfg: MixtralConfig, mesh_spec: str, n: int, **kwargs) -> dict[str, Any]:
    """Runs `dry_run` in a fresh interpreter that starts with `n` virtual CPU devices."""
    code = ("import json, sys\n"
            "from mixtral_jax import plan\n"
            "from mixtral_jax.config import from_hf_dict\n"
            "args = json.loads(sys.stdin.read())\n"
            "assert plan.ensure_virtual_devices(args['n'])\n"
            "cfg = from_hf_dict(args['cfg'], name=args['name'])\n"
            "print(json.dumps(plan.dry_run(cfg, args['mesh_spec'], **args['kwargs'])))\n")
    args = {"n": n, "cfg": cfg.to_hf_dict(), "name": cfg.name, "mesh_spec": mesh_spec, "kwargs": kwargs}
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], input=json.dumps(args), capture_output=True, text=True,
                            env=env, check=False)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"the dry run subprocess for mesh {mesh_spec!r} failed: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def summary(plan: dict[str, Any], max_collectives: int = 4) -> str:
    """Human-readable lines for a `dry_run` result."""
    gib = lambda b: f"{b / GIB:.2f} GiB"
    mesh = ",".join(f"{k}={v}" for k, v in plan["mesh"].items() if v > 1) or "one device"
    where = f"{plan['topology']} ({plan['devices']} chips)" if plan["topology"] else f"{plan['devices']} CPU devices"
    experts = f" (quantized {plan['quantize']})" if plan.get("quantize") else ""
    lines = [
        f"{plan['config']} {plan['dtype']}{experts} on {where}, mesh {mesh}, batch {plan['batch']}, "
        f"KV cache {plan['max_seq_len']} tokens, prefill {plan['prompt_len']} tokens"
        + (f" in chunks of {plan['prefill_step_len']}" if plan["prefill_step_len"] < plan["prompt_len"] else "")
        + f"; compiled as {plan['compiled_as']}:",
        f"  params      {gib(plan['params_bytes_per_device'])} per device",
        f"  KV cache    {gib(plan['kv_cache_bytes_per_device'])} per device",
    ]
    refused = [s for s in ("prefill", "decode") if "does_not_fit" in plan[s]]
    for step in refused:
        r = plan[step]["does_not_fit"]
        lines.append(f"  {step}: the TPU compiler needs {gib(r['needed_bytes_per_device'])} per device, "
                     f"{gib(r['available_bytes_per_device'])} are available")
    if not refused:
        lines += [f"  temporaries prefill {gib(plan['prefill']['temp_bytes_per_device'])}, "
                  f"decode {gib(plan['decode']['temp_bytes_per_device'])} per device",
                  f"  peak        {gib(plan['peak_bytes_per_device'])} per device"]
    if plan["fits"] is not None:
        lines.append(f"  {'fits' if plan['fits'] else 'does NOT fit'} in {plan['device_memory_gb']} GiB per device")
    lines.append("  MoE per layer and device (expert_parallel.exchange_plan; ideal: tokens x k / (data x expert) rows):")
    for step in ("prefill", "decode"):
        m = plan["moe"][step]
        moved = ("" if m["exchange"] is None else
                 f"; {m['exchange']}" + (f", at balanced routing {_si(m['sent_bytes_balanced'], 'B')} out and "
                                         f"{_si(m['returned_bytes_balanced'], 'B')} back"
                                         if m["exchange"] == "ragged-all-to-all" else " of fixed slots"))
        lines.append(f"  {step:<8} buffer {m['buffer_rows']:,} rows ({m['buffer_ratio']:.2f}x the ideal "
                     f"{m['ideal_rows']:,.0f}), computed at balanced routing {m['rows_computed_balanced']:,} "
                     f"({m['computed_ratio']:.2f}x, {m['grouped_ffn']}){moved}")
    if plan["platform"] == "tpu" and not refused:
        lines.append(f"  roofline on {plan['chip']} (published peak FLOP/s, HBM and ICI bandwidth; the slowest "
                     "of the three), per step and device:")
        for step in ("prefill", "decode"):
            r = plan[step]
            tokens = plan["batch"] * (plan["prefill_step_len"] if step == "prefill" else 1)
            lines.append(
                f"  {step:<8} {_si(r['flops_per_device'], 'FLOP')}, HBM {_si(r['hbm_bytes_per_device'], 'B')}, "
                f"collectives {_si(r['collective_bytes_per_device'], 'B')}: {r['est_step_s'] * 1e3:.2f} ms "
                f"({r['bound']}-bound), {tokens / r['est_step_s']:,.0f} tokens/s"
                + ("" if r["costs_exact"] else " (other loops counted once: FLOPs and bytes are lower bounds)"))
            for c in r["collectives"][:max_collectives]:
                lines.append(f"      {c['op']:<18} {c['shape']:<24} {_si(c['bytes'], 'B'):>10} x {c['count']:<3} "
                             f"{c['op_name'].split('/', 1)[-1][-60:]}")
    return "\n".join(lines)
