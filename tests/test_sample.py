"""The sample CLI: the default run, --json, and one clear sentence + exit 2 for bad input."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's plain run
    return subprocess.run([sys.executable, "-m", "mixtral_jax.sample", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(REPO))


def test_default_run_streams_text_and_summary():
    r = _run()
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "RANDOM weights" in lines[0] and "tiny" in lines[0]
    assert lines[1].startswith("Mixture-of-experts models route each token to") and len(lines[1]) > 50
    assert lines[-1].startswith("[summary] prompt tokens 13, new tokens 32, time to first token")
    assert "tokens/s" in lines[-1]


def test_json_batch_chat_and_ids():
    r = _run("--prompt", "Hello", "--prompt", "A longer second prompt", "--prompt_ids", "1,22,333",
             "--chat", "--max_new_tokens", "4", "--json", "--temperature", "0.7", "--top_k", "50", "--seed", "3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["tokens"]) == len(out["text"]) == 3
    assert all(len(t) == 4 for t in out["tokens"])
    # --prompt_ids come first, then the chat-wrapped texts: [INST] ... [/INST] in v1 plain text.
    assert out["prompt_tokens"][0] == 3 and out["prompt_tokens"][1] > 5
    assert out["random_weights"] is True and out["time_to_first_token_s"] > 0


@pytest.mark.parametrize("args,message", [
    (["--config", "8x9b"], "unknown config '8x9b': use a preset (8x22b, 8x7b, tiny)"),
    (["--checkpoint", "/no/such/dir"], "--checkpoint /no/such/dir is not a directory"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--max_new_tokens", "-1"], "--max_new_tokens must be >= 0"),
    (["--prompt_ids", "1,x"], "is not a comma-separated list of integers"),
    (["--config", "8x22b"], "8x22b needs 562.5 GB for its weights in float32"),
    (["--config", "8x22b", "--expert_dtype", "bfloat16"],
     "8x22b needs 291.9 GB for its weights in float32 (experts in bfloat16)"),
    (["--expert_dtype", "bf15"], "--expert_dtype 'bf15' is not a dtype; use float32 or bfloat16"),
    (["--expert_dtype", "int8"], "expert_dtype must be a floating-point dtype"),
])
def test_bad_input_one_sentence_exit_2(args, message):
    r = _run(*args)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in r.stderr


def test_checkpoint_greedy_equals_transformers(tmp_path):
    import torch

    import mixtral_jax as mj
    from mixtral_jax import testing

    hf = testing.hf_model(seed=5, vocab_size=32000)
    testing.write_hf_checkpoint(hf, tmp_path / "hf")
    mj.convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="float32")
    prompt = [1, 415, 2936, 9060]
    r = _run("--checkpoint", str(tmp_path / "ckpt"), "--prompt_ids", ",".join(map(str, prompt)),
             "--max_new_tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    eos = hf.config.eos_token_id
    ref = ref[:ref.index(eos) + 1] if eos in ref else ref
    assert out["tokens"] == [ref] and out["random_weights"] is False


def test_bfloat16_checkpoint_keeps_experts_in_bfloat16_and_equals_transformers(tmp_path):
    # On the CPU a bf16 checkpoint runs in float32 with its experts kept in bf16 (the default there),
    # and the tokens equal transformers' float32 run of the same checkpoint.
    import torch
    import transformers

    import mixtral_jax as mj
    from mixtral_jax import testing

    testing.write_hf_checkpoint(testing.hf_model(seed=6, vocab_size=32000).to(torch.bfloat16), tmp_path / "hf")
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    mj.convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="bfloat16")
    prompt = [1, 415, 2936, 9060]
    r = _run("--checkpoint", str(tmp_path / "ckpt"), "--prompt_ids", ",".join(map(str, prompt)),
             "--max_new_tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    assert "float32 (experts kept in bfloat16)" in r.stdout
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    eos = hf.config.eos_token_id
    ref = ref[:ref.index(eos) + 1] if eos in ref else ref
    assert json.loads(r.stdout.strip().splitlines()[-1])["tokens"] == [ref]
    r = _run("--checkpoint", str(tmp_path / "ckpt"), "--prompt_ids", "1,2", "--max_new_tokens", "1",
             "--expert_dtype", "float32")
    assert r.returncode == 0 and "float32 on 1 cpu" in r.stdout, r.stderr
