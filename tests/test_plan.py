"""Dry run: per-device bytes of params and KV cache vs hand arithmetic; compiled temporaries; fits; errors."""

import json
import os
import subprocess
import sys

import pytest

import mixtral_jax as mj
from mixtral_jax import plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_dry_run_8x7b_on_8_devices_matches_arithmetic():
    cfg = mj.load_config("8x7b")
    result = plan.dry_run(cfg, "expert=4,tensor=2", batch=8, max_seq_len=4096, prompt_len=256,
                          device_memory_gb=16)
    assert result["devices"] == 8 and result["mesh"] == {"data": 1, "expert": 4, "tensor": 2}
    assert result["params_bytes_per_device"] == _hand_params_bytes(cfg, 4, 2, 2)
    assert result["params_bytes_total"] == mj.param_count(cfg)["total"] * 2
    assert result["kv_cache_bytes_per_device"] == _hand_cache_bytes(cfg, 8, 4096, 4, 2, 2)  # batch over expert
    # XLA's own count of the float32 compile's inputs: params + cache (+ 2 small token arrays, 2 scalars, a key).
    f32_inputs = _hand_params_bytes(cfg, 4, 2, 4) + _hand_cache_bytes(cfg, 8, 4096, 4, 2, 4)
    assert 0 <= result["xla_float32_argument_bytes_per_device"]["decode"] - f32_inputs < 64
    assert 0 < result["decode_temp_bytes_per_device"] and 0 < result["prefill_temp_bytes_per_device"]
    assert result["temp_bytes_per_device"] == max(result["decode_temp_bytes_per_device"],
                                                  result["prefill_temp_bytes_per_device"])
    total = result["params_bytes_per_device"] + result["kv_cache_bytes_per_device"] + result["temp_bytes_per_device"]
    assert result["total_bytes_per_device"] == total
    assert result["fits"] == (total <= 16 * 2**30)
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


@pytest.mark.parametrize("spec,match", [
    ("expert=16", "expert=16 does not divide num_local_experts=8"),
    ("tensor=64", "tensor=64 does not divide num_attention_heads=32"),
    ("expert=8,model=8", "bad mesh spec"),
])
def test_dry_run_bad_mesh_is_a_clear_error(spec, match):
    with pytest.raises(ValueError, match=match):
        plan.dry_run("8x7b", spec)


def test_ensure_virtual_devices_after_start_reports_false():
    assert plan.mesh_size("data=2,expert=4,tensor=8") == 64
    assert mj.make_mesh("expert=8").size == 8  # backends are running in the test process
    assert plan.ensure_virtual_devices(64) is False


def test_sample_cli_dry_run_json():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)  # the CLI must create the 64 virtual devices itself
    r = subprocess.run([sys.executable, "-m", "mixtral_jax.sample", "--config", "8x22b", "--dry_run", "--mesh",
                        "expert=8,tensor=8", "--batch", "2", "--max_seq_len", "1024", "--device_memory_gb", "16",
                        "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"devices", "params_bytes_per_device", "kv_cache_bytes_per_device", "temp_bytes_per_device",
            "fits"} <= set(out)
    assert out["devices"] == 64 and out["fits"] is True
    # bf16 KV cache: 56 layers x (k, v) x batch 2 x 1024 x 8 kv heads x 128 x 2 bytes, kv heads split over
    # tensor=8; expert=8 does not divide batch 2, so batch is replicated; plus int32 positions [2, 1024].
    kv = 56 * 2 * 2 * 1024 * 8 * 128 * 2 // 8 + 2 * 1024 * 4
    assert out["kv_cache_bytes_per_device"] == kv
