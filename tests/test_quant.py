"""Quantized experts (quant.py): the round-trip error against its analytic bound, every MoE path against the
float64 loop reference on the dequantized weights (and bit-equal to the float path fed those weights),
sharded = unsharded, byte counts by hand, and quantize-at-load = convert --quantize."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint, config, convert, cpu_kernel, model as model_lib, moe, plan, quant, testing

K = 2
EPS32 = np.finfo(np.float32).eps
SCALE_ULP = {"int8": 2.0**-23, "int4": 2.0**-10}  # float32 and float16 scales: one unit of rounding up


@pytest.mark.parametrize("mode", quant.MODES)
def test_round_trip_within_the_analytic_bound(mode):
    rs = np.random.RandomState(0)
    w = (rs.standard_t(3, (2, 64, 48)) * 0.02).astype(np.float32)  # heavy tails
    w[0, :, 5] *= 50  # an outlier channel
    w[1, :32, 7] = 0  # an all-zero tile
    q = quant.quantize(w, mode)
    g, qmax = (64, 127) if mode == "int8" else (32, 7)
    assert q["qvalue"].shape == ((2, 64, 48) if mode == "int8" else (2, 32, 48))
    assert (q["qvalue"].dtype, q["scale"].dtype, q["scale"].shape) == (
        (np.int8, np.float32, (2, 1, 48)) if mode == "int8" else (np.uint8, np.float16, (2, 2, 48)))
    absmax = np.abs(w.reshape(2, 64 // g, g, 48)).max(axis=2).astype(np.float64)  # per tile
    s = q["scale"].astype(np.float64)
    nonzero = absmax > 0
    # The scale is the tile's max |w| / qmax, rounded up by at most one unit of its dtype.
    assert (s * qmax >= absmax).all()
    assert (s[nonzero] <= absmax[nonzero] / qmax * (1 + SCALE_ULP[mode])).all()
    deq = np.asarray(quant.dequantize(q, jnp.float32), np.float64)
    err = np.abs(deq - w)
    bound = np.repeat(s, g, axis=1) * (0.5 + 2 * qmax * EPS32)  # half a step, plus float32 rounding
    assert (err <= bound).all()
    assert (err / bound).max() > 0.9  # the bound is attained: it says something
    assert (deq[1, :32, 7] == 0).all()
    np.testing.assert_array_equal(quant.error_bound(q), bound.astype(np.float32))


def test_int4_packs_two_values_per_byte_low_nibble_first():
    w = np.zeros((32, 1), np.float32)
    w[:4, 0] = [-7, 7, 3, -1]  # max |w| 7: scale exactly 1, qvalue = w
    q = quant.quantize(w, "int4")
    assert q["scale"][0, 0] == 1
    assert q["qvalue"][0, 0] == (-7 & 0xF) | (7 << 4) == 121
    assert q["qvalue"][1, 0] == 3 | ((-1 & 0xF) << 4) == 243
    np.testing.assert_array_equal(quant.dequantize(q, jnp.float32), w)
    np.testing.assert_array_equal(quant.dequantize(quant.transpose(q), jnp.float32, axis=-1), w.T)


@pytest.fixture(scope="module", params=quant.MODES)
def moe_case(request):
    """Stacked MoE weights quantized with one mode, their dequantized float weights, and the loop reference."""
    mode = request.param
    p = testing.moe_params(8, d=64, f=128)
    q = {"router": p["router"], **{n: quant.quantize(p[n], mode) for n in ("w1", "w3", "w2")}}
    deq = {"router": p["router"], **{n: np.asarray(quant.dequantize(q[n], jnp.float32)) for n in ("w1", "w3", "w2")}}
    x = np.random.RandomState(1).randn(130, 64).astype(np.float32)
    return mode, q, deq, x, testing.moe_loop_reference(x, deq, K)


def _per_expert(p):
    return {"router": p["router"],
            "experts": [{n: quant.transpose(jax.tree.map(lambda a: a[e], p[n])) for n in ("w1", "w3", "w2")}
                        for e in range(8)]}


@pytest.mark.parametrize("n", [3, 130])  # a few rows: every expert once per row; many: lax.ragged_dot
def test_stacked_moe_equals_loop_reference_and_the_float_path_bit_for_bit(moe_case, n):
    _, q, deq, x, ref = moe_case
    run = jax.jit(lambda x, p: moe.moe(x, p, K))
    ours = np.asarray(run(x[:n], q))
    np.testing.assert_allclose(ours, ref[:n], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ours, run(x[:n], deq))


@pytest.mark.parametrize("path", ["kernel", "xla"])
def test_per_expert_moe_equals_loop_reference(moe_case, path, monkeypatch):
    _, q, deq, x, ref = moe_case
    experts = _per_expert(q)["experts"]
    weights = [w[n] for w in experts for n in ("w1", "w3", "w2")]
    if path == "xla":
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    assert cpu_kernel.moe_usable(jnp.asarray(x), weights) == (path == "kernel")
    ours = jax.jit(lambda x, p: moe.moe(x, p, K))(x[:40], _per_expert(q))
    np.testing.assert_allclose(ours, ref[:40], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("panel_min_rows", [1, 10**6])  # the panel path; row-dot products
def test_cpu_kernel_reads_quantized_weights_directly(moe_case, panel_min_rows):
    _, q, deq, x, _ = moe_case
    sizes = np.array([5, 0, 12, 3, 8, 0, 7, 5])  # 40 rows sorted by expert; empty groups; 2 rows past the end
    ours = cpu_kernel.moe_cpu(jnp.asarray(x[:42]), jnp.asarray(sizes, jnp.int32), _per_expert(q)["experts"],
                              panel_min_rows=panel_min_rows)
    want = np.zeros((42, 64))
    for r, e in enumerate(np.repeat(np.arange(8), sizes)):
        a, b = (x[r].astype(np.float64) @ deq[n][e] for n in ("w1", "w3"))
        want[r] = (a / (1 + np.exp(-a)) * b) @ deq["w2"][e]
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)


def test_expert_parallel_moe_equals_loop_reference_and_one_device(moe_case):
    mode, q, _, x, ref = moe_case
    mesh = mj.make_mesh("expert=4,tensor=2")  # w2's int4 scales are split over tensor with its rows
    ours = jax.jit(lambda x, p: moe.moe(x, p, K, mesh=mesh))(x[:40], q)
    np.testing.assert_allclose(ours, ref[:40], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, jax.jit(lambda x, p: moe.moe(x, p, K))(x[:40], q), rtol=1e-5, atol=1e-5)


def test_int4_groups_may_not_straddle_tensor_shards():
    p = testing.moe_params(8, d=64, f=96)  # 48 rows of F per tensor shard: not whole groups of 32
    q = {"router": p["router"], **{n: quant.quantize(p[n], "int4") for n in ("w1", "w3", "w2")}}
    with pytest.raises(ValueError, match="int4 experts keep groups of 32 along intermediate_size=96, which "
                                         "tensor=2 splits into 48 per device"):
        moe.moe(jnp.zeros((4, 64)), q, K, mesh=mj.make_mesh("expert=4,tensor=2"))


CFG = config.from_hf_dict({**testing.TINY_HF, "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 128},
                          name="tiny128")


@pytest.mark.parametrize("mode", quant.MODES)
def test_param_bytes_count_qvalues_and_scales(mode):
    l, e, d, f = CFG.num_hidden_layers, CFG.num_local_experts, CFG.hidden_size, CFG.intermediate_size
    weights = l * e * 3 * d * f
    if mode == "int8":  # one byte each; a float32 scale per output channel of w1, w3 (F) and w2 (D)
        experts = weights + 4 * l * e * (2 * f + d)
    else:  # half a byte each; a float16 scale per 32 inputs
        experts = weights // 2 + 2 * l * e * (2 * (d // 32) * f + (f // 32) * d)
    dense = mj.param_bytes(CFG, "float32")
    got = mj.param_bytes(CFG, "float32", quantize=mode)
    assert got["total"] == dense["total"] - 4 * weights + experts
    assert got["active"] == got["total"] - experts // e * (e - K)
    # The dry run's bytes per device on expert=4, tensor=2: scales split like their weights, except int8
    # w2's per-channel scales over D (not split over tensor: each F shard needs all of them).
    mesh = mj.make_mesh("expert=4,tensor=2")
    layers = model_lib.abstract_params(CFG, "float32", mesh, quantize=mode)["layers"]
    want = experts // 8 + (4 * l * e * d // 8 if mode == "int8" else 0)
    assert plan._bytes_per_device({n: layers[n] for n in ("w1", "w3", "w2")}) == want


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    model = mj.init_random(CFG, seed=3, layout="stacked")
    return model, checkpoint.save(model, tmp_path_factory.mktemp("float") / "ckpt")


def _same(a, b):
    leaves = jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))
    return len(leaves) > 0 and all(leaves)


@pytest.mark.parametrize("mode", quant.MODES)
def test_quantize_at_load_equals_quantizing_in_memory(float_ckpt, mode):
    _, path = float_ckpt
    loaded = mj.load(path, dtype="float32", layout="stacked", quantize=mode)
    assert loaded.quantization == mode
    assert _same(loaded.params(), mj.init_random(CFG, seed=3, layout="stacked", quantize=mode).params())


def test_int4_model_equals_the_float_model_on_dequantized_experts_on_every_layout_and_mesh(float_ckpt, tmp_path):
    _, path = float_ckpt
    stacked = mj.load(path, dtype="float32", layout="stacked", quantize="int4")
    tokens = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 7))
    logits = np.asarray(mj.forward(stacked, tokens))
    # The float model with the dequantized experts: the same arithmetic, the same bits.
    params = stacked.params()
    for n in ("w1", "w3", "w2"):
        params["layers"][n] = quant.dequantize(params["layers"][n], jnp.float32)
    np.testing.assert_array_equal(logits, mj.forward(mj.Mixtral(CFG, params), tokens))
    per_expert = mj.load(path, dtype="float32", quantize="int4")
    sharded = mj.load(path, dtype="float32", quantize="int4", mesh=mj.make_mesh("expert=4,tensor=2"))
    for other in (per_expert, sharded):
        np.testing.assert_allclose(mj.forward(other, tokens), logits, rtol=1e-5, atol=1e-5)
    # save streams the per_expert model's quantized experts back into the stacked arrays.
    saved = mj.load(checkpoint.save(per_expert, tmp_path / "q"), dtype="float32", layout="stacked")
    assert saved.quantization == "int4" and _same(saved.params(), stacked.params())


@pytest.fixture(scope="module")
def hf_dir(float_ckpt, tmp_path_factory):
    """The float model as an HF safetensors checkpoint (hub key names, torch [out, in] layout)."""
    import json
    import os

    from safetensors.numpy import save_file

    model, _ = float_ckpt
    p = jax.tree.map(np.asarray, model.params())
    cfg, ly = CFG, p["layers"]
    tensors = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"],
               "lm_head.weight": p["lm_head"].T}
    for l in range(cfg.num_hidden_layers):
        pre = f"model.layers.{l}."
        tensors |= {pre + "input_layernorm.weight": ly["attn_norm"][l],
                    pre + "post_attention_layernorm.weight": ly["mlp_norm"][l],
                    pre + "self_attn.q_proj.weight": ly["wq"][l].reshape(cfg.hidden_size, -1).T,
                    pre + "self_attn.k_proj.weight": ly["wk"][l].reshape(cfg.hidden_size, -1).T,
                    pre + "self_attn.v_proj.weight": ly["wv"][l].reshape(cfg.hidden_size, -1).T,
                    pre + "self_attn.o_proj.weight": ly["wo"][l].reshape(-1, cfg.hidden_size).T,
                    pre + "block_sparse_moe.gate.weight": ly["router"][l].T}
        for n in ("w1", "w3", "w2"):
            for e in range(cfg.num_local_experts):
                tensors[convert.EXPERT_KEYS[n].format(l=l, e=e)] = ly[n][l, e].T
    path = tmp_path_factory.mktemp("hf")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dataclasses.replace(cfg, dtype="float32").to_hf_dict(), f)
    return str(path)


@pytest.mark.parametrize("mode", quant.MODES)
def test_convert_quantize_equals_quantize_at_load(float_ckpt, hf_dir, tmp_path, mode):
    _, path = float_ckpt
    out = mj.convert_hf_checkpoint(hf_dir, tmp_path / "q", dtype="float32", quantize=mode)
    stored = mj.load(out, dtype="float32", layout="stacked")  # as stored: quantized
    assert stored.quantization == mode
    assert _same(stored.params(), mj.load(path, dtype="float32", layout="stacked", quantize=mode).params())
    other = {"int8": "int4", "int4": "int8"}[mode]
    with pytest.raises(mj.CheckpointError, match=f"holds {mode} experts; load it with quantize='{mode}'"):
        mj.load(out, quantize=other)


def test_bad_quantize_values_are_one_clear_error(float_ckpt, hf_dir, tmp_path):
    _, path = float_ckpt
    for call in (lambda: mj.load(path, quantize="int3"),
                 lambda: mj.convert_hf_checkpoint(hf_dir, tmp_path / "x", quantize="int3"),
                 lambda: mj.init_random(CFG, quantize="q4_0")):
        with pytest.raises(ValueError, match="unknown quantization .*; choose one of int8, int4"):
            call()
    with pytest.raises(ValueError, match="expert_dtype and quantize both set the experts' storage"):
        mj.load(path, quantize="int8", expert_dtype="bfloat16")
