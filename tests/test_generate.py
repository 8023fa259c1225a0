"""Inference engine: greedy == transformers, cache == no cache, buckets, sampling, stops, errors."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mixtral_jax as mj
from mixtral_jax import convert, testing
from mixtral_jax.model import Mixtral

gen = importlib.import_module("mixtral_jax.generate")  # the module; mj.generate is the function


@functools.lru_cache(maxsize=None)
def _pair(**overrides):
    """(transformers model, our model with the same weights)."""
    hf = testing.hf_model(seed=3, **overrides)
    cfg = testing.config_of(hf)
    params = convert.params_from_state_dict(testing.state_dict_numpy(hf), cfg)
    return hf, Mixtral(cfg, jax.tree.map(jnp.asarray, params))


def _prompts(lengths, vocab, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, vocab, n).tolist() for n in lengths]


def _hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


GREEDY_CASES = {
    "gqa": {},
    "mqa_4experts_top1": dict(num_local_experts=4, num_experts_per_tok=1, num_key_value_heads=1),
    "window4": dict(sliding_window=4, rope_theta=1e4),
}


@pytest.mark.parametrize("case", GREEDY_CASES)
def test_greedy_matches_transformers_batched(case):
    hf, model = _pair(**GREEDY_CASES[case])
    prompts = _prompts([3, 11, 6], model.cfg.vocab_size)
    n = 10  # with window 4, prompt + generation is far past the window
    ours = mj.generate(model, prompts, max_new_tokens=n, stop_tokens=[])
    assert ours == [_hf_greedy(hf, p, n) for p in prompts]


def test_padding_invisible_each_row_equals_alone():
    _, model = _pair()
    prompts = _prompts([2, 17, 5, 9, 1], model.cfg.vocab_size, seed=1)
    batched = mj.generate(model, prompts, max_new_tokens=6, stop_tokens=[])
    alone = [mj.generate(model, [p], max_new_tokens=6, stop_tokens=[])[0] for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("window", [None, 5])
def test_decode_logits_equal_full_forward(window):
    _, model = _pair(sliding_window=window)
    prompts = _prompts([4, 9], model.cfg.vocab_size, seed=2)
    steps = list(gen.decode_loop(model, prompts, 8, gen.SamplingParams()))
    new = np.stack([np.asarray(t)[:2] for t, _ in steps], axis=1)  # [2, 8]
    for row, p in enumerate(prompts):
        full = mj.forward(model, np.array([p + new[row].tolist()]))[0]  # [T, V]
        for i, (_, logits) in enumerate(steps):
            # The logits that produced new token i come from position len(p) - 1 + i.
            np.testing.assert_allclose(np.asarray(logits)[row], full[len(p) - 1 + i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window", [None, 4])
def test_prefill_last_layer_last_position_only_matches_transformers(window):
    # per_expert prefill runs the last layer's attention output and MoE for the last position
    # only: its logits must still equal transformers' at each row's last token (left-padded
    # rows of different lengths), and its cache must carry greedy decoding on the same way.
    hf = testing.hf_model(seed=4, num_hidden_layers=2, sliding_window=window, rope_theta=1e4)
    model = testing.our_model(hf, "per_expert")
    prompts = _prompts([5, 12, 1], model.cfg.vocab_size, seed=5)
    _, first_logits = next(iter(gen.decode_loop(model, prompts, 1, gen.SamplingParams())))
    with torch.no_grad():
        for row, p in enumerate(prompts):
            ref = hf(torch.tensor([p])).logits[0, -1].numpy()
            np.testing.assert_allclose(np.asarray(first_logits)[row], ref, rtol=1e-4, atol=1e-4)
    ours = mj.generate(model, prompts, max_new_tokens=6, stop_tokens=[])
    assert ours == [_hf_greedy(hf, p, 6) for p in prompts]


def test_long_prompt_greedy_matches_transformers():
    # The prefill's causal query chunks, then decode past them (per_expert layout, the CPU default).
    hf = testing.hf_model(seed=6, max_position_embeddings=512, num_hidden_layers=1)
    model = testing.our_model(hf, "per_expert")
    prompts = _prompts([290, 140], model.cfg.vocab_size, seed=9)
    assert mj.generate(model, prompts, max_new_tokens=5, stop_tokens=[]) == [_hf_greedy(hf, p, 5) for p in prompts]


@pytest.mark.parametrize("layout,window", [("per_expert", 4)])
def test_chunked_prefill_matches_transformers(layout, window):
    # Prompts of 37 and 5 tokens prefilled in chunks of 16 (bucket 48: three chunks, the short
    # prompt's tokens all in the last): each row's first logits and greedy tokens equal
    # transformers' on the prompt alone, and every chunk runs the same compile.
    hf = testing.hf_model(seed=7, num_hidden_layers=1, sliding_window=window, rope_theta=1e4)
    model = testing.our_model(hf, layout)
    prompts = _prompts([37, 5], model.cfg.vocab_size, seed=8)
    before = gen.prefill._cache_size()
    _, first_logits = next(iter(gen.decode_loop(model, prompts, 1, gen.SamplingParams(), prefill_chunk=16)))
    assert gen.prefill._cache_size() <= before + 1
    with torch.no_grad():
        for row, p in enumerate(prompts):
            ref = hf(torch.tensor([p])).logits[0, -1].numpy()
            np.testing.assert_allclose(np.asarray(first_logits)[row], ref, rtol=1e-4, atol=1e-4)
    ours = mj.generate(model, prompts, max_new_tokens=6, stop_tokens=[], prefill_chunk=16)
    assert ours == [_hf_greedy(hf, p, 6) for p in prompts]
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        mj.generate(model, prompts, max_new_tokens=2, prefill_chunk=0)


def test_no_recompile_inside_bucket():
    _, model = _pair()
    v = model.cfg.vocab_size
    mj.generate(model, _prompts([3, 4, 5], v), max_new_tokens=4)  # bucket: batch 4, prompt 16, cache 32
    prefills, decodes = gen.prefill._cache_size(), gen.decode_step._cache_size()
    mj.generate(model, _prompts([7, 12], v, seed=5)[:2] + _prompts([1], v), max_new_tokens=3)
    mj.generate(model, _prompts([16, 2, 9, 10], v, seed=6), max_new_tokens=5)
    assert (gen.prefill._cache_size(), gen.decode_step._cache_size()) == (prefills, decodes)
    mj.generate(model, _prompts([40, 33], v), max_new_tokens=4)  # a new prompt bucket (64): one more prefill
    assert gen.prefill._cache_size() == prefills + 1


def test_sampling_seeded_and_top_k1_is_greedy():
    _, model = _pair()
    prompts = _prompts([5, 8], model.cfg.vocab_size)
    greedy = mj.generate(model, prompts, max_new_tokens=8, stop_tokens=[])
    kw = dict(max_new_tokens=8, temperature=1.0, stop_tokens=[])
    assert mj.generate(model, prompts, top_k=1, **kw) == greedy
    assert mj.generate(model, prompts, top_p=1e-6, **kw) == greedy
    a = mj.generate(model, prompts, seed=7, **kw)
    assert a == mj.generate(model, prompts, seed=7, **kw)
    assert a != mj.generate(model, prompts, seed=8, **kw)
    assert a != greedy


def test_greedy_tokens_equal_numpy_argmax_with_ties_infinities_and_nans():
    rs = np.random.RandomState(0)
    x = rs.randint(-3, 4, (9, 700)).astype(np.float32)  # many ties for the largest value
    x[1, :] = -np.inf
    x[2, 5] = np.inf
    x[3, [10, 400]] = np.nan  # numpy's argmax: the first NaN, as jnp.argmax
    x[4, :] = np.nan
    x[5, 699] = 100.0
    got = np.asarray(gen.greedy_tokens(jnp.asarray(x)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))
    np.testing.assert_array_equal(np.asarray(gen.greedy_tokens(jnp.asarray(x[:2].reshape(2, 1, 700)))),
                                  np.argmax(x[:2], axis=-1)[:, None])


def test_sample_logits_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = lambda **kw: np.asarray(gen.sample_logits(logits, keys, temperature=1.0, **kw))
    assert set(draw(top_k=2)) == {0, 1}
    assert set(draw(top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draw(top_p=0.85)) == {0, 1, 2}
    freq = np.bincount(draw(), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_sample_logits_per_row_settings_equal_each_setting_alone():
    """The serving engine's per-row settings ([B] arrays) draw what one setting for all rows draws."""
    logits = jax.random.normal(jax.random.key(1), (6, 500)) * 3
    keys = jax.random.split(jax.random.key(2), 6)
    settings = [(0.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.6), (0.9, 40, 0.8), (0.0, 3, 0.5)]
    t, k, p = (np.array(column) for column in zip(*settings))
    per_row = np.asarray(gen.sample_logits(logits, keys, t.astype(np.float32), k.astype(np.int32),
                                           p.astype(np.float32)))
    alone = [int(gen.sample_logits(logits, keys, *setting)[r]) for r, setting in enumerate(settings)]
    assert per_row.tolist() == alone
    assert alone[0] == int(jnp.argmax(logits[0])) and alone[5] == int(jnp.argmax(logits[5]))  # temperature 0


