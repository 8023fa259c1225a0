"""Model numerics: configs, parameter counts, layers vs transformers, MoE vs a loop, logits vs transformers."""

import functools
import json
import os
import re
import subprocess
import sys
import warnings
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.mixtral import modeling_mixtral as hf_mixtral

import mixtral_jax as mj
from mixtral_jax import attention, convert, cpu_kernel, layers, model as model_lib, moe, quant, testing
from mixtral_jax import layout as layout_lib
from mixtral_jax.config import from_hf_dict
from mixtral_jax.model import Mixtral

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name,total,active", [
    ("8x7b", 46_702_792_704, 12_879_925_248),
    ("8x22b", 140_630_071_296, 39_161_468_928),
])
def test_param_count_presets(name, total, active):
    assert mj.param_count(mj.load_config(name)) == {"total": total, "active": active}


def test_preset_shapes():
    c7, c22 = mj.load_config("8x7b"), mj.load_config("8x22b")
    assert (c7.vocab_size, c7.hidden_size, c7.intermediate_size, c7.num_hidden_layers) == (32000, 4096, 14336, 32)
    assert (c7.num_attention_heads, c7.num_key_value_heads, c7.rope_theta, c7.max_position_embeddings) == (
        32, 8, 1e6, 32768)
    assert (c22.vocab_size, c22.hidden_size, c22.intermediate_size, c22.num_hidden_layers) == (32768, 6144, 16384, 56)
    assert (c22.num_attention_heads, c22.num_key_value_heads, c22.rope_theta, c22.max_position_embeddings) == (
        48, 8, 1e6, 65536)
    tiny = mj.load_config("tiny")
    assert tiny.vocab_size == 32000 and tiny.num_local_experts == 8 and tiny.num_experts_per_tok == 2
    assert 1e6 < mj.param_count(tiny)["total"] < 1e7


def test_param_count_matches_transformers():
    hf = testing.hf_model(num_local_experts=6, num_experts_per_tok=3, num_key_value_heads=1)
    cfg = testing.config_of(hf)
    assert mj.param_count(cfg)["total"] == sum(p.numel() for p in hf.parameters())


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match=r"8x22b, 8x7b, tiny"):
        mj.load_config("8x9b")


HUB_OLD = {  # an older hub config.json: top-level rope_theta, torch_dtype
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu",
    "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    "router_aux_loss_coef": 0.02, "output_router_logits": False, "use_cache": True,
}


def test_load_config_hub_spellings(tmp_path):
    new = {k: v for k, v in HUB_OLD.items() if k not in ("rope_theta", "torch_dtype")}
    new.update(rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, dtype="bfloat16",
               head_dim=128, sliding_window=4096)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(HUB_OLD))
    (tmp_path / "new.json").write_text(json.dumps(new))
    old_cfg = mj.load_config(tmp_path / "old")  # a checkpoint directory
    new_cfg = mj.load_config(str(tmp_path / "new.json"))  # a JSON path
    assert old_cfg.rope_theta == new_cfg.rope_theta == 1e6
    assert old_cfg.dtype == new_cfg.dtype == "bfloat16"
    assert old_cfg.head_dim == new_cfg.head_dim == 128
    assert old_cfg.sliding_window is None and new_cfg.sliding_window == 4096
    assert mj.param_count(old_cfg) == mj.param_count(mj.load_config("8x7b"))


def test_load_config_missing_rope_theta(tmp_path):
    bad = {k: v for k, v in HUB_OLD.items() if k != "rope_theta"}
    (tmp_path / "c.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="rope_theta"):
        mj.load_config(str(tmp_path / "c.json"))


def test_presets_found_after_non_editable_install(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), REPO], check=True, capture_output=True)
    code = "import mixtral_jax as mj; print(mj.presets(), mj.load_config('8x22b').hidden_size)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(target)}, check=True).stdout
    assert "['8x22b', '8x7b', 'tiny'] 6144" in out


# ---------------------------------------------------------------- layers vs transformers


