"""Converter and checkpoint tests: HF safetensors → Orbax → load → logits equal transformers'.

Every checkpoint here is written by transformers itself (`save_pretrained`, tiny
random models); the reference logits come from the same transformers model in
float32.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from conftest import FAST_COMPILE
import mixtral_jax as mj
from mixtral_jax import checkpoint, convert, model as model_lib, testing
from mixtral_jax import layout as layout_lib
from mixtral_jax.model import param_shardings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT_LEN = 12

# name -> (HF config overrides, save weights in bf16, one model.safetensors instead of shards)
CASES = {
    "experts4_top1_mqa_vocab32000_theta1e4": (
        dict(num_local_experts=4, num_experts_per_tok=1, num_key_value_heads=1, vocab_size=32000,
             rope_theta=1e4), False, False),
    "experts6_top3_gqa_vocab32768_window5_bf16_single_file": (
        dict(num_local_experts=6, num_experts_per_tok=3, num_key_value_heads=2, vocab_size=32768,
             rope_theta=1e6, sliding_window=5), True, True),
    "experts8_top2_mha_3layers_bf16": (
        dict(num_key_value_heads=4, num_hidden_layers=3, rope_theta=1e6), True, False),
}


def _write(hf, path, bf16=False, single=False):
    """Saves `hf` like the hub does (bf16 or f32; sharded or one file); returns it read back in float32."""
    testing.write_hf_checkpoint(hf.to(torch.bfloat16) if bf16 else hf, path,
                                max_shard_size="1GB" if single else "200KB")
    assert os.path.exists(os.path.join(path, convert.SAFETENSORS_INDEX)) != single
    # Read back rather than upcast `hf`: an upcast model keeps bf16-rounded RoPE frequencies
    # (a buffer, not a weight), which a model loaded from the checkpoint recomputes in float32.
    return transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="eager").eval()


def _tokens(vocab, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (2, PROMPT_LEN))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A sharded float32 HF checkpoint of testing.TINY_HF, and its transformers model."""
    path = str(tmp_path_factory.mktemp("tiny_hf"))
    hf = _write(testing.hf_model(seed=1), path)
    return path, hf


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_hf, tmp_path_factory):
    """The tiny HF checkpoint converted to float32, for tests that only read it."""
    return mj.convert_hf_checkpoint(tiny_hf[0], tmp_path_factory.mktemp("tiny_ckpt") / "ckpt", dtype="float32")


@pytest.fixture
def hf_copy(tiny_hf, tmp_path):
    """A private copy of the tiny HF checkpoint that a test may damage."""
    path = str(tmp_path / "hf")
    shutil.copytree(tiny_hf[0], path)
    return path


@pytest.mark.parametrize("case", CASES)
def test_convert_load_forward_matches_transformers(case, tmp_path):
    overrides, bf16, single = CASES[case]
    ref = _write(testing.hf_model(seed=0, **overrides), str(tmp_path / "hf"), bf16, single)
    out = mj.convert_hf_checkpoint(tmp_path / "hf", tmp_path / "ckpt", dtype="float32")
    model = mj.load(out, dtype="float32")
    assert model.cfg == dataclasses.replace(testing.config_of(ref), dtype="float32", name="ckpt")
    tokens = _tokens(model.cfg.vocab_size)
    err = testing.rel_err(mj.forward(model, tokens), testing.hf_logits(ref, tokens))
    assert err <= 1e-4, f"{case}: max relative logit error {err:.2e}"


