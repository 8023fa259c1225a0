"""Dry run: per-device bytes of params and KV cache vs hand arithmetic; the CPU plan (float32 upper
bound); the TPU plan compiled by libtpu for abstract topologies (tiny configs): costs corrected for
the layer scan, collectives counted per layer, no parameter moved at run time; the CLI."""

import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mixtral_jax as mj
from mixtral_jax import hlo, model as model_lib, plan, quant, sharding, topology
from mixtral_jax.config import from_hf_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# For TPU compiles: weights large next to the activations of a small batch, so a gathered
# parameter stands out by size (the smallest weight matrix, wk or wv of one layer, is 64 KiB;
# the largest activation a collective moves here is 32 KiB). 8 layers: a missing x L shows.
TPU_TEST = from_hf_dict(dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=32, num_local_experts=8,
                             num_experts_per_tok=2, max_position_embeddings=1024, rope_theta=1e6),
                        name="tpu_test")
SMALLEST_WEIGHT_BYTES = 256 * 4 * 32 * 2  # wk [D, K, Dh] of one layer in bf16
TPU_WORKLOAD = dict(batch=8, prompt_len=32, max_seq_len=64)  # prefill rows beyond moe.DENSE_MAX_ROWS: ragged_dot


def _hand_params_bytes(cfg, expert, tensor, itemsize):
    """Per-device parameter bytes from the shapes, written out by hand: experts split over
    expert × tensor; q/o heads, vocab and (when tensor divides them) kv heads over tensor;
    norms and router replicated."""
    l, d, f, e = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    h, k, dh, v = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size
    kv_split = tensor if k % tensor == 0 else 1
    elements = (3 * l * e * d * f / (expert * tensor)           # w1, w3, w2
                + 2 * l * d * h * dh / tensor                  # wq, wo
                + 2 * l * d * k * dh / kv_split                # wk, wv
                + 2 * v * d / tensor                           # embed, lm_head
                + l * d * e + 2 * l * d + d)                   # router, norms
    return int(elements * itemsize)


def _hand_cache_bytes(cfg, batch, seq, batch_split, tensor, itemsize):
    """Per-device KV-cache bytes; `batch_split` is how many ways the rules split the batch."""
    kv_split = tensor if cfg.num_key_value_heads % tensor == 0 else 1
    b = batch // batch_split
    kv = 2 * cfg.num_hidden_layers * b * seq * cfg.num_key_value_heads * cfg.head_dim // kv_split
    return kv * itemsize + b * seq * 4  # + pos int32 [B, S]


def _parameter_sized_gathers(collectives):
    return [c for c in collectives if c["op"] == "all-gather" and c["bytes"] >= SMALLEST_WEIGHT_BYTES]


# ---------------------------------------------------------------- CPU plan (float32 upper bound)


def test_dry_run_8x7b_on_8_devices_matches_arithmetic():
    cfg = mj.load_config("8x7b")
    result = plan.dry_run(cfg, "expert=4,tensor=2", batch=8, max_seq_len=4096, prompt_len=256,
                          device_memory_gb=16)
    assert result["platform"] == "cpu" and result["topology"] is None and "upper bound" in result["compiled_as"]
    assert result["devices"] == 8 and result["mesh"] == {"data": 1, "expert": 4, "tensor": 2}
    assert result["params_bytes_per_device"] == _hand_params_bytes(cfg, 4, 2, 2)
    assert result["params_bytes_total"] == mj.param_count(cfg)["total"] * 2
    assert result["kv_cache_bytes_per_device"] == _hand_cache_bytes(cfg, 8, 4096, 4, 2, 2)  # batch over expert
    temps = result["prefill"]["temp_bytes_per_device"], result["decode"]["temp_bytes_per_device"]
    assert min(temps) > 0
    peak = result["params_bytes_per_device"] + result["kv_cache_bytes_per_device"] + max(temps)
    assert result["peak_bytes_per_device"] == peak
    assert result["fits"] == (peak <= 16 * 2**30)
    assert result["est_decode_step_s"] is None and result["decode_collective_bytes_per_device"] is None
    assert "fits" in plan.summary(result) and "12.00 GiB" in plan.summary(result)


