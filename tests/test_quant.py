"""Quantized weights (quant.py): the round-trip error against its analytic bound, every MoE path and the
attention projections / lm_head products against float64 references on the dequantized weights (and
bit-equal to the float path fed those weights), sharded = unsharded, byte counts by hand, and
quantize-at-load = convert --quantize."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mixtral_jax as mj
from mixtral_jax import checkpoint, config, convert, cpu_kernel, layers, model as model_lib, moe, plan, quant, testing

K = 2
EPS32 = np.finfo(np.float32).eps


def _check_scales(tiles, s, lo, hi, sdt, slack=0.0):
    """Every tile's scale puts each w / scale within `slack` steps of [lo, hi] (int8: 0, nothing clipped; int4:
    half a step, so clipping errs no more than rounding), and is no larger than the smallest scale that clips
    nothing: one unit below it in its dtype, some value of the tile would fall outside [lo, hi] (tiles
    [..., g, ...] over axis -2, s [..., 1, ...], float64)."""
    ratio = tiles / s
    assert ((ratio >= lo - slack) & (ratio <= hi + slack)).all()
    below = np.nextafter(s.astype(sdt), np.asarray(0, sdt)).astype(np.float64)
    r = tiles / below
    outside = ((r < lo) | (r > hi)).any(axis=-2, keepdims=True)
    nonzero = (tiles != 0).any(axis=-2, keepdims=True)
    assert outside[nonzero].all()


@pytest.mark.parametrize("mode", quant.WIDTHS)
def test_round_trip_within_the_analytic_bound(mode):
    rs = np.random.RandomState(0)
    w = (rs.standard_t(3, (2, 64, 48)) * 0.02).astype(np.float32)  # heavy tails
    w[0, :, 5] *= 50  # an outlier channel
    w[1, :32, 7] = 0  # an all-zero tile
    q = quant.quantize(w, mode)
    g, (lo, hi) = (64, (-127, 127)) if mode == "int8" else (32, (-8, 7))
    assert q["qvalue"].shape == ((2, 64, 48) if mode == "int8" else (2, 32, 48))
    assert (q["qvalue"].dtype, q["scale"].dtype, q["scale"].shape) == (
        (np.int8, np.float32, (2, 1, 48)) if mode == "int8" else (np.uint8, np.float16, (2, 2, 48)))
    s = q["scale"].astype(np.float64)
    slack = 0.5 if mode == "int4" else 0.0
    _check_scales(w.reshape(2, 64 // g, g, 48).astype(np.float64), s[:, :, None], lo, hi, q["scale"].dtype, slack)
    deq = np.asarray(quant.dequantize(q, jnp.float32), np.float64)
    err = np.abs(deq - w)
    bound = np.repeat(s, g, axis=1) * (0.5 + 2 * (max(-lo, hi) + slack) * EPS32)  # half a step, plus float32 rounding
    assert (err <= bound).all()
    assert (err / bound).max() > 0.9  # the bound is attained: it says something
    assert (deq[1, :32, 7] == 0).all()
    np.testing.assert_array_equal(quant.error_bound(q), bound.astype(np.float32))


def test_int4_scale_search_errs_less_than_the_scale_that_clips_nothing_and_than_max_over_7():
    # Each group's scale is the one of its candidates with the least squared error weighted by |w| + the
    # group's RMS; the candidates include the smallest scale that clips nothing, so under that weighting no
    # group errs more than with it. Against the textbook max|w| / 7 over [-7, 7], whose step is coarser,
    # the plain RMS error on normal weights drops by about 10%; the groups use all 16 values.
    rs = np.random.RandomState(3)
    w = rs.standard_normal((2048, 64)).astype(np.float32)
    q = quant.quantize(w, "int4")
    tiles = w.reshape(64, 32, 64).astype(np.float64)
    s = q["scale"].astype(np.float64)[:, None, :]
    deq = np.asarray(quant.dequantize(q, jnp.float32), np.float64).reshape(tiles.shape)
    assert np.rint(deq / s).min() == -8 and np.rint(deq / s).max() == 7
    weight = np.abs(tiles) + np.sqrt(np.mean(tiles ** 2, axis=1, keepdims=True))
    top, bottom = tiles.max(axis=1, keepdims=True), -tiles.min(axis=1, keepdims=True)
    clip_free = np.maximum(top / 7, bottom / 8).astype(np.float16)
    up = (clip_free.astype(np.float64) * 7 < top) | (clip_free.astype(np.float64) * 8 < bottom)
    clip_free = np.where(up, np.nextafter(clip_free, np.float16(np.inf)), clip_free).astype(np.float64)  # rounded up
    other = np.clip(np.rint(tiles / clip_free), -8, 7) * clip_free
    mine_err, other_err = ((weight * (d - tiles) ** 2).sum(axis=1) for d in (deq, other))
    assert (mine_err <= other_err * (1 + 1e-6)).all() and (mine_err < other_err).mean() > 0.3
    plain_scale = (np.abs(tiles).max(axis=1, keepdims=True) / 7).astype(np.float16).astype(np.float64)
    plain = np.clip(np.rint(tiles / plain_scale), -7, 7) * plain_scale
    rms = lambda d: np.sqrt(np.mean((d - tiles) ** 2))
    assert rms(deq) < 0.93 * rms(plain)


def test_int8_in_groups_along_the_last_axis_round_trips_within_the_bound_and_embeds_the_rows():
    # The embedding's int8: [V, D] with a scale per 32 values of a row; a lookup dequantizes the rows it reads.
    rs = np.random.RandomState(1)
    w = (rs.standard_t(3, (40, 96)) * 0.02).astype(np.float32)
    w[3, 40:50] *= 60  # an outlier inside one group
    w[5, :32] = 0  # an all-zero group
    q = quant.quantize(w, "int8", (-1,), 32)
    assert (q["qvalue"].shape, q["scale"].shape, q["scale"].dtype) == ((40, 96), (40, 3), np.float32)
    absmax = np.abs(w.reshape(40, 3, 32)).max(axis=2).astype(np.float64)
    s = q["scale"].astype(np.float64)
    _check_scales(w.reshape(40, 3, 32).astype(np.float64).transpose(0, 2, 1), s[:, None, :], -127, 127, np.float32)
    deq = np.asarray(quant.dequantize(q, jnp.float32), np.float64)
    bound = np.repeat(s, 32, axis=1) * (0.5 + 2 * 127 * EPS32)
    err = np.abs(deq - w)
    assert (err <= bound).all() and (err / bound).max() > 0.9
    assert (err[3, 64:] <= 0.5 * absmax[3, 2] / 127 * 1.01).all()  # the outlier's group alone takes its step
    tokens = np.array([[5, 3, 39], [0, 0, 7]])
    np.testing.assert_array_equal(layers.embed(tokens, q, jnp.float32), deq.astype(np.float32)[tokens])


def test_int4_packs_a_group_of_32_into_16_bytes_in_llama_cpp_order():
    w = np.zeros((32, 1), np.float32)
    w[[0, 16, 1, 17], 0] = [-8, 7, 3, -1]  # scale exactly 1, qvalue = w
    q = quant.quantize(w, "int4")
    assert q["scale"][0, 0] == 1
    assert q["qvalue"][0, 0] == (-8 & 0xF) | (7 << 4) == 120  # value i in the low nibble of byte i, 16 + i high
    assert q["qvalue"][1, 0] == 3 | ((-1 & 0xF) << 4) == 243
    np.testing.assert_array_equal(quant.dequantize(q, jnp.float32), w)
    np.testing.assert_array_equal(quant.dequantize(quant.transpose(q), jnp.float32, axis=-1), w.T)


@pytest.fixture(scope="module", params=quant.WIDTHS)
def moe_case(request):
    """Stacked MoE weights quantized with one mode, their dequantized float weights, and the loop reference."""
    mode = request.param
    p = testing.moe_params(8, d=64, f=128)
    q = {"router": p["router"], **{n: quant.quantize(p[n], mode) for n in ("w1", "w3", "w2")}}
    deq = {"router": p["router"], **{n: np.asarray(quant.dequantize(q[n], jnp.float32)) for n in ("w1", "w3", "w2")}}
    x = np.random.RandomState(1).randn(130, 64).astype(np.float32)
    return mode, q, deq, x, testing.moe_loop_reference(x, deq, K)


def _per_expert(p):
    return {"router": p["router"], "experts": {n: quant.transpose(p[n]) for n in ("w1", "w3", "w2")}}


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
    weights = [experts[n] for n in ("w1", "w3", "w2")]
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


@pytest.mark.parametrize("group", [32, 64])
def test_cpu_kernel_int4_row_dots_in_blocks_of_128_equal_float64_products(group):
    """The decode path's int4 row-dot products read 128 values per load in a reordered input: D 448 is 3 whole
    blocks and 2 groups more, F 256 two blocks; 1 to 5 rows per expert (every row count the
    products take at once, and 4 + 1); groups of 64 take the scales one at a time."""
    d, f = 448, 256
    rs = np.random.RandomState(3)
    experts, deq = [], []
    for _ in range(4):
        ws = {n: rs.randn(*shape).astype(np.float32) * 0.1 for n, shape in (("w1", (f, d)), ("w3", (f, d)),
                                                                           ("w2", (d, f)))}
        q = {n: quant.transpose(quant.quantize(w.T, "int4")) for n, w in ws.items()}  # [out, in], groups of 32
        if group == 64:  # the same values with one float16 scale per 64 (the larger of each pair's)
            q = {n: {"qvalue": v["qvalue"], "scale": np.maximum(v["scale"][:, 0::2], v["scale"][:, 1::2])}
                 for n, v in q.items()}
        experts.append({n: {k: jnp.asarray(a) for k, a in v.items()} for n, v in q.items()})
        deq.append({n: np.asarray(quant.dequantize(v, jnp.float32, axis=-1), np.float64) for n, v in q.items()})
    sizes = np.array([1, 2, 4, 5])  # 12 rows; 2 rows past the end come out zero
    x = rs.randn(14, d).astype(np.float32)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *experts)  # each weight [E, out, in], as the per_expert layout
    ours = np.asarray(cpu_kernel.moe_cpu(jnp.asarray(x), jnp.asarray(sizes, jnp.int32), stacked,
                                         panel_min_rows=10**6))
    want = np.zeros((14, d))
    for r, e in enumerate(np.repeat(np.arange(4), sizes)):
        a, b = (deq[e][n] @ x[r].astype(np.float64) for n in ("w1", "w3"))
        want[r] = deq[e]["w2"] @ (a / (1 + np.exp(-a)) * b)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("rows,path", [(1, "kernel"), (5, "kernel"), (70, "kernel"), (5, "xla")])
@pytest.mark.parametrize("inputs,group", [(100, None), (160, 32), (96, 16)])
def test_int8_dense_product_equals_the_float64_one_with_the_dequantized_weight(rows, path, inputs, group,
                                                                              monkeypatch):
    """layers.linear_t with an int8 [out, in] weight (the lm_head per output channel; the attention
    projections in groups of 32 inputs, or of a smaller head): the kernel's row-dot products up to
    FEATURE_MAJOR_MAX_ROWS rows, else (or without the kernel) the dequantized weight's product. 100 inputs
    run the kernel's scalar tail, 160 its pairs of groups and a last single one, groups of 16 its
    value-by-value scales."""
    rs = np.random.RandomState(2)
    w = (rs.randn(inputs, 200) * 0.02).astype(np.float32)  # stacked [in, out]
    w[:, 3] *= 40  # an outlier channel: its own scales
    w[:16, 5] *= 40  # an outlier group
    q = quant.transpose(quant.quantize(w, "int8", (-2,), group))  # per_expert [out, in], scale [out, in / group]
    assert q["qvalue"].shape == (200, inputs) and q["scale"].shape == (200, 1 if group is None else inputs // group)
    deq = np.asarray(quant.dequantize(q, jnp.float32, axis=-1))
    np.testing.assert_array_equal(deq, np.asarray(quant.dequantize(quant.quantize(w, "int8", (-2,), group),
                                                                   jnp.float32)).T)
    assert (np.abs(deq.T - w) <= quant.error_bound(quant.quantize(w, "int8", (-2,), group))).all()
    if path == "xla":
        monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    x = rs.randn(rows, inputs).astype(np.float32)
    # A fresh trace: jax.jit(layers.linear_t) would reuse the kernel case's trace of the same shapes.
    ours = np.asarray(jax.jit(lambda x, q: layers.linear_t(x, q))(x, q))
    np.testing.assert_allclose(ours, x.astype(np.float64) @ deq.T.astype(np.float64), rtol=1e-5, atol=1e-6)
    if rows > layers.FEATURE_MAJOR_MAX_ROWS:  # dequantized first: the float path's bits (XLA:CPU picks another
        # dot routine for a few rows of a computed weight than of a parameter, so only here)
        np.testing.assert_array_equal(ours, jax.jit(layers.linear_t)(x, jnp.asarray(deq)))


def test_int8_weights_with_several_input_axes_stay_within_the_bound():
    """wo [L, H, Dh, D]: one scale per output channel over H and Dh, size 1 on both."""
    rs = np.random.RandomState(4)
    w = (rs.standard_t(3, (2, 4, 8, 16)) * 0.02).astype(np.float32)
    q = quant.quantize(w, "int8", in_axes=(-3, -2))
    assert q["scale"].shape == (2, 1, 1, 16) and q["qvalue"].shape == w.shape
    _check_scales(w.reshape(2, 32, 16).astype(np.float64), q["scale"].reshape(2, 1, 16).astype(np.float64),
                  -127, 127, np.float32)
    err = np.abs(np.asarray(quant.dequantize(q, jnp.float32), np.float64) - w)
    assert (err <= q["scale"] * (0.5 + 2 * 127 * EPS32)).all()
    assert quant.axes(("layers", "heads", "head_dim", "embed"), "int8", (-3, -2))["scale"] == (
        "layers", None, None, "embed")


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
    h, kv, dh, v = CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim, CFG.vocab_size
    weights = l * e * 3 * d * f
    if quant.width(mode) == "int8":  # one byte each; a float32 scale per output channel of w1, w3 (F) and w2 (D)
        experts = weights + 4 * l * e * (2 * f + d)
    else:  # half a byte each; a float16 scale per 32 inputs
        experts = weights // 2 + 2 * l * e * (2 * (d // 32) * f + (f // 32) * d)
    # Attention projections, lm_head and embedding: int8, a float32 scale per 32 inputs (wq: H * Dh, wk and wv:
    # K * Dh outputs of D inputs) or per group of wo's head (Dh = 16 here: one group), per output channel
    # (lm_head: V) or per 32 values of a token's row (embed: V * D / 32), in the full modes.
    assert dh == 16
    dense_weights = l * (2 * d * h * dh + 2 * d * kv * dh) + 2 * d * v
    dense_scales = l * (d // 32 * (h * dh + 2 * kv * dh) + h * d) + v + v * d // 32
    dense = dense_weights + 4 * dense_scales if quant.dense(mode) else 4 * dense_weights
    floats = mj.param_bytes(CFG, "float32")
    got = mj.param_bytes(CFG, "float32", quantize=mode)
    assert got["total"] == floats["total"] - 4 * (weights + dense_weights) + experts + dense
    assert got["active"] == got["total"] - experts // e * (e - K)
    # The dry run's bytes per device on expert=4, tensor=2: scales split like their weights, except int8
    # w2's per-channel scales over D (not split over tensor: each F shard needs all of them); wq, wo and
    # their scales split over heads (tensor).
    mesh = mj.make_mesh("expert=4,tensor=2")
    layers = model_lib.abstract_params(CFG, "float32", mesh, quantize=mode)["layers"]
    want = experts // 8 + (4 * l * e * d // 8 if quant.width(mode) == "int8" else 0)
    assert plan._bytes_per_device({n: layers[n] for n in ("w1", "w3", "w2")}) == want
    if quant.dense(mode):
        assert plan._bytes_per_device({n: layers[n] for n in ("wq", "wo")}) == (
            2 * l * d * h * dh // 2 + 4 * l * (d // 32) * h * dh // 2 + 4 * l * h * d // 2)


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


def test_quantized_model_equals_the_float_model_on_dequantized_weights_on_every_layout_and_mesh(float_ckpt, tmp_path):
    _, path = float_ckpt
    mode = "int4"  # int4 experts, int8 attention projections and lm_head: both widths (the MoE tests cover int8 experts)
    stacked = mj.load(path, dtype="float32", layout="stacked", quantize=mode)
    tokens = np.random.RandomState(0).randint(0, CFG.vocab_size, (2, 7))
    logits = np.asarray(mj.forward(stacked, tokens))
    # The float model with the dequantized weights: the same arithmetic, the same bits.
    params = stacked.params()
    assert set(model_lib.quantized(mode)) == {("layers", n) for n in ("w1", "w3", "w2", "wq", "wk", "wv", "wo")} | {
        ("lm_head",), ("embed",)}
    for key in model_lib.quantized(mode):
        model_lib._replace(params, key, lambda w: quant.dequantize(w, jnp.float32))
    float_model = mj.Mixtral(CFG, params)
    np.testing.assert_array_equal(logits, mj.forward(float_model, tokens))
    per_expert = mj.load(path, dtype="float32", quantize=mode)  # the C++ kernel's products
    sharded = mj.load(path, dtype="float32", quantize=mode, mesh=mj.make_mesh("expert=4,tensor=2"))
    for other in (per_expert, sharded):
        np.testing.assert_allclose(mj.forward(other, tokens), logits, rtol=1e-5, atol=1e-5)
    # save streams the per_expert model's quantized weights back into the stacked arrays.
    saved = mj.load(checkpoint.save(per_expert, tmp_path / "q"), dtype="float32", layout="stacked")
    assert saved.quantization == mode and _same(saved.params(), stacked.params())


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


@pytest.mark.parametrize("mode", ["int8", "int4", "int4-experts"])
def test_convert_quantize_equals_quantize_at_load(float_ckpt, hf_dir, tmp_path, mode):
    _, path = float_ckpt
    out = mj.convert_hf_checkpoint(hf_dir, tmp_path / "q", dtype="float32", quantize=mode)
    stored = mj.load(out, dtype="float32", layout="stacked")  # as stored: quantized
    assert stored.quantization == mode
    assert _same(stored.params(), mj.load(path, dtype="float32", layout="stacked", quantize=mode).params())
    other = "int4" if mode == "int8" else "int8"
    with pytest.raises(mj.CheckpointError, match=f"holds {mode} weights; load it with quantize='{mode}'"):
        mj.load(out, quantize=other)


def test_a_checkpoint_with_a_float_embedding_has_it_quantized_while_loading(float_ckpt, hf_dir, tmp_path,
                                                                           monkeypatch):
    # int8 and int4 checkpoints converted before those modes covered the embedding store it as float.
    _, path = float_ckpt
    full = model_lib.quantized
    monkeypatch.setattr(model_lib, "quantized", lambda mode: {k: v for k, v in full(mode).items() if k != ("embed",)})
    out = mj.convert_hf_checkpoint(hf_dir, tmp_path / "q", dtype="float32", quantize="int8")
    monkeypatch.undo()
    loaded = mj.load(out, dtype="float32", layout="stacked")
    assert quant.is_quantized(loaded.params()["embed"]) and loaded.quantization == "int8"
    assert _same(loaded.params(), mj.load(path, dtype="float32", layout="stacked", quantize="int8").params())


def test_a_checkpoint_with_per_channel_attention_scales_is_one_clear_error(float_ckpt, hf_dir, tmp_path,
                                                                          monkeypatch):
    # int8 and int4 checkpoints converted before the attention projections' scales went to groups of 32.
    full = model_lib.quantized
    old = {("layers", "wq"): (-3,), ("layers", "wk"): (-3,), ("layers", "wv"): (-3,), ("layers", "wo"): (-3, -2)}
    monkeypatch.setattr(model_lib, "quantized", lambda mode: {
        k: model_lib.Quantized("int8", old[k]) if k in old else v for k, v in full(mode).items()})
    out = mj.convert_hf_checkpoint(hf_dir, tmp_path / "q", dtype="float32", quantize="int8")
    monkeypatch.undo()
    with pytest.raises(mj.CheckpointError, match=r"stores layers/wk's quantization scales as \(1, 1, 2, 16\), "
                                                 r"where this version of mixtral_jax stores \(1, 2, 2, 16\) .*; "
                                                 "convert the HF weights again with --quantize"):
        mj.load(out)


def test_bad_quantize_values_are_one_clear_error(float_ckpt, hf_dir, tmp_path):
    _, path = float_ckpt
    for call in (lambda: mj.load(path, quantize="int3"),
                 lambda: mj.convert_hf_checkpoint(hf_dir, tmp_path / "x", quantize="int3"),
                 lambda: mj.init_random(CFG, quantize="q4_0")):
        with pytest.raises(ValueError, match="unknown quantization .*; choose one of int8, int4, int8-experts, "
                                             "int4-experts"):
            call()
    with pytest.raises(ValueError, match="expert_dtype and quantize both set the experts' storage"):
        mj.load(path, quantize="int8", expert_dtype="bfloat16")


@pytest.mark.parametrize("experts,rows,inputs,outputs", [(2, 8, 1024, 1024), (3, 3, 96, 256), (2, 1, 2048, 384)])
@pytest.mark.parametrize("shared", [True, False])
def test_int4_tpu_kernel_equals_the_product_on_the_dequantized_weights(experts, rows, inputs, outputs, shared):
    """The TPU kernel, in Pallas's interpreter: x (shared by every expert, or one per expert) times int4
    experts equals the float32 product on quant.dequantize's weights, up to the order of the sums. Some
    scales are float16 subnormals (the kernel decodes float16 bits itself); 2048 inputs take 2 tiles."""
    from mixtral_jax import quant_tpu

    rs = np.random.RandomState(0)
    w = rs.randn(experts, inputs, outputs).astype(np.float32) * 0.02
    w[:, :32, :7] *= 1e-4
    w = jax.tree.map(jnp.asarray, quant.quantize(w, "int4"))
    assert np.sum(np.asarray(w["scale"]) < np.finfo(np.float16).tiny) > 0
    x = jnp.asarray(rs.randn(1 if shared else experts, rows, inputs), jnp.bfloat16)
    ref = jnp.einsum("XMD,EDF->EMF" if shared else "EMD,EDF->EMF", x.astype(jnp.float32),
                     quant.dequantize(w, jnp.bfloat16).astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    got = quant_tpu.matmul(x, w, jnp.float32, interpret=True)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    bf16 = quant_tpu.matmul(x, w, jnp.bfloat16, interpret=True)
    assert bf16.dtype == jnp.bfloat16 and np.max(np.abs(np.asarray(bf16, np.float32) - ref)) <= 2 ** -8 * np.max(np.abs(ref))


@pytest.mark.parametrize("rows,inputs,heads,head_dim", [(8, 1024, 4, 128), (3, 96, 2, 16), (130, 256, 8, 32)])
@pytest.mark.parametrize("layered", [True, False])
def test_int8_tpu_kernels_equal_the_products_on_the_dequantized_weights(rows, inputs, heads, head_dim, layered):
    """The TPU kernels for the attention projections' int8 in groups, in Pallas's interpreter: x times wq
    [D, N, Dh] and o times wo [H, Dh, D] (passed whole with a layer's index, or as one layer) equal the
    float32 products on quant.dequantize's weights, up to the order of the sums. 1024 inputs take 2 tiles,
    130 rows 2 blocks of rows (the last one partial); a head of 16 values keeps groups of 16."""
    from mixtral_jax import quant_tpu

    rs = np.random.RandomState(0)
    layers = 3
    wq = rs.randn(layers, inputs, heads, head_dim).astype(np.float32) * 0.02
    wo = rs.randn(layers, heads, head_dim, inputs).astype(np.float32) * 0.02
    wq = jax.tree.map(jnp.asarray, quant.quantize(wq, "int8", (-3,), quant.GROUP))
    wo = jax.tree.map(jnp.asarray, quant.quantize(wo, "int8", (-2,), quant.GROUP))
    pick = (lambda w: {**w, "layer": jnp.int32(1)}) if layered else (lambda w: jax.tree.map(lambda a: a[1], w))
    f32 = lambda w: quant.dequantize(pick(w), jnp.bfloat16).astype(jnp.float32)
    x = jnp.asarray(rs.randn(rows, inputs), jnp.bfloat16)
    o = jnp.asarray(rs.randn(rows, heads, head_dim), jnp.bfloat16)
    hi = jax.lax.Precision.HIGHEST
    for got, ref in ((quant_tpu.int8_to_heads(x, pick(wq), jnp.float32, interpret=True),
                      jnp.einsum("MD,DNH->MNH", x.astype(jnp.float32), f32(wq), precision=hi)),
                     (quant_tpu.int8_from_heads(o, pick(wo), jnp.float32, interpret=True),
                      jnp.einsum("MNH,NHD->MD", o.astype(jnp.float32), f32(wo), precision=hi))):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    with pytest.raises(ValueError, match="int8 product of x .* shapes disagree"):
        quant_tpu.int8_to_heads(x[:, :-32], pick(wq), jnp.float32, interpret=True)
