"""The sample CLI: the default run, --json, and one clear sentence + exit 2 for bad input, found before any
device or model exists."""

import json
import os
import subprocess
import sys

import pytest
from conftest import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["XLA_FLAGS"] = FAST_COMPILE  # one CPU device, as a user's plain run
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


def _fail_if_called(monkeypatch, *where):
    for owner, name in where:
        def called(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} was called before the input was checked")

        monkeypatch.setattr(owner, name, called)


@pytest.fixture
def nothing_built(monkeypatch):
    """Creating a device or model fails the test: flag errors come first. This host has 16 GB available."""
    import jax

    import mixtral_jax as mj
    from mixtral_jax import distributed, plan, sample

    _fail_if_called(monkeypatch, (mj, "init_random"), (mj, "load"), (plan, "ensure_virtual_devices"),
                    (plan, "dry_run"), (distributed, "supervise"), (distributed, "initialize"), (jax, "devices"),
                    (jax, "device_count"), (jax, "default_backend"))
    # 16 GB available: at most 0.5 x 16e9 / 64 MiB = 119 virtual CPU devices.
    monkeypatch.setattr(sample, "_host_bytes_available", lambda: 16 * 10**9)


def _cli_in_process(capsys, *args) -> tuple[int, list[str]]:
    """The CLI's entry point (its flag parser, then main) in this process: exit status and stderr lines."""
    from mixtral_jax import cli, sample

    try:
        with pytest.raises(SystemExit) as e:
            sample.main(cli.parse_flags(["sample", *args]))
    finally:
        sample.FLAGS.unparse_flags()
    return e.value.code, capsys.readouterr().err.strip().splitlines()