def test_dry_run_8x22b_on_64_devices_in_a_subprocess():
    # The test process has 8 devices, so the planner starts a fresh process with 64.
    cfg = mj.load_config("8x22b")
    result = plan.dry_run("8x22b", "expert=8,tensor=8", batch=1, max_seq_len=8192, prompt_len=128,
                          device_memory_gb=95)
    assert result["devices"] == 64
    assert result["params_bytes_per_device"] == _hand_params_bytes(cfg, 8, 8, 2)
    assert result["params_bytes_total"] == 140_630_071_296 * 2
    # The experts split 64 ways, but attention (48 heads, 4.9B parameters) and the vocab only 8 ways:
    # a device holds about 1.27x the even share total / 64.
    ratio = result["params_bytes_per_device"] / (140_630_071_296 * 2 / 64)
    assert 1.2 < ratio < 1.3
    assert result["kv_cache_bytes_per_device"] == _hand_cache_bytes(cfg, 1, 8192, 1, 8, 2)
    assert result["fits"] is True


def test_dry_run_kv_heads_replicated_when_tensor_exceeds_them():
    cfg = mj.load_config("8x7b")  # 8 kv heads on tensor=16: kept whole on every tensor shard
    result = plan.dry_run(cfg, "tensor=16", max_seq_len=1024, prompt_len=16)
    assert result["params_bytes_per_device"] == _hand_params_bytes(cfg, 1, 16, 2)
    assert result["kv_cache_bytes_per_device"] == _hand_cache_bytes(cfg, 1, 1024, 1, 16, 2)
    assert result["fits"] is None


@pytest.mark.parametrize("spec,batch,prefill,decode", [
    # prefill 8 x 32 tokens, 64 per expert shard (shared by its 2 tensor peers); dropless: a device
    # may send one shard all its tokens x min(k, E_loc) = 128 rows, so a buffer of 4 sources x 128 =
    # 512 rows against the ideal 256 x 2 / 4 = 128; balanced routing brings E_loc x 256 x 2 / 8 = 128
    # (ragged_dot computes those).
    # Decode, 8 tokens: 8 x 2 = 16 rows, ideal 4; at most 128 rows: the batched product computes all
    # 16 on both local experts, 32 rows.
    ("expert=4,tensor=2", 8, (512, 128, 128, "ragged_dot", 128), (16, 4, 4, "batched product", 32)),
    # One expert per device: a token sends a shard at most one row, so prefill's buffer is 8 sources x
    # 8 tokens = 64 rows (ideal 64 x 2 / 8 = 16). Decode of 2 tokens on 8 devices: the 6 padding rows
    # are never sent, so the buffer holds 2 rows, not 8 sources x 1.
    ("expert=8", 2, (64, 16, 16, "batched product", 64), (2, 0.5, 0, "batched product", 2)),
])
def test_moe_rows_against_hand_arithmetic(spec, batch, prefill, decode):
    mesh = mj.make_mesh(spec)
    tokens = {"prefill": batch * 32, "decode": batch}
    for step, (buffer, ideal, balanced, ffn, computed) in (("prefill", prefill), ("decode", decode)):
        m = plan.moe_rows(TPU_TEST, mesh, tokens[step], None, jnp.bfloat16)
        assert (m["buffer_rows"], m["ideal_rows"], m["rows_balanced"]) == (buffer, ideal, balanced), step
        assert (m["grouped_ffn"], m["rows_computed_balanced"]) == (ffn, computed), step
        assert m["buffer_ratio"] == buffer / ideal and m["buffer_bytes"] == buffer * 256 * 2, step
        assert m["exchange"] == "all-to-all", step  # XLA:CPU has no ragged-all-to-all