def test_rms_norm_matches_transformers():
    x = np.random.RandomState(0).randn(2, 5, 64).astype(np.float32)
    w = np.random.RandomState(1).randn(64).astype(np.float32)
    ref = hf_mixtral.MixtralRMSNorm(64, eps=1e-5)
    ref.weight.data = torch.tensor(w)
    np.testing.assert_allclose(layers.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5),
                               ref(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_rope_matches_transformers(theta):
    hf = testing.hf_model(rope_theta=theta)
    rs = np.random.RandomState(0)
    b, t, h, dh = 2, 9, 4, 16
    q = rs.randn(b, t, h, dh).astype(np.float32)
    pos = np.stack([np.arange(t), np.arange(t) + 100])
    cos_t, sin_t = hf.model.rotary_emb(torch.tensor(q), torch.tensor(pos))
    ref, _ = hf_mixtral.apply_rotary_pos_emb(torch.tensor(q).transpose(1, 2), torch.tensor(q).transpose(1, 2),
                                             cos_t, sin_t)
    cos, sin = layers.rope_cos_sin(jnp.asarray(pos), dh, theta, jnp.float32)
    ours = layers.apply_rope(jnp.asarray(q), cos, sin)
    np.testing.assert_allclose(ours, ref.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)


def test_rope_tables_computed_once_per_forward():
    # The compiled forward evaluates sin and cos once each, not inside every layer's q and k
    # rotation (XLA:CPU fused them there, per head and layer, before rope_cos_sin's [I I] product).
    cfg = testing.config_of(testing.hf_model(num_hidden_layers=3))
    model = mj.init_random(cfg, dtype="float32")
    tokens = jnp.zeros((1, 64), jnp.int32)
    positions = jnp.arange(64, dtype=jnp.int32)[None]
    hlo = jax.jit(lambda p, t: model_lib.apply(p, t, positions, cfg=cfg)[0]).lower(
        model.params(), tokens).compile().as_text()
    assert (len(re.findall(r"\bsine\(", hlo)), len(re.findall(r"\bcosine\(", hlo))) == (1, 1)


@pytest.mark.parametrize("kv_heads,window", [(1, None), (2, None), (4, 3)])
def test_attention_matches_transformers(kv_heads, window):
    hf = testing.hf_model(num_key_value_heads=kv_heads, sliding_window=window)
    cfg = testing.config_of(hf)
    state = testing.state_dict_numpy(hf)
    params = convert.params_from_state_dict(state, cfg)
    lp = {k: jnp.asarray(v[0]) for k, v in params["layers"].items()}
    b, t = 2, 8
    x = np.random.RandomState(0).randn(b, t, cfg.hidden_size).astype(np.float32)
    pos = np.broadcast_to(np.arange(t), (b, t))
    xt = torch.tensor(x)
    cos_t, sin_t = hf.model.rotary_emb(xt, torch.tensor(pos))
    mask = torch.full((t, t), float("-inf")).triu(1)
    if window is not None:
        mask = mask.masked_fill(torch.tensor(np.subtract.outer(np.arange(t), np.arange(t)) >= window), float("-inf"))
    with torch.no_grad():
        ref, _ = hf.model.layers[0].self_attn(xt, (cos_t, sin_t), mask[None, None])
    cos, sin = layers.rope_cos_sin(jnp.asarray(pos), cfg.head_dim, cfg.rope_theta, jnp.float32)
    ours, _ = attention.self_attention(jnp.asarray(x), lp, jnp.asarray(pos), jnp.asarray(pos), cos, sin,
                                       sliding_window=window)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- MoE vs loop reference


@pytest.fixture(params=["kernel", "xla"])
def cpu_path(request, monkeypatch):
    """Runs a per_expert MoE test twice: with the C++ CPU kernel, and with it off (XLA ops only)."""
    if request.param == "xla":
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    else:
        assert cpu_kernel.available(), "the CPU MoE kernel did not build (is g++ installed?)"
    return request.param


def _nan_expert(w, e):
    """w [E, ...] with expert e's weights NaN."""
    w = np.array(w)
    w[e] = np.nan
    return w


def _per_expert(p, dtype="float32"):
    """Stacked MoE weights -> the per_expert layout (each weight's E experts in HF's [out, in], in `dtype`)."""
    cast = lambda w: jnp.asarray(np.swapaxes(w, -1, -2), dtype) if dtype != "float32" else np.swapaxes(w, -1, -2)
    return {"router": p["router"], "experts": {n: cast(p[n]) for n in ("w1", "w3", "w2")}}


def _steer(x, p, toward=(), away=(), strength=8.0):
    """x pushed along the router columns of `toward` experts and away from those of `away`."""
    x = x.copy()
    for e in toward:
        x += strength * p["router"][:, e] / np.linalg.norm(p["router"][:, e])
    for e in away:
        x -= strength * p["router"][:, e] / np.linalg.norm(p["router"][:, e])
    return x


def _counts(x, p, k):
    return np.bincount(np.argsort(-(x @ p["router"]), axis=1)[:, :k].ravel(), minlength=p["router"].shape[1])


@pytest.mark.parametrize("strategy", moe.STRATEGIES)
@pytest.mark.parametrize("e,k,n", [(8, 2, 1), (8, 2, 3), (8, 2, 64), (4, 1, 17), (6, 3, 40), (8, 8, 5)])
def test_moe_matches_loop_reference(strategy, e, k, n):
    p = testing.moe_params(e)
    x = np.random.RandomState(n).randn(n, 32).astype(np.float32)
    ours = jax.jit(lambda x, p: moe.moe(x, p, k, strategy))(x, p)
    np.testing.assert_allclose(ours, testing.moe_loop_reference(x, p, k), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", moe.STRATEGIES)
@pytest.mark.parametrize("e,k,n", [(8, 2, 1), (8, 2, 16), (8, 2, 17), (4, 1, 300), (6, 3, 40), (8, 8, 5)])
def test_moe_per_expert_matches_loop_reference(strategy, e, k, n, cpu_path):
    p = testing.moe_params(e)
    x = np.random.RandomState(n).randn(n, 32).astype(np.float32)
    ours = jax.jit(lambda x, p: moe.moe(x, p, k, strategy))(x, _per_expert(p))
    np.testing.assert_allclose(ours, testing.moe_loop_reference(x, p, k), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["stacked", "per_expert"])
@pytest.mark.parametrize("n", [16, 200])  # stacked: few rows (every expert on every row), then sorted groups
def test_moe_inactive_rows_are_zero_and_the_rest_equal_the_loop_reference(layout, n, cpu_path):
    # A serving engine's idle slots, a batch's padding: rows marked inactive come out zero (sorted last,
    # in no expert's group), and the active rows are what they are without them.
    p = testing.moe_params(8)
    x = np.random.RandomState(n).randn(n, 32).astype(np.float32)
    active = np.random.RandomState(n + 1).rand(n) < 0.25
    weights = p if layout == "stacked" else _per_expert(p)
    ours = np.asarray(jax.jit(lambda x, p, a: moe.moe(x, p, 2, active=a))(x, weights, active))
    np.testing.assert_allclose(ours[active], testing.moe_loop_reference(x[active], p, 2), rtol=1e-4, atol=1e-5)
    assert 0 < active.sum() < n and not ours[~active].any()


@pytest.mark.parametrize("layout", ["stacked", "per_expert"])
@pytest.mark.parametrize("n", [5, 40, 600])
def test_moe_skewed_routing_and_empty_experts(layout, n, cpu_path):
    # Every token chooses expert 5 (one group holds a third or half of all rows) and nobody
    # chooses experts 0 or 2: empty groups between full ones.
    p = testing.moe_params(8)
    x = _steer(np.random.RandomState(n).randn(n, 32).astype(np.float32), p, toward=[5], away=[0, 2], strength=12)
    counts = _counts(x, p, 2)
    assert counts[5] == n and counts[0] == counts[2] == 0, counts
    weights = p if layout == "stacked" else _per_expert(p)
    ours = jax.jit(lambda x, p: moe.moe(x, p, 2))(x, weights)
    np.testing.assert_allclose(ours, testing.moe_loop_reference(x, p, 2), rtol=1e-4, atol=1e-5)


def _grouped_ffn_numpy(xs, sizes, p):
    """float64 loop: row r through the expert whose group holds it; rows past the groups zero."""
    out = np.zeros(xs.shape, np.float64)
    ends = np.cumsum(sizes)
    for r in range(min(len(xs), ends[-1])):
        e = int(np.searchsorted(ends, r, side="right"))
        a, b = xs[r].astype(np.float64) @ p["w1"][e], xs[r].astype(np.float64) @ p["w3"][e]
        out[r] = ((a / (1 + np.exp(-a))) * b) @ p["w2"][e]
    return out


@pytest.mark.parametrize("impl", ["ragged_dot", "reference_stacked", "reference_per_expert", "cpu_kernel"])
@pytest.mark.parametrize("sizes,m", [([3, 0, 5, 1], 9), ([0, 0, 7, 0], 12), ([2, 2, 2, 2], 8), ([0, 0, 0, 0], 3),
                                     ([20, 0, 1, 30], 60)])
def test_grouped_ffn_implementations_match_numpy(impl, sizes, m):
    # The platform seam on its own: groups of any size (empty ones too), rows past the groups zero.
    p = testing.moe_params(4, seed=m)
    xs = np.random.RandomState(m).randn(m, 32).astype(np.float32)
    gs = jnp.asarray(sizes, jnp.int32)
    stacked = impl in ("ragged_dot", "reference_stacked")
    experts = {n: p[n] for n in ("w1", "w3", "w2")} if stacked else layout_lib.HFExperts(**_per_expert(p)["experts"])
    if impl == "ragged_dot":
        fn = moe._grouped_ffn_ragged  # grouped_ffn takes it beyond DENSE_MAX_ROWS rows
    elif impl.startswith("reference"):
        fn = moe.grouped_ffn_reference
    else:
        assert cpu_kernel.available(), "the CPU MoE kernel did not build (is g++ installed?)"
        fn, experts = cpu_kernel.moe_cpu, _per_expert(p)["experts"]
    ours = jax.jit(fn)(xs, gs, experts)
    np.testing.assert_allclose(ours, _grouped_ffn_numpy(xs, sizes, p), rtol=1e-4, atol=1e-5)


def test_cpu_kernel_calls_from_two_threads_each_get_their_own_result():
    # A helper lingers after its part of a call and takes the next call's part, from any thread's call
    # (csrc/moe_cpu.cc, Help): many short calls from two threads at once, each on its own rows, must
    # each equal the float64 loop on those rows.
    import threading

    assert cpu_kernel.available(), "the CPU MoE kernel did not build (is g++ installed?)"
    p = testing.moe_params(4, seed=1)
    experts = {n: jnp.asarray(np.swapaxes(p[n], -1, -2)) for n in ("w1", "w3", "w2")}
    sizes = [3, 1, 0, 4]
    run = jax.jit(lambda x: cpu_kernel.moe_cpu(x, jnp.asarray(sizes, jnp.int32), experts))
    inputs = [np.random.RandomState(t).randn(8, 32).astype(np.float32) for t in range(2)]
    want = [_grouped_ffn_numpy(x, sizes, p) for x in inputs]
    run(inputs[0]).block_until_ready()  # compiled before the threads start
    worst = [0.0, 0.0]

    def calls(t):
        for _ in range(200):
            got = np.asarray(run(inputs[t]))
            worst[t] = max(worst[t], float(np.abs(got - want[t]).max() / np.abs(want[t]).max()))

    threads = [threading.Thread(target=calls, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert max(worst) < 1e-5, worst


@pytest.mark.parametrize("n", [1, 4])
def test_sparse_decode_skips_unchosen_experts(n, cpu_path):
    # An expert whose weights are NaN must not touch the output when no token chose it.
    p = testing.moe_params(8)
    x = np.random.RandomState(0).randn(n, 32).astype(np.float32)
    chosen = set(np.argsort(-(x @ p["router"]), axis=1)[:, :2].ravel())
    unused = next(e for e in range(8) if e not in chosen)
    pe = _per_expert(p)
    pe["experts"] = {k: _nan_expert(v, unused) for k, v in pe["experts"].items()}
    out = jax.jit(lambda x, p: moe.moe(x, p, 2))(x, pe)
    np.testing.assert_allclose(out, testing.moe_loop_reference(x, p, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d,f,e,k,n,panel_min_rows", [
    # The row-dot path (a decode step's few rows).
    (32, 48, 8, 2, 1, None),    # batch-1 decode
    (37, 53, 8, 2, 3, None),    # rows and columns that fill no 16-float vector nor 4-row group
    (64, 96, 8, 8, 4, None),    # every expert on 4 rows: 32 rows in groups of 4
    (48, 40, 4, 1, 9, None),    # top-1
    (16, 17, 6, 3, 5, None),    # top-3, a single vector per row
    # The panel path (a prompt, a big batch): each expert's rows packed into panels of token columns.
    (32, 48, 8, 2, 40, None),   # 80 rows: panels of 32 and 16 columns
    (37, 53, 8, 2, 100, None),  # D, F that fill no 12-row tile (tails of 3 and 1 rows), 16-float vector
    (64, 200, 8, 8, 70, None),  # every expert on all 70 rows: 32 + 32 + 16 columns, 6 of them padding
    (48, 40, 4, 1, 40, None),   # top-1
    (16, 17, 6, 3, 5, 1),       # the panel path forced for 15 rows: one 16-column panel per expert, mostly padding
    (24, 36, 2, 1, 1, 1),       # one row, one expert chosen, the other skipped
    (16, 24, 8, 2, 2100, None),  # a long prompt: 4200 rows in three blocks (kPanelBlockRows), groups across them
])
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_cpu_kernel_matches_loop_reference(d, f, e, k, n, panel_min_rows, weights):
    p = testing.moe_params(e, d=d, f=f, seed=d + f)
    if weights == "bfloat16":
        # Weights stored in bfloat16, arithmetic in float32: the reference runs on the same rounded values.
        p = _bf16_experts(p)
        if panel_min_rows is None and n * k >= cpu_kernel.PANEL_MIN_ROWS:
            panel_min_rows = cpu_kernel.PANEL_MIN_ROWS  # the float32 threshold, so these run the panel path too
    x = np.random.RandomState(n).randn(n, d).astype(np.float32)
    assert cpu_kernel.available(), "the CPU MoE kernel did not build (is g++ installed?)"
    if panel_min_rows is not None:
        moe_cpu = functools.partial(cpu_kernel.moe_cpu, panel_min_rows=panel_min_rows)
        with mock.patch.object(cpu_kernel, "moe_cpu", moe_cpu):
            ours = jax.jit(lambda x, p: moe.moe(x, p, k))(x, _per_expert(p, weights))
    else:
        ours = jax.jit(lambda x, p: moe.moe(x, p, k))(x, _per_expert(p, weights))
    np.testing.assert_allclose(ours, testing.moe_loop_reference(x, p, k), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [3, 40])  # the row-dot path, the panel path
def test_cpu_kernel_silu_saturates(n):
    # Pre-activations far past +-88, where exp(-a) leaves the float range: silu(a) must still be
    # a for large a and 0 for very negative a (the kernel's 16-wide exp clamps its argument there).
    p = testing.moe_params(8)
    x = 60 * np.random.RandomState(n).randn(n, 32).astype(np.float32)
    a = np.einsum("nd,edf->enf", x, p["w1"])
    assert a.max() > 150 and a.min() < -150
    assert cpu_kernel.available()
    ours = jax.jit(lambda x, p: moe.moe(x, p, 2))(x, _per_expert(p))
    assert testing.rel_err(ours, testing.moe_loop_reference(x, p, 2)) < 1e-5


def _bf16_experts(p):
    """Stacked MoE params with w1, w3, w2 rounded to bfloat16 values (kept as float32 numpy)."""
    rounded = {n: np.asarray(jnp.asarray(p[n], jnp.bfloat16).astype(jnp.float32)) for n in ("w1", "w3", "w2")}
    assert any((rounded[n] != p[n]).any() for n in rounded)  # the rounding is not a no-op
    return {**p, **rounded}


@pytest.mark.parametrize("strategy", moe.STRATEGIES)
@pytest.mark.parametrize("n", [1, 4, 40, 100, 300])
def test_moe_bfloat16_experts_float32_compute(strategy, n, cpu_path):
    # Expert weights stored in bfloat16, activations float32 (load(..., expert_dtype="bfloat16")):
    # the kernel widens them as it reads (row-dot products up to PANEL_MIN_ROWS_BF16 rows, panels
    # from there), XLA ops promote them; both equal float32 arithmetic on the rounded weights.
    p = _bf16_experts(testing.moe_params(8))
    x = np.random.RandomState(n).randn(n, 32).astype(np.float32)
    pe = _per_expert(p, "bfloat16")
    assert cpu_kernel.moe_usable(jnp.asarray(x), jax.tree.leaves(pe["experts"])) == (cpu_path == "kernel")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = jax.jit(lambda x, p: moe.moe(x, p, 2, strategy))(x, pe)
    # XLA ops widen the weights at every call (slow on the CPU): said once per trace, never for the kernel.
    assert [str(w.message)[:40] for w in caught] == (["expert weights in bfloat16 with float32 "] if cpu_path == "xla" else [])
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, testing.moe_loop_reference(x, p, 2), rtol=1e-4, atol=1e-5)
    stacked = {**p, **{name: jnp.asarray(p[name], jnp.bfloat16) for name in ("w1", "w3", "w2")}}
    with pytest.warns(UserWarning, match="widen every expert"):
        ours = jax.jit(lambda x, p: moe.moe(x, p, 2, strategy))(x, stacked)
    np.testing.assert_allclose(ours, testing.moe_loop_reference(x, p, 2), rtol=1e-4, atol=1e-5)


def test_cpu_kernel_panel_path_skewed_and_empty_groups():
    # 300 rows that mostly choose expert 5 (ten 32-column panels) while expert 0 gets none.
    p = testing.moe_params(8)
    x = _steer(np.random.RandomState(2).randn(300, 32).astype(np.float32), p, toward=[5], away=[0], strength=3)
    counts = _counts(x, p, 2)
    assert counts[5] > 9 * 32 and counts[5] % 32 and counts[0] == 0, counts
    assert cpu_kernel.available()
    ours = jax.jit(lambda x, p: moe.moe(x, p, 2))(x, _per_expert(p))
    np.testing.assert_allclose(ours, testing.moe_loop_reference(x, p, 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,i,o", [(1, 37, 53), (1, 1024, 300), (3, 64, 100), (8, 16, 5)])
def test_cpu_linear_matches_numpy(n, i, o):
    rs = np.random.RandomState(n + i)
    x, w = rs.randn(n, i).astype(np.float32), rs.randn(o, i).astype(np.float32)
    assert cpu_kernel.available(), "the CPU kernel did not build (is g++ installed?)"
    ours = jax.jit(cpu_kernel.linear_cpu)(x, w)
    np.testing.assert_allclose(ours, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)


def _read_syscalls() -> int:
    """This process's read system calls so far (Linux's /proc/self/io, every thread's)."""
    return int(re.search(r"^syscr: (\d+)", open("/proc/self/io").read(), re.M).group(1))


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="counts system calls through Linux's /proc/self/io")
def test_cpu_kernel_calls_read_no_files():
    # glibc's std::thread::hardware_concurrency opens and reads /sys/devices/system/cpu/online at every call
    # (5 us), and the kernel asked it at every call, 50 times a decode step. 4 runs of 32 calls (a 1 MiB
    # weight in 16 chunks of 64 KiB, so helpers run) read twice now, 160 times or more before; the bound
    # leaves room for other threads' reads (pytest-xdist's channel).
    assert cpu_kernel.available(), "the CPU kernel did not build (is g++ installed?)"
    w = jnp.asarray(np.random.RandomState(0).randn(512, 512).astype(np.float32))

    @jax.jit
    def chain(x, w):
        for _ in range(32):
            x = cpu_kernel.linear_cpu(x, w, chunk_bytes=1 << 16) / 32.0
        return x

    x = jnp.ones((1, 512), jnp.float32)
    jax.block_until_ready(chain(x, w))  # compiled and run once
    before = _read_syscalls()
    for _ in range(4):
        x = chain(x, w)
    jax.block_until_ready(x)
    assert _read_syscalls() - before < 64


def test_cpu_kernel_skewed_rows():
    # Expert 5 gets all 11 tokens (three row blocks, the last of 3 rows); the rest share the others.
    p = testing.moe_params(8)
    x = _steer(np.random.RandomState(1).randn(11, 32).astype(np.float32), p, toward=[5])
    assert (np.argsort(-(x @ p["router"]), axis=1)[:, :2] == 5).any(axis=1).all()
    assert cpu_kernel.available()
    ours = jax.jit(lambda x, p: moe.moe(x, p, 2))(x, _per_expert(p))
    np.testing.assert_allclose(ours, testing.moe_loop_reference(x, p, 2), rtol=1e-4, atol=1e-5)


def test_dense_strategy_runs_every_expert(cpu_path):
    # "dense" must do all experts' work (the sparse gain compares against it): an unchosen
    # expert's NaN weights reach the output through its zero weight, 0 * NaN, only when it runs.
    p = testing.moe_params(8)
    x = np.random.RandomState(0).randn(1, 32).astype(np.float32)
    unused = next(e for e in range(8) if e not in set(np.argsort(-(x @ p["router"]), axis=1)[0, :2]))
    pe = _per_expert(p)
    pe["experts"] = {k: _nan_expert(v, unused) for k, v in pe["experts"].items()}
    sparse = jax.jit(lambda x, p: moe.moe(x, p, 2))(x, pe)
    dense = jax.jit(lambda x, p: moe.moe(x, p, 2, "dense"))(x, pe)
    np.testing.assert_allclose(sparse, testing.moe_loop_reference(x, p, 2), rtol=1e-4, atol=1e-5)
    assert np.isnan(dense).all()


def test_cpu_kernel_registers_itself_on_first_use():
    # A fresh process that calls the kernel before anything asked `available()`.
    code = ("import jax, numpy as np; from mixtral_jax import moe, testing; "
            "p = {'router': np.eye(8, 8, dtype=np.float32), 'experts': {'w1': np.ones((8, 4, 8), np.float32), "
            "'w3': np.ones((8, 4, 8), np.float32), 'w2': np.ones((8, 8, 4), np.float32)}}; "
            "print(float(jax.jit(lambda x, p: moe.moe(x, p, 2))(np.ones((1, 8), np.float32), p).sum()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    h = 8 / (1 + np.exp(-8)) * 8  # silu(1 . ones(8)) * (1 . ones(8)) on each of 4 rows of F
    assert float(out.stdout.split()[-1]) == pytest.approx(8 * 4 * h, rel=1e-5)  # gates sum to 1


def test_cpu_kernel_rejects_experts_not_stacked_per_weight():
    # The kernel takes each weight stacked over the experts ([E, out, in]); one expert's [out, in] matrix,
    # or a stack of another length than group_sizes, is refused with the expected form, not read out of bounds.
    assert cpu_kernel.available(), "the CPU MoE kernel did not build (is g++ installed?)"
    w = _per_expert(testing.moe_params(8))["experts"]
    x, sizes = jnp.ones((2, 32), jnp.float32), jnp.asarray([1, 1, 0, 0, 0, 0, 0, 0], jnp.int32)
    for bad in ({**w, "w1": w["w1"][0]}, {n: a[:4] for n, a in w.items()}):
        with pytest.raises(Exception, match=r"w1, w3 must be \[E, F, D\] and w2 \[E, D, F\]"):
            jax.block_until_ready(cpu_kernel.moe_cpu(x, sizes, {n: jnp.asarray(a) for n, a in bad.items()}))


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_cpu_kernels_read_one_layer_of_every_layers_buffer(quantize):
    # The per_expert layout keeps one buffer per weight for all the layers; the MoE and linear kernels read
    # layer l where it lies (`layer`). Three layers of different weights: layer l's MoE equals the float64
    # loop over that layer's (dequantized) weights, its linear product x @ w[l]ᵀ; a layer past the stack's
    # end is refused.
    assert cpu_kernel.available(), "the CPU MoE kernel did not build (is g++ installed?)"
    ps = [testing.moe_params(8, f=64, seed=s) for s in range(3)]  # F a whole number of int4 groups
    experts = {}
    for n in ("w1", "w3", "w2"):
        w = np.stack([p[n] for p in ps])  # [L, E, in, out]
        if quantize:
            q = quant.quantize(w, quantize[:4], in_axes=(-2,))
            for p, deq in zip(ps, np.asarray(quant.dequantize(q, jnp.float32))):
                p[n] = deq  # the reference runs on the weights the kernel reads
            w = q
        experts[n] = quant.transpose(jax.tree.map(jnp.asarray, w))  # [L, E, out, in]
    x = np.random.RandomState(3).randn(5, 32).astype(np.float32)
    for l in range(3):
        lp = {"router": jnp.asarray(ps[l]["router"]), "experts": layout_lib.HFExperts(**experts, layer=l)}
        ours = jax.jit(lambda x, lp: moe.moe(x, lp, 2))(x, lp)
        np.testing.assert_allclose(ours, testing.moe_loop_reference(x, ps[l], 2), rtol=1e-4, atol=1e-5)
    w = np.random.RandomState(4).randn(3, 40, 32).astype(np.float32)  # [L, O, I]
    stack, ref = w, w.astype(np.float64)
    if quantize:
        stack = quant.transpose(quant.quantize(np.swapaxes(w, -1, -2), "int8"))  # attention weights: int8
        ref = np.asarray(quant.dequantize(quant.transpose(stack), jnp.float32), np.float64).swapaxes(-1, -2)
    stack = jax.tree.map(jnp.asarray, stack)
    for l in range(3):
        got = jax.jit(lambda x, w: cpu_kernel.linear_cpu(x, w, layer=l))(x[:1], stack)
        np.testing.assert_allclose(got, x[:1].astype(np.float64) @ ref[l].T, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match=r"linear_cpu: x must be \[N, I\] and w \[O, I\]"):
        jax.block_until_ready(cpu_kernel.linear_cpu(jnp.asarray(x[:1]), stack, layer=3))
    sizes = jnp.asarray([5, 5, 0, 0, 0, 0, 0, 0], jnp.int32)
    with pytest.raises(Exception, match=r"w1, w3 must be \[E, F, D\] and w2 \[E, D, F\]"):
        jax.block_until_ready(cpu_kernel.moe_cpu(jnp.ones((10, 32), jnp.float32), sizes, experts, layer=3))


def test_cpu_kernel_build_failure_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXTRAL_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match="building the CPU MoE kernel failed"):
        cpu_kernel.build()
    assert not list(tmp_path.glob("*.so"))


def test_cpu_kernel_build_is_keyed_by_the_cpu(monkeypatch, tmp_path):
    # -march=native: a library built on another CPU (a shared home folder) may hold instructions this one
    # lacks, so it must not be found here; the same CPU finds its own build again.
    monkeypatch.setenv("MIXTRAL_JAX_CACHE", str(tmp_path))
    here = cpu_kernel._library_path()
    assert cpu_kernel._library_path() == here
    identity = cpu_kernel.cpu_identity()
    assert "flags" in identity or "Features" in identity or not os.path.exists("/proc/cpuinfo")  # x86 / ARM
    monkeypatch.setattr(cpu_kernel, "cpu_identity", lambda: "AuthenticAMD\nflags: fpu sse2 avx2")
    elsewhere = cpu_kernel._library_path()
    assert elsewhere != here and elsewhere.parent == here.parent


def test_cpu_kernel_not_used_for_bfloat16_activations(monkeypatch):
    # A bfloat16 model stays on XLA ops (the kernel computes in float32 only), with the same results.
    p = testing.moe_params(8)
    x = np.random.RandomState(0).randn(2, 32).astype(np.float32)
    pe = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), _per_expert(p))
    assert not cpu_kernel.moe_usable(jnp.asarray(x, jnp.bfloat16), jax.tree.leaves(pe["experts"]))
    ours = jax.jit(lambda x, p: moe.moe(x, p, 2))(jnp.asarray(x, jnp.bfloat16), pe)
    ref = testing.moe_loop_reference(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32),
                                     jax.tree.map(lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32), p), 2)
    assert testing.rel_err(np.asarray(ours, np.float32), ref) < 0.02