def test_per_row_stop_tokens():
    _, model = _pair()
    prompts = _prompts([5, 8, 3], model.cfg.vocab_size, seed=4)
    free = mj.generate(model, prompts, max_new_tokens=10, stop_tokens=[])
    stop = free[0][3]
    outs = mj.generate(model, prompts, max_new_tokens=10, stop_tokens=[stop])
    for row, out in enumerate(outs):
        cut = free[row].index(stop) + 1 if stop in free[row] else 10
        assert out == free[row][:cut]
    assert len(outs[0]) == free[0].index(stop) + 1 <= 4


def test_all_rows_stopped_ends_loop():
    _, model = _pair()
    prompts = _prompts([4], model.cfg.vocab_size)
    first = mj.generate(model, prompts, max_new_tokens=1, stop_tokens=[])[0][0]
    steps = list(gen.generate_stream(model, prompts, max_new_tokens=50, stop_tokens=[first]))
    assert len(steps) == 1


@pytest.mark.parametrize("prompts,kwargs,match", [
    ([[1, 2]], dict(max_new_tokens=300), "exceeds the model's 256 positions"),
    ([[]], dict(), "prompt 0 is empty"),
    ([[1, 2]], dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    ([[1, 99999]], dict(), "outside the vocabulary"),
    ([[1, 2]], dict(temperature=-1.0), "temperature must be >= 0"),
    ([[1, 2]], dict(top_p=0.0), "top_p must be in"),
])
def test_bad_generate_inputs(prompts, kwargs, match):
    _, model = _pair()
    with pytest.raises(ValueError, match=match):
        mj.generate(model, prompts, **kwargs)


@pytest.mark.parametrize("layer", [None, 1])
def test_cpu_cache_write_equals_numpy_with_per_row_slots_and_dynamic_update_slice_clamping(layer):
    # With `layer`, the cache holds every layer's [L, B, K, S, Dh] (the per_expert layout's): layer 1 is
    # written where it lies and layers 0 and 2 stay as they were.
    from mixtral_jax import cpu_kernel
    rs = np.random.RandomState(0)
    cache = rs.randn(*(() if layer is None else (3,)), 3, 2, 16, 8).astype(np.float32)
    for t, index in ((1, [0, 7, 15]), (4, [2, 14, -3])):  # 14 + 4 > 16 and -3 clamp, as dynamic_update_slice
        new = rs.randn(3, 2, t, 8).astype(np.float32)
        want = cache.copy()
        for r, i in enumerate(index):
            at = min(max(i, 0), 16 - t)
            (want if layer is None else want[layer])[r, :, at:at + t] = new[r]
        write = jax.jit(lambda c, n, i: cpu_kernel.write_cache_cpu(c, n, i, layer=layer))
        got = write(jnp.asarray(cache), jnp.asarray(new), jnp.asarray(index, jnp.int32))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("window,layer", [(None, None), (5, None), (5, 2)])
def test_cpu_decode_attention_equals_float64_over_the_admitted_slots(window, layer):
    """cpu_kernel.attend_cpu (a decode step's attention on the CPU, reading only the slots the mask admits, in
    the cache rows it is given) against a float64 softmax over attention.attention_mask's slots; with `layer`,
    over layer 2 of caches holding 3 layers (the others different random values)."""
    from mixtral_jax import attention, cpu_kernel
    rs = np.random.RandomState(2)
    b, kv, s, h = 5, 2, 40, 6
    for dh in (64, 8):  # whole vectors of 16, and the scalar tail alone
        k, v = (rs.randn(b, kv, s, dh).astype(np.float32) for _ in range(2))
        stacks = [rs.randn(3, b, kv, s, dh).astype(np.float32) for _ in range(2)]
        if layer is not None:
            stacks[0][layer], stacks[1][layer] = k, v
        rows = np.array([3, 0, 3, 4], np.int32)  # a repeated row; cache rows 1 and 2 unused
        q = (rs.randn(4, h, dh) * 3).astype(np.float32)
        q_pos = np.array([17, 39, 4, 0], np.int32)
        k_pos = np.tile(np.arange(s, dtype=np.int32), (4, 1))
        k_pos[0, 10:20] = -1  # empty slots inside the context
        k_pos[2] = np.arange(s) - 30  # a slot holds position p at index p + 30 (the engine's offsets)
        k_pos[3] = -1  # no admitted slot: an idle serving row, zeros
        attend = jax.jit(lambda *a: cpu_kernel.attend_cpu(*a, window=window, layer=layer))
        got = np.asarray(attend(q, *((k, v) if layer is None else stacks), rows, q_pos, k_pos))
        mask = np.asarray(attention.attention_mask(jnp.asarray(q_pos[:, None]), jnp.asarray(k_pos), window))[:, 0]
        for r in range(4):
            kr, vr = k[rows[r]].astype(np.float64), v[rows[r]].astype(np.float64)  # [K, S, Dh]
            for head in range(h):
                g = head // (h // kv)
                if not mask[r].any():
                    np.testing.assert_array_equal(got[r, head], 0)
                    continue
                scores = kr[g] @ q[r, head].astype(np.float64) / np.sqrt(dh)
                scores = np.where(mask[r], scores, -np.inf)
                p = np.exp(scores - scores.max())
                want = (p / p.sum()) @ vr[g]
                np.testing.assert_allclose(got[r, head], want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("path", ["kernel", "stacked"])
def test_cache_write_into_chosen_rows_equals_numpy(path):
    """The serving engine's decoding slots write straight into the whole cache: update row r goes to cache row
    rows[r] (both the CPU kernel and the slice updates of a stacked [L, B, K, S, Dh] cache, as on TPU/GPU)."""
    from mixtral_jax import attention
    rs = np.random.RandomState(1)
    cache = rs.randn(2, 4, 2, 16, 8).astype(np.float32)  # [L, B, K, S, Dh]
    for t, rows, index in ((1, [2, 0], [5, 15]), (3, [3, 3, 1], [14, 14, 0])):  # a repeated row, a clamped start
        new = rs.randn(len(rows), 2, t, 8).astype(np.float32)
        want = cache.copy()
        for r, (row, i) in enumerate(zip(rows, index)):
            at = min(max(i, 0), 16 - t)
            want[1, row, :, at:at + t] = new[r]
        args = jnp.asarray(new), jnp.asarray(index, jnp.int32)
        if path == "kernel":
            got = jax.jit(attention.write_cache)(jnp.asarray(cache[1]), *args, rows=jnp.asarray(rows, jnp.int32))
            np.testing.assert_array_equal(got, want[1])
        else:
            got = jax.jit(attention.write_cache)(jnp.asarray(cache), *args, 1, jnp.asarray(rows, jnp.int32))
            np.testing.assert_array_equal(got, want)


def test_cpu_decode_step_writes_the_kv_cache_in_place():
    """XLA fused the cache's dynamic_update_slice into both of its users (the output and the attention's
    read), and then copied every layer's k and v cache 4 times per decode step: 64 MB a token at a
    4096-slot cache of the bench model. The write is now one in-place kernel call; the compiled step
    must hold no copy of a cache-shaped array."""
    # The bench model's attention (D 1024, 16 heads, 4 kv heads: XLA's fusions depend on the shapes), small
    # elsewhere; one CPU device: the per_expert layout, every layer's cache in one k and one v array.
    cfg = mj.config.from_hf_dict(dict(vocab_size=512, hidden_size=1024, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                                      num_experts_per_tok=2, max_position_embeddings=1024, rope_theta=1e6))
    model, b, slots = mj.init_random(cfg), 1, 256
    cache = gen.init_cache(cfg, b, slots, model.dtype)
    run = dict(cfg=cfg, strategy="sparse", sampling=gen.SamplingParams(), mesh=None, capacity_factor=None)
    hlo = gen.decode_step.lower(model.params(), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32),
                                jnp.int32(0), cache, jax.random.key(0), 1, **run).compile().as_text()
    layer = "%d,%d,%d,%d]" % (b, cfg.num_key_value_heads, slots, cfg.head_dim)
    shapes = ("f32[" + layer, "f32[%d,%s" % (cfg.num_hidden_layers, layer))  # one layer's, every layer's
    copies = [line for line in hlo.splitlines()
              if " copy(" in line and line.split("=")[1].strip().startswith(shapes)]
    assert "write_cache_cpu" in hlo and not copies, copies[:3]


@pytest.mark.parametrize("quantize,b", [(None, 1), (None, 4), ("int4", 1)])
def test_cpu_decode_step_reads_each_layers_weights_in_place(quantize, b):
    """The per_expert layout keeps one buffer per weight for all the layers (a decode step's dispatch costs
    per array); the kernels read layer l where it lies. No operation of the compiled step may yield one
    layer's slice of a weight matrix or of the cache (XLA:CPU copies a slice: each weight read twice more)."""
    cfg = mj.load_config("tiny")
    model = mj.init_random(cfg, quantize=quantize)
    params, slots = model.params(), 64
    cache = gen.init_cache(cfg, b, slots, model.dtype)
    run = dict(cfg=cfg, strategy="sparse", sampling=gen.SamplingParams(), mesh=None, capacity_factor=None)
    hlo = gen.decode_step.lower(params, jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32),
                                jnp.int32(0), cache, jax.random.key(0), 1, **run).compile().as_text()
    dtypes = {"float32": "f32", "int8": "s8", "uint8": "u8", "float16": "f16"}
    matrices = {n: params["layers"][n] for n in ("wqkv", "wo")} | params["layers"]["experts"]
    # (An int8 weight's scales [out, 1] are left out: one layer's would be the shape of an activation column.)
    sliced = {"%s[%s]" % (dtypes[a.dtype.name], ",".join(map(str, a.shape[1:])))
              for a in jax.tree.leaves(matrices) + [cache["k"]] if a.shape[-1] > 1}
    made = [line.split("=", 1)[1].split("{")[0].strip() for line in hlo.splitlines()
            if "=" in line and "parameter(" not in line]
    # Beside them only embed, final_norm, lm_head (quantized: embed's and lm_head's scales too), the norms, router.
    assert len(jax.tree.leaves(params)) == (6 if quantize is None else 8) + len(jax.tree.leaves(matrices))
    assert not sliced & set(made), sliced & set(made)