def test_bf16_checkpoint_loads_as_float32_and_float32_as_bf16(tiny_hf, tiny_ckpt, tmp_path):
    path, hf = tiny_hf
    cfg = testing.config_of(hf)
    expected = checkpoint.flatten(convert.params_from_state_dict(testing.state_dict_numpy(hf), cfg))
    mj.convert_hf_checkpoint(path, tmp_path / "bf16", dtype="bfloat16")
    with open(tmp_path / "bf16" / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    as_f32 = checkpoint.flatten(mj.load(tmp_path / "bf16", dtype="float32", layout="stacked").params())
    as_bf16 = checkpoint.flatten(mj.load(tiny_ckpt, dtype="bfloat16", layout="stacked").params())
    for name, want in expected.items():
        rounded = want.astype(ml_dtypes.bfloat16)
        assert as_f32[name].dtype == np.float32 and as_bf16[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(as_f32[name]), rounded.astype(np.float32), err_msg=str(name))
        np.testing.assert_array_equal(np.asarray(as_bf16[name]), rounded, err_msg=str(name))


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A bf16 checkpoint (as Mixtral ships), converted, with transformers' float32 logits and greedy tokens."""
    path = tmp_path_factory.mktemp("bf16")
    ref = _write(testing.hf_model(seed=2), str(path / "hf"), bf16=True)
    mj.convert_hf_checkpoint(path / "hf", path / "ckpt", dtype="bfloat16")
    tokens = _tokens(ref.config.vocab_size)
    prompts = [tokens[0].tolist(), tokens[1, :5].tolist()]
    want = [ref.generate(torch.tensor([p]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                         pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    return path / "ckpt", tokens, testing.hf_logits(ref, tokens), prompts, want


@pytest.mark.parametrize("layout", layout_lib.LAYOUTS)
def test_bfloat16_experts_float32_compute_match_transformers(layout, bf16_checkpoint, tmp_path):
    # A bf16 checkpoint loaded with float32 compute and the experts kept in bf16: logits and greedy
    # tokens equal transformers' float32 run of the same checkpoint.
    ckpt, tokens, want_logits, prompts, want_tokens = bf16_checkpoint
    model = mj.load(ckpt, dtype="float32", layout=layout, expert_dtype="bfloat16")
    assert model.dtype == jnp.float32 and model.expert_dtype == jnp.bfloat16
    experts = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.params()):
        expert = any(getattr(k, "key", None) in model_lib.EXPERT_PARAMS for k in path)
        assert leaf.dtype == (jnp.bfloat16 if expert else jnp.float32), path
        experts += expert
    assert experts == 3  # w1, w3, w2, each one buffer for all the layers in either layout
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = mj.forward(model, tokens)
        ours = mj.generate(model, prompts, max_new_tokens=6, stop_tokens=[])
    # per_expert runs the C++ kernel, which widens as it reads; stacked runs XLA ops, which must
    # widen every call (slow on the CPU) and say so.
    widened = [w for w in caught if "widen every expert" in str(w.message)]
    assert bool(widened) == (layout == "stacked"), [str(w.message) for w in caught]
    err = testing.rel_err(logits, want_logits)
    assert err <= 1e-4, f"max relative logit error {err:.2e}"
    assert ours == want_tokens
    # Saved as loaded (experts in bf16, the rest float32) and restored unchanged.
    mj.save(model, tmp_path / "mixed")
    again = mj.load(tmp_path / "mixed", dtype="float32", layout=layout, expert_dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(model.params()), jax.tree.leaves(again.params()), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_expert_dtype_must_be_a_float_dtype(tiny_ckpt):
    with pytest.raises(ValueError, match="expert_dtype must be a floating-point dtype"):
        mj.load(tiny_ckpt, dtype="float32", expert_dtype="int8")


def _remove_from_shard(path, tensor):
    with open(os.path.join(path, convert.SAFETENSORS_INDEX)) as f:
        shard = os.path.join(path, json.load(f)["weight_map"][tensor])
    tensors = load_file(shard)
    del tensors[tensor]
    save_file(tensors, shard, metadata={"format": "pt"})


def _edit_json(path, edit):
    with open(path) as f:
        d = json.load(f)
    edit(d)
    with open(path, "w") as f:
        json.dump(d, f)


def _replace_tensor(path, tensor, value):
    with open(os.path.join(path, convert.SAFETENSORS_INDEX)) as f:
        shard = os.path.join(path, json.load(f)["weight_map"][tensor])
    tensors = load_file(shard)
    tensors[tensor] = value
    save_file(tensors, shard, metadata={"format": "pt"})


def _truncate(path, prefix):
    (shard,) = [os.path.join(path, f) for f in os.listdir(path) if f.startswith(prefix)]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)


W2 = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
WK = "model.layers.0.self_attn.k_proj.weight"
ROUTER = "model.layers.0.block_sparse_moe.gate.weight"
BROKEN = {
    # name -> (damage(hf_dir), words the error must contain)
    "tensor_missing_from_shard": (lambda p: _remove_from_shard(p, W2), [W2, "missing"]),
    "tensor_missing_from_index": (
        lambda p: _edit_json(os.path.join(p, convert.SAFETENSORS_INDEX), lambda d: d["weight_map"].pop(W2)),
        [W2, "missing"]),
    "wrong_shape": (lambda p: _replace_tensor(p, WK, np.zeros((64, 64), np.float32)),
                    [WK, "(64, 64)", "(32, 64)"]),
    "truncated_file": (lambda p: _truncate(p, "model-00002-of-"), ["model-00002-of-", "truncated", "tensor"]),
    "config_fewer_experts": (
        lambda p: _edit_json(os.path.join(p, "config.json"), lambda d: d.update(num_local_experts=4)),
        [ROUTER, "(8, 64)", "(4, 64)", "config.json"]),
    "config_fewer_layers": (
        lambda p: _edit_json(os.path.join(p, "config.json"), lambda d: d.update(num_hidden_layers=1)),
        ["model.layers.1.", "config.json"]),
}


@pytest.mark.parametrize("broken", BROKEN)
def test_bad_checkpoint_names_the_tensor_and_leaves_no_output(broken, hf_copy, tmp_path):
    damage, words = BROKEN[broken]
    damage(hf_copy)
    with pytest.raises(ValueError) as e:
        mj.convert_hf_checkpoint(hf_copy, tmp_path / "out")
    for word in words:
        assert word in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no out dir, no staging dir


def test_failure_while_writing_leaves_no_output(hf_copy, tmp_path, monkeypatch):
    read = convert.HFCheckpoint.read

    def interrupted_read(self, tensor, rows=slice(None)):
        if tensor == W2:
            raise KeyboardInterrupt
        return read(self, tensor, rows)

    monkeypatch.setattr(convert.HFCheckpoint, "read", interrupted_read)
    with pytest.raises(KeyboardInterrupt):
        mj.convert_hf_checkpoint(hf_copy, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_cli_fails_with_exit_2(hf_copy, tmp_path):
    # A successful CLI conversion (progress, --dtype, nothing on stdout) is in test_ckpt_files.py's
    # test_a_killed_conversion_is_cleaned_up_by_the_next.
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["XLA_FLAGS"] = FAST_COMPILE  # one CPU device

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mixtral_jax.convert", *args], capture_output=True,
                              text=True, env=env, timeout=120)

    mj.convert_hf_checkpoint(hf_copy, tmp_path / "ok", dtype="float32")
    r = run("--hf_dir", hf_copy, "--out", str(tmp_path / "ok"))
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr

    _remove_from_shard(hf_copy, W2)
    r = run("--hf_dir", hf_copy, "--out", str(tmp_path / "bad"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: tensor {W2}")
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["hf", "ok"]


def test_existing_output_needs_overwrite(tiny_hf, tmp_path):
    out = tmp_path / "ckpt"
    mj.convert_hf_checkpoint(tiny_hf[0], out)
    with pytest.raises(FileExistsError, match="overwrite"):
        mj.convert_hf_checkpoint(tiny_hf[0], out)
    mj.convert_hf_checkpoint(tiny_hf[0], out, dtype="float32", overwrite=True)
    assert mj.load(out, dtype="float32").cfg.num_local_experts == 8
    assert json.load(open(out / "config.json"))["torch_dtype"] == "float32"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging or set-aside directory left


def test_conversion_streams(tmp_path):
    """Peak numpy memory during conversion is about one layer, not the model (tracemalloc sees numpy)."""
    hf = testing.hf_model(seed=2, num_hidden_layers=12, intermediate_size=256)
    _write(hf, str(tmp_path / "hf"))
    cfg = testing.config_of(hf)
    layer_bytes = 3 * cfg.num_local_experts * cfg.hidden_size * cfg.intermediate_size * 4
    model_bytes = convert.HFCheckpoint(tmp_path / "hf").nbytes()
    assert model_bytes > 10 * layer_bytes
    # In a fresh process, measured on its second conversion: tracemalloc counts every thread's
    # allocations, and threads or caches left by earlier tests made this flaky in the full suite. Small chunks and a small write budget
    # there so the vocab tensors are written in row blocks and the bound is visible at this size.
    code = (
        "import sys, tracemalloc\n"
        "import mixtral_jax as mj\n"
        "from mixtral_jax import checkpoint\n"
        "checkpoint.CHUNK_BYTES = 16 * 2**10\n"
        f"checkpoint.MAX_INFLIGHT_BYTES = {layer_bytes // 4}\n"
        "mj.convert_hf_checkpoint(sys.argv[1], sys.argv[2] + '.warm', dtype='float32')  # lazy imports, caches\n"
        "tracemalloc.start()\n"
        "mj.convert_hf_checkpoint(sys.argv[1], sys.argv[2], dtype='float32')\n"
        "print(tracemalloc.get_traced_memory()[1])\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hf"), str(tmp_path / "ckpt")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    peak = int(r.stdout.split()[-1])
    assert peak < layer_bytes, f"peak {peak} bytes; one layer is {layer_bytes}, the model {model_bytes}"
    got = checkpoint.flatten(mj.load(tmp_path / "ckpt", dtype="float32", layout="stacked").params())
    want = checkpoint.flatten(convert.params_from_state_dict(testing.state_dict_numpy(hf), cfg))
    for name in want:
        np.testing.assert_array_equal(np.asarray(got[name]), want[name], err_msg=str(name))


def test_load_into_mesh_shardings(tiny_ckpt):
    assert jax.device_count() == 8, "conftest.py sets 8 virtual CPU devices"
    out = tiny_ckpt
    mesh = mj.make_mesh("expert=4,tensor=2")
    sharded = mj.load(out, dtype="float32", mesh=mesh)
    single = checkpoint.flatten(mj.load(out, dtype="float32", layout="stacked").params())
    shardings = checkpoint.flatten(param_shardings(sharded.cfg, mesh))
    for name, value in checkpoint.flatten(sharded.params()).items():
        assert value.sharding == shardings[name], name
        np.testing.assert_array_equal(np.asarray(value), np.asarray(single[name]), err_msg=str(name))
    assert len(sharded.params()["layers"]["w1"].addressable_shards) == 8


@pytest.fixture(scope="module")
def models_and_expected(tiny_hf):
    """layout -> (a Mixtral of the tiny transformers model's weights, its params in that layout)."""
    hf = tiny_hf[1]
    cfg = testing.config_of(hf)
    stacked = convert.params_from_state_dict(testing.state_dict_numpy(hf), cfg)  # numpy: nothing else holds it
    per_expert = layout_lib.to_per_expert(jax.tree.map(jnp.array, stacked))
    return {"stacked": (testing.our_model(hf, "stacked"), stacked),
            "per_expert": (testing.our_model(hf, "per_expert"), per_expert)}


@pytest.mark.parametrize("saved_layout", ["stacked", "per_expert"])
def test_save_load_round_trip(models_and_expected, tmp_path, saved_layout):
    model = models_and_expected[saved_layout][0]
    mj.save(model, tmp_path / "ckpt")
    for layout in ("stacked", "per_expert"):
        loaded = mj.load(tmp_path / "ckpt", dtype="float32", layout=layout)
        assert loaded.layout == layout and loaded.cfg.num_hidden_layers == model.cfg.num_hidden_layers
        want = models_and_expected[layout][1]
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(loaded.params()), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError, match="overwrite"):
        mj.save(model, tmp_path / "ckpt")


def test_load_errors(tiny_hf, tmp_path):
    with pytest.raises(mj.CheckpointError, match="does not exist"):
        mj.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(mj.CheckpointError, match="digests.json"):
        mj.load(tmp_path / "empty")
    with pytest.raises(mj.CheckpointError, match="config.json"):
        mj.load(tmp_path / "empty", verify=False)
    out = mj.convert_hf_checkpoint(tiny_hf[0], tmp_path / "ckpt", dtype="float32")
    _edit_json(os.path.join(out, "config.json"), lambda d: d.update(num_local_experts=4))
    with pytest.raises(mj.CheckpointError, match=r"config.json (has \d+ bytes but|does not match its digest)"):
        mj.load(out)
    with pytest.raises(mj.CheckpointError, match=r"layers/router has shape \(2, 64, 8\) but .* implies \(2, 64, 4\)"):
        mj.load(out, verify=False)