@pytest.mark.parametrize("spec,kwargs,match", [
    ("expert=16", {}, r"expert=16 does not divide num_local_experts=8; choose expert from 1, 2, 4 or 8\."),
    ("tensor=64", {}, "tensor=64 does not divide num_attention_heads=32"),
    ("expert=8,model=8", {}, "bad mesh spec"),
    ("expert=8", dict(topology="v5e:8x8"), r"has 8 devices but 64 are available; .* from 1, 2, 4, 8, 16, 32 or 64"),
    ("expert=8", dict(topology="v5e:2x2x2"), "v5e slices are 2-D, write v5e:AxB"),
    ("expert=8", dict(topology="v7:2x4"), "unknown topology 'v7:2x4'"),
])
def test_dry_run_bad_input_is_a_clear_error(spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan.dry_run("8x7b", spec, **kwargs)


def test_topology_needs_libtpu(monkeypatch):
    monkeypatch.setattr(topology, "libtpu_installed", lambda: False)
    with pytest.raises(ValueError, match=r"install it with pip install -e \"\.\[tpu\]\""):
        topology.tpu_devices("v5e:2x4")


def test_ensure_virtual_devices_after_start_reports_false():
    assert plan.mesh_size("data=2,expert=4,tensor=8") == 64
    assert mj.make_mesh("expert=8").size == 8  # backends are running in the test process
    assert plan.ensure_virtual_devices(64) is False


# ---------------------------------------------------------------- TPU plan (libtpu, abstract topologies)


@pytest.mark.parametrize("name,chips,wrap,per_host", [
    ("v5e:1x1", 1, (False, False, False), (1, 1, 1)),
    ("v5e:2x4", 8, (False, False, False), (2, 2, 1)),
    ("v5e:16x16", 256, (True, True, False), (2, 2, 1)),
    ("v6e:4x4", 16, (False, False, False), (2, 2, 1)),
    ("v4:2x2x1", 4, (False, False, False), (2, 2, 1)),
    ("v5p:4x4x4", 64, (True, True, True), (2, 2, 1)),
    ("v5p:2x4x4", 32, (False, False, False), (2, 2, 1)),
])
def test_topology_names_as_maxtext_spells_them(name, chips, wrap, per_host):
    topo = topology.parse_topology(name)
    assert (topo.name, topo.num_chips, topo.wrap, topo.chips_per_host) == (name, chips, wrap, per_host)
    devices = topology.tpu_devices(name)
    assert len(devices) == chips and all(d.platform == "tpu" for d in devices)


def test_collectives_counted_once_per_loop_trip():
    # A psum inside a 5-step scan: the HLO holds one all-reduce, which runs 5 times per call.
    mesh = jax.sharding.Mesh(np.array(topology.tpu_devices("v5e:2x4")), ("x",))

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
    def f(x):  # x [128, 256] f32 per device
        return jax.lax.scan(lambda c, _: (c + 0.5 * jax.lax.psum(c, "x"), None), x, None, length=5)[0]

    text = f.lower(jax.ShapeDtypeStruct((8 * 128, 256), jnp.float32, sharding=NamedSharding(mesh, P("x")))
                   ).compile().as_text()
    found = hlo.collectives(text)
    assert [(c.op, c.bytes, c.count, c.group_size) for c in found] == [("all-reduce", 128 * 256 * 4, 5, 8)]
    assert hlo.total_bytes(found) == 5 * 128 * 256 * 4
    assert hlo.loops(text) == [hlo.Loop(trips=5, starts=1)]


@functools.lru_cache(maxsize=None)
def _tpu_plan(topology_name, spec, num_layers=TPU_TEST.num_hidden_layers):
    cfg = dataclasses.replace(TPU_TEST, num_hidden_layers=num_layers)
    return plan.dry_run(cfg, spec, topology=topology_name, **TPU_WORKLOAD)


def test_tpu_plan_bytes_and_costs_against_hand_arithmetic():
    cfg, b, t, s = TPU_TEST, TPU_WORKLOAD["batch"], TPU_WORKLOAD["prompt_len"], TPU_WORKLOAD["max_seq_len"]
    r = _tpu_plan("v5e:2x4", "expert=4,tensor=2")
    assert (r["platform"], r["topology"], r["devices"], r["chip"]) == ("tpu", "v5e:2x4", 8, "v5e")
    assert r["params_bytes_per_device"] == _hand_params_bytes(cfg, 4, 2, 2)
    assert r["kv_cache_bytes_per_device"] == _hand_cache_bytes(cfg, b, s, 4, 2, 2)
    # The compiler's peak holds at least the inputs: every weight and the cache.
    assert r["peak_bytes_per_device"] >= r["params_bytes_per_device"] + r["kv_cache_bytes_per_device"]
    assert r["fits"] is True and r["device_memory_gb"] == 16
    # Whole-model FLOPs, by hand: any implementation does at least the ideal matrix products of the
    # active parameters for every token (summed over the 8 devices), the dropless expert-parallel
    # MoE at most E/k times that. Without the scan correction the 8 layers would count once.
    d, f, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    attn = 2 * d * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim \
        + 2 * cfg.num_attention_heads * cfg.head_dim * d
    moe_ideal = 2 * 3 * d * f * k
    tokens = b * t
    ideal = tokens * cfg.num_hidden_layers * (attn + moe_ideal) + 2 * b * d * cfg.vocab_size
    total = r["prefill_flops_per_device"] * r["devices"]
    assert ideal <= total <= tokens * cfg.num_hidden_layers * (attn + moe_ideal * e / k) * 1.5 + 2 * b * d * cfg.vocab_size
    # A decode step reads every weight it holds at least once (the embedding only in the rows it looks up);
    # the cost model also counts copies into on-chip memory, which for weights this small hold all of them.
    embed_bytes = cfg.vocab_size * d * 2 // 2
    held = r["params_bytes_per_device"] + r["kv_cache_bytes_per_device"]
    assert held - embed_bytes <= r["decode_hbm_bytes_per_device"] <= 4 * held
    assert r["prefill"]["costs_exact"] and r["decode"]["costs_exact"]
    # The roofline: the slowest of compute, memory and collectives at the chip's published rates.
    chip = topology.CHIPS["v5e"]
    dec = r["decode"]
    assert r["est_decode_step_s"] == max(dec["flops_per_device"] / chip.bf16_flops,
                                         dec["hbm_bytes_per_device"] / chip.hbm_bytes_per_s,
                                         dec["collective_bytes_per_device"] / chip.ici_bytes_per_s)
    pre = r["prefill"]
    assert r["est_prefill_tokens_per_s"] == pytest.approx(tokens / pre["est_step_s"])
    # Collectives run once per layer inside the scan: the per-step total is their sum times the count.
    assert r["decode_collective_bytes_per_device"] == sum(c["bytes"] * c["count"] for c in dec["collectives"])
    assert any(c["count"] == cfg.num_hidden_layers for c in dec["collectives"])


@pytest.mark.parametrize("topology_name,spec", [("v5e:2x4", "expert=4,tensor=2"), ("v5p:4x4x4", "expert=8,tensor=8")])
def test_tpu_prefill_and_decode_move_no_parameter(topology_name, spec):
    r = _tpu_plan(topology_name, spec)
    for step in ("prefill", "decode"):
        assert r[step]["collectives"], step
        assert _parameter_sized_gathers(r[step]["collectives"]) == [], step


@pytest.mark.parametrize("topology_name,spec,exchange", [("v5e:2x4", "expert=4,tensor=2", "ragged-all-to-all"),
                                                          ("v5e:8x8", "expert=8,tensor=8", "all-to-all")])
def test_tpu_moe_exchange_is_what_the_compiler_has(topology_name, spec, exchange):
    # libtpu refuses ragged-all-to-all on v5e slices of more than 16 chips: there the plan (and the
    # program it compiled) exchange fixed slots with a plain all-to-all.
    r = _tpu_plan(topology_name, spec)
    for step in ("prefill", "decode"):
        assert r["moe"][step]["exchange"] == exchange, step
        ops = {c["op"] for c in r[step]["collectives"]}
        assert exchange in ops, (step, ops)
        assert exchange == "ragged-all-to-all" or "ragged-all-to-all" not in ops, (step, ops)
    assert f"{exchange}" in plan.summary(r)


def test_tpu_plan_of_a_chunked_prefill_compiles_one_chunk():
    # generate(prefill_chunk=16) on 32-token prompts: the plan's prefill step is one 16-token chunk
    # written at a traced slot. Its FLOPs (the compiler's, scan-corrected) are those of b x 16 tokens
    # by hand, and its temporaries no more than the whole prompt's.
    cfg, b = TPU_TEST, TPU_WORKLOAD["batch"]
    r = plan.dry_run(cfg, "expert=4,tensor=2", topology="v5e:2x4", prefill_chunk=16, **TPU_WORKLOAD)
    whole = _tpu_plan("v5e:2x4", "expert=4,tensor=2")
    assert (r["prompt_len"], r["prefill_step_len"], whole["prefill_step_len"]) == (32, 16, 32)
    d, f, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    attn = 2 * d * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim \
        + 2 * cfg.num_attention_heads * cfg.head_dim * d
    tokens = b * 16
    ideal = tokens * cfg.num_hidden_layers * (attn + 2 * 3 * d * f * k) + 2 * b * d * cfg.vocab_size
    total = r["prefill_flops_per_device"] * r["devices"]
    assert ideal <= total <= tokens * cfg.num_hidden_layers * (attn + 2 * 3 * d * f * e) * 1.5 + 2 * b * d * cfg.vocab_size
    assert r["moe"]["prefill"]["tokens_per_device"] * 2 == whole["moe"]["prefill"]["tokens_per_device"]
    assert r["prefill"]["temp_bytes_per_device"] <= whole["prefill"]["temp_bytes_per_device"]
    assert "prefill 32 tokens in chunks of 16" in plan.summary(r)


def test_tpu_plan_too_big_for_the_chip_reports_what_the_compiler_needs():
    # Experts of 6 GiB per layer and device: the TPU compiler refuses a program larger than HBM.
    cfg = dataclasses.replace(TPU_TEST, intermediate_size=4 * 1024 * 1024, num_hidden_layers=4)
    r = plan.dry_run(cfg, "expert=8", topology="v5e:2x4", **TPU_WORKLOAD)
    assert r["fits"] is False and r["est_decode_step_s"] is None and r["prefill_flops_per_device"] is None
    assert r["params_bytes_per_device"] == _hand_params_bytes(cfg, 8, 1, 2)  # 24 GiB
    for step in ("prefill", "decode"):
        refused = r[step]["does_not_fit"]
        assert refused["needed_bytes_per_device"] >= r["params_bytes_per_device"] - 2**30 // 100  # 2 decimals of GiB
        assert refused["available_bytes_per_device"] < 16 * 2**30
    assert "the TPU compiler needs" in plan.summary(r)


def test_parameter_gather_check_can_fail():
    # The check above catches a gathered weight: replicate the vocab-sharded lm_head on purpose.
    mesh = sharding.make_mesh("expert=4,tensor=2", topology.tpu_devices("v5e:2x4"))
    lm_head = model_lib.abstract_params(TPU_TEST, "bfloat16", mesh)["lm_head"]
    compiled = jax.jit(lambda w: w * 2, out_shardings=NamedSharding(mesh, P())).lower(lm_head).compile()
    found = [{"op": c.op, "bytes": c.bytes} for c in hlo.collectives(compiled.as_text())]
    assert _parameter_sized_gathers(found) == [{"op": "all-gather", "bytes": 256 * 1024 * 2}]


# ---------------------------------------------------------------- the CLI


def _env_without_platform():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)  # the CLI must create its virtual devices itself
    env.pop("JAX_PLATFORMS", None)  # and pick the CPU itself with libtpu installed and no TPU attached
    return env