def _anon_huge_kb(address: int) -> int:
    """The kernel's own account: AnonHugePages of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head[1], 16) <= address < int(head[2], 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_cpu_weights_are_put_on_huge_pages_where_linux_allows():
    # A decode step streams its weights once, faster from huge pages; where THP is "madvise" XLA's buffers
    # get 4 KiB pages unless asked (docs/performance.md#weights-on-huge-pages). MADV_COLLAPSE: Linux 6.1+.
    model = mj.init_random(from_hf_dict(testing.TINY_HF, name="tiny"), seed=0, dtype="float32")
    weight = model.params()["lm_head"]
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    release = tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2])
    if not os.path.exists(thp) or "[never]" in open(thp).read() or release < (6, 1):
        assert cpu_kernel.use_huge_pages(model.params()) == 0
        return
    assert _anon_huge_kb(weight.unsafe_buffer_pointer()) >= 2048  # init_random asked for them
    assert cpu_kernel.use_huge_pages(model.params()) >= 2 << 20


@pytest.mark.parametrize("n", [1, 3, layers.FEATURE_MAJOR_MAX_ROWS + 1])  # 1: the CPU kernel
def test_linear_t_feature_and_token_major(n):
    rs = np.random.RandomState(n)
    x, w = rs.randn(n, 32).astype(np.float32), rs.randn(48, 32).astype(np.float32)
    np.testing.assert_allclose(jax.jit(layers.linear_t)(x, w), x.astype(np.float64) @ w.T.astype(np.float64),
                               rtol=1e-5, atol=1e-5)


def test_moe_block_matches_transformers():
    hf = testing.hf_model(num_local_experts=4, num_experts_per_tok=2)
    cfg = testing.config_of(hf)
    params = convert.params_from_state_dict(testing.state_dict_numpy(hf), cfg)
    lp = {k: jnp.asarray(v[1]) for k, v in params["layers"].items()}
    x = np.random.RandomState(0).randn(2, 7, cfg.hidden_size).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.layers[1].mlp(torch.tensor(x)).numpy()
    for strategy in moe.STRATEGIES:
        np.testing.assert_allclose(moe.moe(jnp.asarray(x), lp, 2, strategy), ref, rtol=1e-4, atol=1e-5)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown MoE strategy"):
        moe.moe(jnp.zeros((1, 32)), testing.moe_params(8), 2, "ragged")


# ---------------------------------------------------------------- whole model vs transformers

MODEL_CASES = {
    "default": {},
    "mqa_4experts_top1": dict(num_local_experts=4, num_experts_per_tok=1, num_key_value_heads=1),
    "theta1e4_window5": dict(rope_theta=1e4, sliding_window=5),
    "vocab32768_6experts_top3": dict(vocab_size=32768, num_local_experts=6, num_experts_per_tok=3),
}


@pytest.mark.parametrize("layout", layout_lib.LAYOUTS)
@pytest.mark.parametrize("case", MODEL_CASES)
def test_logits_match_transformers(case, layout):
    hf = testing.hf_model(seed=1, **MODEL_CASES[case])
    cfg = testing.config_of(hf)
    model = testing.our_model(hf, layout)
    assert model.layout == layout
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12))
    ref = testing.hf_logits(hf, tokens)
    for strategy in moe.STRATEGIES:
        logits = mj.forward(model, tokens, strategy=strategy)
        assert logits.dtype == jnp.float32 and logits.shape == (2, 12, cfg.vocab_size)
        assert testing.rel_err(logits, ref) <= 1e-4, strategy


@pytest.mark.parametrize("layout", layout_lib.LAYOUTS)
@pytest.mark.parametrize("window", [None, 100])
def test_long_prompt_chunked_attention_matches_transformers(layout, window):
    # 300 tokens: prefill attention runs in causal query chunks of attention.QUERY_CHUNK (128).
    hf = testing.hf_model(seed=4, max_position_embeddings=512, sliding_window=window, num_hidden_layers=1)
    model = testing.our_model(hf, layout)
    tokens = np.random.RandomState(1).randint(0, model.cfg.vocab_size, (1, 300))
    assert 300 > 2 * attention.QUERY_CHUNK
    assert testing.rel_err(mj.forward(model, tokens), testing.hf_logits(hf, tokens)) <= 1e-4


def test_init_random_dtype_and_eval_shape():
    cfg = mj.load_config("tiny")
    model = mj.init_random(cfg, seed=0, dtype="bfloat16", layout="stacked")
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(model.params()))
    assert model.params()["layers"]["w1"].shape == (4, 8, 64, 224)
    per_expert = mj.init_random(cfg, seed=0, dtype="bfloat16")  # the default on one CPU device
    assert per_expert.layout == "per_expert"
    layers = per_expert.params()["layers"]
    assert layers["experts"]["w1"].shape == (4, 8, 224, 64) and layers["experts"]["w2"].shape == (4, 8, 64, 224)
    # Same seed, same weights: per_expert is the stacked tensors in HF's [out, in] layout, still one buffer per
    # weight for all the layers (wq, wk, wv fused).
    np.testing.assert_array_equal(layers["experts"]["w2"][2, 3], model.params()["layers"]["w2"][2, 3].T)
    stacked = model.params()["layers"]
    np.testing.assert_array_equal(layers["wqkv"][1, :64], stacked["wq"][1].reshape(64, -1).T)  # H * Dh = 64
    np.testing.assert_array_equal(layers["wqkv"][1, -32:], stacked["wv"][1].reshape(64, -1).T)  # K * Dh = 32
    np.testing.assert_array_equal(layers["wo"][1], stacked["wo"][1].reshape(-1, 64).T)
    np.testing.assert_array_equal(layers["router"], stacked["router"])
    np.testing.assert_array_equal(per_expert.params()["lm_head"], model.params()["lm_head"].T)
    logits = mj.forward(model, np.array([[1, 2, 3]]))
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_per_expert_layout_on_a_mesh_is_one_clear_error():
    cfg = mj.load_config("tiny")
    mesh = mj.make_mesh("expert=8")  # the tests' 8 virtual CPU devices
    with pytest.raises(ValueError, match="per_expert.*one device"):
        mj.init_random(cfg, mesh=mesh, layout="per_expert")
    per_expert = mj.init_random(cfg, layout="per_expert").params()
    with pytest.raises(ValueError, match="per_expert.*one device"):
        Mixtral(cfg, per_expert, mesh)