# A traceback would leave main() as an exception rather than SystemExit, failing _cli_in_process.
@pytest.mark.parametrize("args,message", [
    (["--config", "8x9b"], "unknown config '8x9b': use a preset (8x22b, 8x7b, tiny)"),
    (["--checkpoint", "/no/such/dir"], "--checkpoint /no/such/dir is not a directory"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--max_new_tokens", "-1"], "--max_new_tokens must be >= 0"),
    (["--prompt_ids", "1,x"], "is not a comma-separated list of integers"),
    (["--expert_dtype", "bf15"], "--expert_dtype 'bf15' is not a dtype; use float32 or bfloat16"),
    (["--expert_dtype", "int8"], "expert_dtype must be a floating-point dtype"),
    (["--quantize", "int3"], "--quantize 'int3' is not a quantization; use one of int8, int4, int8-experts, int4-experts"),
    (["--quantize", "int8", "--expert_dtype", "bfloat16"], "--quantize and --expert_dtype both set the experts'"),
    (["--temprature", "0.5"], "Unknown command line flag 'temprature'. Did you mean: temperature"),
    (["--top_k", "many"], "flag --top_k=many"),
    (["extra"], "unexpected arguments ['extra']"),
])
def test_bad_input_one_sentence_exit_2(nothing_built, capsys, args, message):
    status, err = _cli_in_process(capsys, *args)
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("args,message", [
    (["--config", "8x22b"], "8x22b needs 562.5 GB for its weights in float32 but this host has 16.0 GB; run it on "
                            "a pod with a mesh"),
    (["--config", "8x22b", "--expert_dtype", "bfloat16"],
     "8x22b needs 291.9 GB for its weights in float32 (experts in bfloat16) but this host has 16.0 GB"),
    # By hand: 135.29e9 expert weights at 1 byte (int8) or 1/2 (int4) plus their scales, the rest float32.
    (["--config", "8x22b", "--quantize", "int8-experts"],
     "8x22b needs 156.7 GB for its weights in float32 (quantized int8-experts) but this host has 16.0 GB"),
    (["--config", "8x22b", "--quantize", "int4-experts"],
     "8x22b needs 97.5 GB for its weights in float32 (quantized int4-experts) but this host has 16.0 GB"),
])
def test_too_big_for_this_host_one_sentence_exit_2(monkeypatch, capsys, args, message):
    import mixtral_jax as mj
    from mixtral_jax import sample

    _fail_if_called(monkeypatch, (mj, "init_random"), (mj, "load"))
    monkeypatch.setattr(sample, "_host_bytes_available", lambda: 16 * 10**9)
    status, err = _cli_in_process(capsys, *args)
    assert status == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("args,message", [
    (["--temprature", "0.5"], "Unknown command line flag 'temprature'"),  # absl's parser
    (["extra"], "unexpected arguments ['extra']"),  # main(), before any flag is checked
    (["--config", "8x22b"], "8x22b needs 562.5 GB for its weights in float32"),  # run(), with JAX started
])
def test_bad_input_in_a_process_of_its_own(args, message):
    # The real thing, one case per way out: only the one line reaches stderr (no JAX start-up chatter).
    r = _run(*args)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in r.stderr, r.stderr


@pytest.fixture
def checked_before_building(nothing_built):
    """Runs sample.run() in-process; returns its UsageError's message."""
    from mixtral_jax import sample

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


def test_a_text_prompt_outside_a_small_vocabulary_is_one_sentence_before_loading(checked_before_building, tmp_path):
    # The tests' checkpoints have 512 token ids, no Mixtral tokenizer's: the default text prompt's ids fall
    # outside them. That is said before any model is built (it was said mid-stream, after the prompt's echo).
    from mixtral_jax import testing

    config = tmp_path / "config.json"
    config.write_text(json.dumps(testing.TINY_HF))
    message = checked_before_building("--config", str(config))
    assert message.startswith("the text prompt encodes to token ids") and "vocabulary [0, 512)" in message
    assert "give the prompt as --prompt_ids" in message


@pytest.mark.parametrize("flag", ["-h", "--helpfull"])  # -h is rewritten to --help: it runs --help's path
def test_help_exits_0(flag):
    r = _run(flag, timeout=60)
    assert r.returncode == 0 and "--temperature" in r.stdout and "--mesh" in r.stdout, r.stderr


def test_dry_run_that_does_not_fit_exits_2_with_the_plan():
    r = _run("--dry_run", "--mesh", "expert=2", "--max_seq_len", "64", "--device_memory_gb", "0.001")
    assert r.returncode == 2, r.stderr
    assert "peak" in r.stdout and "does NOT fit in 0.001 GiB per device" in r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "tiny on --mesh expert=2 needs" in errors[0] and "more than 0.001 GiB" in errors[0]
    # The plan as JSON (--json) is the next test's; exit 2 does not depend on the format.


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


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, up to and including its first EOS (where the CLI stops)."""
    import torch

    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(prompt):]
    ref, eos = ref.tolist(), hf.config.eos_token_id
    return ref[:ref.index(eos) + 1] if eos in ref else ref


def test_checkpoint_greedy_equals_transformers(tmp_path):
    import mixtral_jax as mj
    from mixtral_jax import testing

    hf = testing.hf_model(seed=5, vocab_size=32000)
    testing.write_hf_checkpoint(hf, tmp_path / "hf")
    mj.convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="float32")
    prompts = [[1, 415, 2936, 9060], [1, 22, 333]]
    r = _run("--checkpoint", str(tmp_path / "ckpt"), *[f"--prompt_ids={','.join(map(str, p))}" for p in prompts],
             "--max_new_tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    # --json: stdout is the JSON line alone; the header goes to stderr, and progress is quiet.
    assert len(r.stdout.strip().splitlines()) == 1 and f"weights from {tmp_path / 'ckpt'}" in r.stderr
    assert "restor" not in r.stderr and "[mixtral_jax] weights ready" not in r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == [_hf_greedy(hf, p, 6) for p in prompts] and len(out["text"]) == 2
    assert out["prompt_tokens"] == [4, 3] and out["new_tokens"] == sum(len(t) for t in out["tokens"])
    assert out["random_weights"] is False and out["time_to_first_token_s"] > 0


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A bf16 checkpoint converted from transformers, and transformers' float32 model of it."""
    import torch
    import transformers

    import mixtral_jax as mj
    from mixtral_jax import testing

    path = tmp_path_factory.mktemp("bf16")
    testing.write_hf_checkpoint(testing.hf_model(seed=6, vocab_size=32000).to(torch.bfloat16), path / "hf")
    hf = transformers.MixtralForCausalLM.from_pretrained(path / "hf", dtype=torch.float32).eval()
    return mj.convert_hf_checkpoint(path / "hf", path / "ckpt", dtype="bfloat16"), hf


def test_bfloat16_checkpoint_keeps_experts_in_bfloat16_and_equals_transformers(bf16_checkpoint):
    # On the CPU a bf16 checkpoint runs in float32 with its experts kept in bf16 (the default there),
    # and the tokens equal transformers' float32 run of the same checkpoint.
    ckpt, hf = bf16_checkpoint
    prompt = [1, 415, 2936, 9060]
    r = _run("--checkpoint", ckpt, "--prompt_ids", ",".join(map(str, prompt)), "--max_new_tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    assert "float32 (experts kept in bfloat16)" in r.stderr
    assert json.loads(r.stdout)["tokens"] == [_hf_greedy(hf, prompt, 6)]


def test_batch_of_ids_and_chat_texts_sampled_with_progress(bf16_checkpoint):
    """Without --json: progress on stderr; the header, each row under its prompt, and the summary on stdout."""
    import mixtral_jax as mj

    texts = ["Hello", "A longer second prompt"]
    r = _run("--checkpoint", bf16_checkpoint[0], "--expert_dtype", "float32", "--prompt_ids", "1,22,333",
             "--prompt", texts[0], "--prompt", texts[1], "--chat", "--max_new_tokens", "4", "--temperature", "0.7",
             "--top_k", "50", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "restoring" in r.stderr and "restored" in r.stderr
    lines = r.stdout.strip().splitlines()
    assert "float32 on 1 cpu" in lines[0] and "experts kept" not in lines[0]  # --expert_dtype float32 is honoured
    # --prompt_ids first, then the texts wrapped as user turns ([INST] ... [/INST] in v1 plain text).
    rows = [line for line in lines if line.startswith("--- ")]
    assert len(rows) == 3 and all(f"[INST] {t} [/INST]" in row for t, row in zip(texts, rows[1:], strict=True))
    tok = mj.load_tokenizer("8x7b")
    chat = sum(len(tok.encode_chat([{"role": "user", "content": t}])) for t in texts)
    assert lines[-1].startswith(f"[summary] prompt tokens {3 + chat}, new tokens 12, time to first token")