def test_sample_cli_dry_run_json():
    r = subprocess.run([sys.executable, "-m", "mixtral_jax.sample", "--config", "8x22b", "--dry_run", "--mesh",
                        "expert=8,tensor=8", "--batch", "2", "--max_seq_len", "1024", "--prompt_len", "128",
                        "--device_memory_gb", "16", "--json"], capture_output=True, text=True,
                       env=_env_without_platform(), timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["devices"] == 64 and out["fits"] is True and out["platform"] == "cpu" and out["prompt_len"] == 128
    # bf16 KV cache: 56 layers x (k, v) x batch 2 x 1024 x 8 kv heads x 128 x 2 bytes, kv heads split over
    # tensor=8; expert=8 does not divide batch 2, so batch is replicated; plus int32 positions [2, 1024].
    kv = 56 * 2 * 2 * 1024 * 8 * 128 * 2 // 8 + 2 * 1024 * 4
    assert out["kv_cache_bytes_per_device"] == kv


def test_sample_cli_tpu_dry_run_that_does_not_fit_exits_2_with_the_plan(tmp_path):
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(dataclasses.replace(TPU_TEST, num_hidden_layers=2).to_hf_dict()))
    r = subprocess.run([sys.executable, "-m", "mixtral_jax.sample", "--config", str(cfg_path), "--dry_run",
                        "--topology", "v5e:2x4", "--mesh", "expert=8", "--batch", "8", "--max_seq_len", "64",
                        "--prompt_len", "4", "--device_memory_gb", "0.001", "--json"],
                       capture_output=True, text=True, env=_env_without_platform(), timeout=300)
    assert r.returncode == 2, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    keys = {"platform", "topology", "devices", "batch", "prompt_len", "max_seq_len", "capacity_factor", "fits",
            "params_bytes_per_device", "kv_cache_bytes_per_device", "peak_bytes_per_device",
            "prefill_flops_per_device", "decode_hbm_bytes_per_device", "decode_collective_bytes_per_device",
            "prefill_collective_bytes_per_device", "est_decode_step_s", "est_prefill_tokens_per_s"}
    assert keys <= set(out)
    assert (out["platform"], out["topology"], out["devices"], out["fits"]) == ("tpu", "v5e:2x4", 8, False)
    assert out["est_decode_step_s"] > 0 and out["est_prefill_tokens_per_s"] > 0
    # libtpu finds no TPU here and says nothing about it.
    assert "TPU_ACCELERATOR_TYPE" not in r.stderr and "TPU_WORKER_HOSTNAMES" not in r.stderr, r.stderr


