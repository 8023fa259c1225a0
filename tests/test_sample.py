"""The sample CLI: the default run, --json, and one clear sentence + exit 2 for bad input, found before any
device or model exists."""

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
    assert "[mixtral_jax] initialising random tiny weights ..." in r.stderr  # progress, on stderr
    lines = r.stdout.strip().splitlines()
    assert "RANDOM weights" in lines[0] and "tiny" in lines[0]
    assert lines[1].startswith("Mixture-of-experts models route each token to") and len(lines[1]) > 50
    assert lines[-1].startswith("[summary] prompt tokens 13, new tokens 32, time to first token")
    assert "tokens/s" in lines[-1]


def test_json_batch_chat_and_ids():
    r = _run("--prompt", "Hello", "--prompt", "A longer second prompt", "--prompt_ids", "1,22,333",
             "--chat", "--max_new_tokens", "4", "--json", "--temperature", "0.7", "--top_k", "50", "--seed", "3")
    assert r.returncode == 0, r.stderr
    # --json: stdout is the JSON line alone; the header (random weights!) goes to stderr, progress is quiet.
    assert len(r.stdout.strip().splitlines()) == 1 and "RANDOM weights" in r.stderr
    assert "[mixtral_jax] initialising" not in r.stderr
    out = json.loads(r.stdout)
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
    (["--temprature", "0.5"], "Unknown command line flag 'temprature'. Did you mean: temperature"),
    (["--top_k", "many"], "flag --top_k=many"),
    (["extra"], "unexpected arguments ['extra']"),
])
def test_bad_input_one_sentence_exit_2(args, message):
    r = _run(*args)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in r.stderr


@pytest.fixture
def checked_before_building(monkeypatch):
    """Runs sample.run() in-process with a device or model creation failing the test: flag errors come first."""
    import jax

    import mixtral_jax as mj
    from mixtral_jax import distributed, plan, sample

    def created(*args, **kwargs):
        raise AssertionError("a device or model was created before the flags were checked")

    for owner, name in ((mj, "init_random"), (mj, "load"), (plan, "ensure_virtual_devices"), (plan, "dry_run"),
                        (distributed, "supervise"), (distributed, "initialize"), (jax, "devices"),
                        (jax, "device_count"), (jax, "default_backend")):
        monkeypatch.setattr(owner, name, created)
    # 16 GB available: at most 0.5 x 16e9 / 64 MiB = 119 virtual CPU devices.
    monkeypatch.setattr(sample, "_host_bytes_available", lambda: 16 * 10**9)

    def usage_error(*args) -> str:
        sample.FLAGS(["sample", *args])
        try:
            with pytest.raises(sample.UsageError) as e:
                sample.run()
        finally:
            sample.FLAGS.unparse_flags()
        return str(e.value)

    return usage_error


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "--temperature must be a number >= 0 (0 is greedy), got -1.0."),
    (["--temperature", "nan"], "--temperature must be a number >= 0"),
    (["--top_p", "0"], "--top_p must be in (0, 1] (1 disables it), got 0.0."),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--top_k", "-2"], "--top_k must be >= 0 (0 disables it), got -2."),
    (["--max_new_tokens", "-1"], "--max_new_tokens must be >= 0, got -1."),
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt_ids", ""], "--prompt_ids is empty"),
    (["--prompt_ids", "1,32000"], "token ids [32000] outside tiny's vocabulary [0, 32000)"),
    (["--prompt_ids", "-1,5"], "token ids [-1] outside"),
    (["--prompt_ids", "1,2", "--max_new_tokens", "4095"], "the prompt (2 tokens) + --max_new_tokens 4095 exceeds tiny's 4096"),
    (["--dtype", "float33"], "--dtype 'float33' is not a dtype"),
    (["--dtype", "int32"], "--dtype must be a floating-point dtype"),
    (["--mesh", "expert=2,expert=2"], "bad mesh spec 'expert=2,expert=2'"),
    (["--mesh", "expert=0"], "axis sizes must be positive"),
    (["--mesh", "gpu=8"], "bad mesh spec 'gpu=8'"),
    (["--mesh", "expert=3"], "--mesh expert=3: the mesh's expert=3 does not divide num_local_experts=8"),
    (["--mesh", "tensor=5"], "does not divide"),
    (["--mesh", "data=512"], "--mesh data=512 needs 512 devices, more than one process here can emulate: "
                             "each virtual CPU device takes about 64 MiB of host memory, so this host (16.0 GB "
                             "available) runs at most 119"),
    (["--capacity_factor", "1.25"], "--capacity_factor applies to expert-parallel dispatch"),
    (["--capacity_factor", "0", "--mesh", "expert=2"], "--capacity_factor must be a number > 0"),
    (["--dry_run"], "--dry_run needs --mesh"),
    (["--dry_run", "--mesh", "expert=2", "--batch", "0"], "--batch must be >= 1"),
    (["--dry_run", "--mesh", "expert=2", "--device_memory_gb", "-16"], "--device_memory_gb must be a number > 0"),
    (["--coordinator_address", "127.0.0.1:1234"], "needs --num_processes and --process_id"),
    (["--coordinator_address", "host-0", "--num_processes", "2", "--process_id", "0"], "is not host:port"),
    (["--coordinator_address", "127.0.0.1:1234", "--num_processes", "2", "--process_id", "2"],
     "--process_id 2 must be in [0, 2)"),
    (["--checkpoint", "/no/such/dir"], "--checkpoint /no/such/dir is not a directory"),
    (["--config", "/no/such/config.json"], "no/such/config.json"),
])
def test_flags_are_checked_before_any_device_or_model(checked_before_building, args, message):
    assert message in checked_before_building(*args)


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpfull"])
def test_help_exits_0(flag):
    r = _run(flag, timeout=60)
    assert r.returncode == 0 and "--temperature" in r.stdout and "--mesh" in r.stdout, r.stderr


def test_dry_run_that_does_not_fit_exits_2_with_the_plan():
    r = _run("--dry_run", "--mesh", "expert=2", "--max_seq_len", "64", "--device_memory_gb", "0.001")
    assert r.returncode == 2, r.stderr
    assert "total" in r.stdout and "does NOT fit in 0.001 GiB per device" in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tiny on --mesh expert=2 needs" in errors[0] and "more than 0.001 GiB" in errors[0]
    r = _run("--dry_run", "--mesh", "expert=2", "--max_seq_len", "64", "--device_memory_gb", "0.001", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["fits"] is False


def test_dry_run_without_device_memory_checks_this_host():
    # On a CPU host the verdict is against the host's available memory over the mesh's virtual devices.
    r = _run("--dry_run", "--mesh", "expert=2", "--max_seq_len", "64", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["fits"] is True and 0 < plan["device_memory_gb"] < _meminfo_gib("MemTotal") / 2
    assert "checked against this host's" in r.stderr and "virtual CPU devices" in r.stderr


def _meminfo_gib(field: str) -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024 / 2**30


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
    assert "float32 (experts kept in bfloat16)" in r.stderr
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    eos = hf.config.eos_token_id
    ref = ref[:ref.index(eos) + 1] if eos in ref else ref
    assert json.loads(r.stdout.strip().splitlines()[-1])["tokens"] == [ref]
    r = _run("--checkpoint", str(tmp_path / "ckpt"), "--prompt_ids", "1,2", "--max_new_tokens", "1",
             "--expert_dtype", "float32")
    assert r.returncode == 0 and "float32 on 1 cpu" in r.stdout, r.stderr
