"""launch/device_check.py, the accelerator check, on the CPU: its byte model against hand arithmetic and the
stored sizes, and a smoke run of the whole check with quantized weights (on an accelerator the same run
compares the device's logits with the host's)."""

import dataclasses
import importlib.util
import json
import os

import pytest

import mixtral_jax as mj

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("device_check", os.path.join(REPO, "launch", "device_check.py"))
device_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(device_check)

CFG = dataclasses.replace(mj.load_config("8x7b"), num_hidden_layers=2)


@pytest.mark.parametrize("batch", [1, 64])
def test_decode_bytes_in_bfloat16_are_the_parameter_counts_arithmetic(batch):
    # Every weight but the unchosen experts (expected share under random routing), one embedding row per
    # token, and the KV cache, 2 bytes each.
    counts = mj.param_count(CFG)
    e, k, d = CFG.num_local_experts, CFG.num_experts_per_tok, CFG.hidden_size
    experts = (counts["total"] - counts["active"]) * e // (e - k)
    touched = 1 - (1 - k / e) ** batch
    weights = counts["total"] - experts - CFG.vocab_size * d + experts * touched + batch * d
    cache = 2 * CFG.num_hidden_layers * batch * CFG.num_key_value_heads * 2048 * CFG.head_dim
    assert device_check.decode_bytes(CFG, batch, 2048) == pytest.approx(2 * (weights + cache), rel=1e-12)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_decode_bytes_are_the_stored_bytes_when_every_expert_runs(quantize):
    # With enough tokens every expert is read: the whole model as stored, less the embedding but the rows
    # looked up (the embedding: int8, a float32 scale per 32 values, 1.125 bytes a value, in both modes).
    batch = 4096
    stored = mj.param_bytes(CFG, "bfloat16", quantize=quantize)["total"]
    embed = CFG.vocab_size * CFG.hidden_size * 1.125
    cache = 2 * CFG.num_hidden_layers * batch * CFG.num_key_value_heads * 2048 * CFG.head_dim * 2
    got = device_check.decode_bytes(CFG, batch, 2048, quantize)
    assert got == pytest.approx(stored - embed + embed * batch / CFG.vocab_size + cache, rel=1e-12)


def test_the_check_runs_with_quantized_weights_and_says_one_sentence_for_a_bad_mode(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["device_check.py", "--allow_cpu", "--config", "tiny", "--layers", "1",
                                     "--prompt_len", "16", "--batches", "1", "--runs", "1", "--json"])
    assert device_check.main() == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["logits_ok"] and out["weights"] == "bfloat16"
    assert sorted(out["quantized"]) == ["int4", "int8"]
    for mode, r in out["quantized"].items():
        assert r["logits_ok"] and r["weights"] == mode and r["decode_batch_1"]["hbm_bytes"] < out["decode_batch_1"]["hbm_bytes"]
    monkeypatch.setattr("sys.argv", ["device_check.py", "--allow_cpu", "--quantize", "int3"])
    assert device_check.main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown quantization 'int3'")