# Experts big enough that the compiler cannot keep a layer's weights on chip, so what a decode step
# reads from HBM shows in the cost analysis.
MID = from_hf_dict(dict(vocab_size=1024, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=128, num_local_experts=8,
                        num_experts_per_tok=2, max_position_embeddings=1024, rope_theta=1e6), name="mid")


@pytest.mark.parametrize("topo,mesh,quantize,most", [("v5e:2x4", "expert=8", None, 1.6),
                                                     ("v5e:1x1", "expert=1", "int8", 1.3),
                                                     ("v5e:2x2", "expert=2,tensor=2", "int8", 1.3)])
def test_tpu_decode_reads_the_weights_about_once(topo, mesh, quantize, most):
    # A decode step is memory-bound: it should read every weight it holds about once. A grouped
    # matmul that copies each layer's experts out of the layer scan's stacked buffer first (what
    # lax.ragged_dot's custom call makes XLA do) reads them three times: 2.9-3.1x here. int8
    # (experts, attention projections, lm_head): each dequantize must fuse into its product, not write
    # the float weights out; the attention projections' scales per 32 inputs stop that fusion in XLA
    # (1.46x on one chip), so on TPU they go through quant_tpu.py's kernels, on a mesh of several chips
    # under shard_map (XLA cannot partition a Pallas call).
    r = plan.dry_run(MID, mesh, batch=8, max_seq_len=256, prompt_len=16, topology=topo, quantize=quantize)
    held = r["params_bytes_per_device"] + r["kv_cache_bytes_per_device"]
    assert r["decode"]["costs_exact"]
    assert held <= r["decode_hbm_bytes_per_device"] <= most * held


