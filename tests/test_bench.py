"""The bench CLI: a --quick run end to end, its pure arithmetic against hand counts, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mixtral_jax.bench import metrics, settings
from mixtral_jax.config import from_hf_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The default bench model: hidden 1024, ffn 3584, 8 layers, 16 heads, 4 kv heads, 8 experts top-2, vocab 32000.
V, D, F, L, H, K, E, TOP = 32000, 1024, 3584, 8, 16, 4, 8, 2
DH = D // H


def _default_cfg():
    return from_hf_dict(settings.hf_config_fields(D, F, L, H, K, E, TOP, V, max_positions=600))


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's plain run
    return subprocess.run([sys.executable, "-m", "mixtral_jax.bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_quick_run_writes_table_plot_and_json(tmp_path):
    r = _run("--quick", "--out_dir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens_match"] is True
    assert [d["batch"] for d in out["decode"]] == [1, 4]
    for d in out["decode"]:
        assert d["tokens_match"] is True and d["ours_tok_s"] > 0 and d["new_tokens"] == 8
        assert 1 <= d["experts_touched"] <= 8 and "theirs_tok_s" in d and "ratio" in d
    assert out["decode"][0]["experts_touched"] == 2.0  # batch 1, top-2: always two distinct experts
    assert out["prefill"]["ours_tok_s"] > 0 and out["prefill"]["theirs_tok_s"] > 0
    assert out["prefill"]["matmul_fraction"] > 0 and out["host"]["matvec_gb_s"] > 0
    host = out["host"]
    assert host["kernel_gb_s"] > 0 and host["read_gb_s"] == max(host["matvec_gb_s"], host["kernel_gb_s"])
    assert out["host"]["matmul_gflop_s"] > 0 and len(out["host"]["loadavg_start"]) == 3
    assert out["roofline"]["tok_s"] > 0 and out["roofline"]["fraction"] > 0
    assert out["sparse_gain"]["gain"] > 0 and out["sparse_gain"]["dense_tok_s"] > 0
    counts = out["compile_counts"]
    assert counts["end"] == counts["after_warmup"] and out["recompiles_during_timed_runs"] == 0
    assert counts["after_warmup"]["prefill"] > counts["start"]["prefill"]
    assert out["transformers"]["attn_implementation"] and out["machine"]["nproc"] >= 1
    assert len(out["samples"]["decode4/ours"]) == 1 and len(out["samples"]["host/matvec_gb_s"]) == 4
    # The printed table, the markdown file and the plot.
    assert "| decode tok/s, batch 4 (8-token prompts, 8 new) |" in r.stdout
    md = (tmp_path / "benchmarks.md").read_text()
    assert "`python -m mixtral_jax.bench --quick" in md and "| prefill tok/s (32-token prompt, batch 1) |" in md
    assert "![decode and prefill tokens/s](benchmarks.png)" in md and "- Versions: python" in md
    assert (tmp_path / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_one_sentence_exit_2():
    # The CLI's path from a check to the exit status; the checks themselves are tested in-process below.
    r = _run("--quick", "--out_dir", "", "--hidden_size", "1000000")
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert "GB of host memory but" in err[-1] and err[-1].startswith("error: ") and "Traceback" not in r.stderr


@pytest.mark.parametrize("changes,message", [
    (dict(batch_sizes=["4", "16"]), "--batch_sizes must include 1"),
    (dict(batch_sizes=["1", "x"]), "--batch_sizes 1,x is not a comma-separated list of integers"),
    (dict(new_tokens=1), "--new_tokens must be at least 2"),
    (dict(num_layers=0), "--num_layers must be a positive integer"),
    (dict(vocab_size=3), "--vocab_size must exceed 3"),
    (dict(num_heads=4, num_kv_heads=3), "must be a multiple of num_key_value_heads"),
    (dict(expert_dtype="bfloat16"), "--expert_dtype bfloat16 would round"),
])
def test_bad_settings_are_one_sentence(changes, message):
    values = {**settings.QUICK, **changes}
    dtypes = {"expert_dtype": values.pop("expert_dtype", None)}
    with pytest.raises(settings.UsageError, match=message.replace("(", r"\(")) as err:
        settings.resolve(values, quick=True, dtype="float32", seed=0, skip_transformers=False,
                         checkpoint_dtype=None, **dtypes)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_param_counts_and_active_bytes_by_hand():
    embed = lm_head = V * D
    attention = D * H * DH + 2 * D * K * DH + H * DH * D
    per_layer_fixed = attention + D * E + 2 * D  # + router + two norms
    expert = 3 * D * F
    total = embed + lm_head + D + L * (per_layer_fixed + E * expert)
    active = embed + lm_head + D + L * (per_layer_fixed + TOP * expert)
    cfg = _default_cfg()
    import mixtral_jax as mj

    assert mj.param_count(cfg) == {"total": total, "active": active}
    assert total == 791_233_536  # "791M params"
    # The embedding is a one-row gather; every other active weight is read per token.
    assert metrics.active_bytes_per_token(cfg, "float32") == (active - embed) * 4 == 919_932_928
    # bfloat16 experts (load(expert_dtype="bfloat16")): the 2 chosen experts' bytes halve, the rest stay float32.
    bf16_experts = metrics.active_bytes_per_token(cfg, "float32", "bfloat16")
    assert bf16_experts == (active - embed - L * TOP * expert) * 4 + L * TOP * expert * 2 == 567_611_392


def test_prefill_useful_flops_by_hand():
    cfg = _default_cfg()
    t = 512
    # Every layer but the last on all t tokens; the last one's norm and k/v projections on all t
    # (the cache), the rest of it on the last token only, as the lm_head.
    layer = D * H * DH + 2 * D * K * DH + H * DH * D + D * E + 2 * D + TOP * 3 * D * F
    kv = D + 2 * D * K * DH
    final_norm = D
    causal_pairs = t * (t + 1) // 2
    expected = (2 * layer * t * (L - 1) + 2 * kv * t + 2 * (layer - kv) + 2 * final_norm + 2 * D * V
                + 4 * H * DH * (causal_pairs * (L - 1) + t))
    assert metrics.prefill_useful_flops(cfg, t) == expected


def test_decode_new_tokens_bounds_big_batches():
    assert [settings.decode_new_tokens(b, 64) for b in (1, 4, 16, 64)] == [64, 64, 16, 8]
    assert [settings.decode_new_tokens(b, 8) for b in (1, 4, 64)] == [8, 8, 8]
    assert settings.decode_new_tokens(64, 3) == 3


def test_experts_touched_counts_distinct_per_layer_and_step():
    # [L=2, B=2, T=4, k=2]; positions 0-1 are the prompt, decode steps feed positions 2 and 3.
    experts = np.zeros((2, 2, 4, 2), np.int32)
    experts[0, 0, 2], experts[0, 1, 2] = (0, 1), (1, 2)  # layer 0, step 0: {0, 1, 2} -> 3
    experts[0, 0, 3], experts[0, 1, 3] = (4, 5), (4, 5)  # layer 0, step 1: {4, 5} -> 2
    experts[1, 0, 2], experts[1, 1, 2] = (0, 1), (2, 3)  # layer 1, step 0: 4
    experts[1, 0, 3], experts[1, 1, 3] = (7, 6), (5, 4)  # layer 1, step 1: 4
    experts[:, :, :2] = (6, 7)  # prompt positions are not decode steps
    assert metrics.experts_touched(experts, start=2, steps=2) == (3 + 2 + 4 + 4) / 4
    assert metrics.experts_touched(experts, start=2, steps=1) == (3 + 4) / 2


def test_tokens_agree_stops_at_our_first_eos():
    eos = 2
    assert metrics.tokens_agree([[5, 6, 7]], [[5, 6, 7]], eos) == (True, 3)
    assert metrics.tokens_agree([[5, 6, 7]], [[5, 9, 7]], eos) == (False, 3)
    # transformers' min_new_tokens masks EOS, so it continues differently after our EOS.
    assert metrics.tokens_agree([[5, 2, 7], [8, 8, 8]], [[5, 4, 4], [8, 8, 8]], eos) == (True, 4)


def test_parse_batch_sizes_sorts_and_checks():
    assert settings.parse_batch_sizes(["16", "1", "4", "4"]) == (1, 4, 16)
    for bad in (["0", "1"], [], ["4"]):
        with pytest.raises(settings.UsageError):
            settings.parse_batch_sizes(bad)