def test_tpu_int4_experts_are_read_as_stored_not_dequantized_first():
    # int4's scales run along the contracted axis, so XLA cannot fuse its dequantize into the product: it
    # wrote each layer's experts out in float32 first, a decode step reading 34x the bytes it holds. The
    # Pallas kernel (quant_tpu.py) reads the nibbles where they lie in the stacked weights (the layer scan
    # passes them whole, with the layer's index): no float expert, and no copy of a layer's nibbles.
    from mixtral_jax import layout, moe

    dev = jax.sharding.SingleDeviceSharding(topology.tpu_devices("v5e:1x1")[0])
    arg = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=dev)
    layers, e, m, d, f = 4, 8, 8, 2048, 8192  # a layer's experts too big for the chip's VMEM
    q = lambda k, n: {"qvalue": arg(jnp.uint8, layers, e, k // 2, n), "scale": arg(jnp.float16, layers, e, k // 32, n)}
    params = {"layers": {"attn_norm": arg(jnp.bfloat16, layers, d), "w1": q(d, f), "w3": q(d, f), "w2": q(f, d)}}

    def decode(x, params):
        body = lambda h, lp, cache, layer: (h + jnp.sum(moe.every_expert(h, lp), 0).astype(h.dtype), None, None)
        return layout.Stacked.layers(params, x, None, body, last_only=False)[0]

    compiled = jax.jit(decode).lower(arg(jnp.bfloat16, m, d), params).compile()
    text = compiled.as_text()
    assert text.count('custom_call_target="tpu_custom_call"') == 3
    shapes = [(dtype, tuple(map(int, dims.split(",")))) for dtype, dims in re.findall(r"(\w+)\[([\d,]+)\]", text)]
    for dtype, dims in shapes:
        # A dequantized w1 / w3 / w2 in any dimension order, or a copy of a layer's nibbles.
        assert not (dtype in ("f32", "bf16") and sorted(dims) == sorted((e, d, f)))
        assert not (dtype == "u8" and math.prod(dims) == e * d * f // 2)
    # One layer's bytes (the cost analysis counts a scan body once); what it adds: the float16 scales'
    # bitcast to int16 (Mosaic's float16 loads) and, in the cost model, their whole stack for each slice.
    held = 3 * e * (d // 2 * f + d // quant.GROUP * f * 2)
    cost = compiled.cost_analysis()
    assert (cost[0] if isinstance(cost, list) else cost)["bytes accessed"] < 1.6 * held


@pytest.mark.parametrize("heads", [1, 2, 8])
def test_tpu_int8_attention_kernels_read_a_layers_weights_once(heads):
    # The attention projections' int8 in groups (quant_tpu.py), passed whole with the layer's index as the
    # layer scan passes them: a decode step's product reads that layer's qvalues and scales as they lie,
    # with no copy of the stacked weight (XLA keeps int8 wk / wv of fewer than 4 heads heads-major, which
    # the kernel reads as such).
    from mixtral_jax import quant_tpu

    dev = jax.sharding.SingleDeviceSharding(topology.tpu_devices("v5e:1x1")[0])
    arg = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=dev)
    layers, m, d, dh = 8, 8, 1024, 128
    w = lambda q, scale: {"qvalue": arg(jnp.int8, layers, *q), "scale": arg(jnp.float32, layers, *scale),
                          "layer": arg(jnp.int32)}
    stored = d * heads * dh * (1 + 4 / quant.GROUP)  # one layer's
    g = quant.GROUP
    for fn, x, wt in ((quant_tpu.int8_to_heads, arg(jnp.bfloat16, m, d), w((d, heads, dh), (d // g, heads, dh))),
                      (quant_tpu.int8_from_heads, arg(jnp.bfloat16, m, heads, dh),
                       w((heads, dh, d), (heads, dh // g, d)))):
        compiled = jax.jit(lambda x, w: fn(x, w, jnp.bfloat16)).lower(x, wt).compile()
        cost = compiled.cost_analysis()
        assert (cost[0] if isinstance(cost, list) else cost)["bytes accessed"] < 1.2 * stored


def test_tpu_engine_prefill_moves_its_slots_rows_not_the_whole_cache():
    # The serving engine's prefill call reads and writes P slots of a cache whose slot axis is sharded
    # (v5e:2x4, expert=8: 2 of 16 slots per chip). In the TPU compiler's program its collectives move
    # about those P slots' keys and values, not the whole cache (a slice at a traced index of a sharded
    # axis is an all-gather of everything: 16x these rows here).
    from jax.sharding import Mesh

    from mixtral_jax import slot_steps

    cfg, b, s, p, n = TPU_TEST, 16, 128, 2, 16
    mesh = Mesh(np.array(topology.tpu_devices("v5e:2x4")).reshape(1, 8, 1), sharding.MESH_AXES)
    cache = plan._abstract_cache(cfg, b, s, mesh, jnp.bfloat16)
    rep = NamedSharding(mesh, P())
    arg = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    compiled = slot_steps.prefill_chunk.lower(
        model_lib.abstract_params(cfg, "bfloat16", mesh), arg(jnp.int32, p, n), arg(jnp.int32, p),
        arg(jnp.int32, p), arg(jnp.int32, p), cache, arg(jnp.int32, b), arg(jnp.uint32, p, 2), arg(jnp.float32, p),
        arg(jnp.int32, p), arg(jnp.float32, p), cfg=cfg, strategy="sparse", mesh=mesh).compile()
    moved = hlo.total_bytes(hlo.collectives(compiled.as_text()))
    slot_kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * s * cfg.head_dim * 2  # one slot's k and v, bf16
    assert p * slot_kv <= moved < 2 * p * slot_kv
