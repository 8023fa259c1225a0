"""Sharding on 8 virtual CPU devices (meshes also on abstract TPU slices): meshes, parameter and cache placement, the
expert-parallel MoE vs a loop reference (with and without drops), and sharded
logits and greedy tokens vs one device and vs transformers."""

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mixtral_jax as mj
from mixtral_jax import convert, expert_parallel, model as model_lib, moe, sharding, testing, topology
from mixtral_jax.config import from_hf_dict
from mixtral_jax.generate import init_cache
from mixtral_jax.model import Mixtral

MESHES = ["expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2", "expert=2,tensor=4"]
TINY = from_hf_dict(testing.TINY_HF)  # H 4, K 2, E 8, F 96, V 512


# ---------------------------------------------------------------- meshes


def test_make_mesh_axes_and_defaults():
    mesh = mj.make_mesh("data=2,expert=2,tensor=2")
    assert mesh.axis_names == ("data", "expert", "tensor") and dict(mesh.shape) == {"data": 2, "expert": 2,
                                                                                    "tensor": 2}
    assert dict(mj.make_mesh("expert=8").shape) == {"data": 1, "expert": 8, "tensor": 1}
    assert dict(mj.make_mesh(" tensor = 4 , expert=2").shape) == {"data": 1, "expert": 2, "tensor": 4}
    assert dict(mj.make_mesh("expert=1", jax.devices()[:1]).shape) == {"data": 1, "expert": 1, "tensor": 1}
    assert mesh.devices.size == 8 and len(set(mesh.devices.flat)) == 8


def _meshes_of(n):
    """Every (data, expert, tensor) spec whose sizes multiply to n."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return [f"data={d},expert={e},tensor={n // (d * e)}" for d in divisors for e in divisors if (n // d) % e == 0]


@pytest.mark.parametrize("name", ["v5p:4x4x4", "v4:2x2x1", "v5e:8x8", "v6e:2x4"])
def test_make_mesh_every_mesh_dividing_a_tpu_slice(name):
    # Abstract TPU devices from libtpu carry their torus coordinates; jax's mesh_utils maps mesh
    # axes onto physical axes and splits a physical axis where no whole set of them fits.
    devices = topology.tpu_devices(name)
    specs = _meshes_of(len(devices))
    assert len(specs) == {64: 28, 4: 6, 8: 10}[len(devices)]
    for spec in specs:
        mesh = mj.make_mesh(spec, devices)
        assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices), spec


def test_make_mesh_follows_the_torus():
    # tensor=4 on a 4x4x4 torus: each tensor group is one line of 4 chips along one physical axis.
    mesh = mj.make_mesh("data=4,expert=4,tensor=4", topology.tpu_devices("v5p:4x4x4"))
    for group in mesh.devices.reshape(-1, 4):
        coords = np.array([d.coords for d in group])
        assert (coords.max(axis=0) != coords.min(axis=0)).sum() == 1


def test_make_mesh_error_lists_the_sizes_that_divide():
    with pytest.raises(ValueError, match=r"has 8 devices but 64 are available; make the product of the axis sizes "
                                         r"equal 64, each from 1, 2, 4, 8, 16, 32 or 64\."):
        mj.make_mesh("expert=8", topology.tpu_devices("v5e:8x8"))


@pytest.mark.parametrize("spec,match", [
    ("expert=4", "has 4 devices but 8 are available"),
    ("expert=4,tensor=4", "has 16 devices but 8 are available"),
    ("experts=8", "bad mesh spec"),
    ("expert=8,expert=1", "each axis once"),
    ("expert:8", "bad mesh spec"),
    ("expert=0,tensor=8", "positive"),
])
def test_make_mesh_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        mj.make_mesh(spec)


# ---------------------------------------------------------------- placement

# Hand-written expected specs (mesh axes per dimension, before size-1 axes are dropped).
# TINY: H 4, K 2, E 8, F 96, V 512: K is replicated when tensor (4) does not divide it.
EXPECTED = {
    "embed": ("tensor", None),
    "final_norm": (None,),
    "lm_head": (None, "tensor"),
    "layers": {
        "attn_norm": (None, None), "mlp_norm": (None, None), "router": (None, None, None),
        "wq": (None, None, "tensor", None), "wk": (None, None, "kv", None), "wv": (None, None, "kv", None),
        "wo": (None, "tensor", None, None),
        "w1": (None, "expert", None, "tensor"), "w3": (None, "expert", None, "tensor"),
        "w2": (None, "expert", "tensor", None),
    },
}


def _expected_spec(axes, sizes, kv_heads):
    kv_axis = "tensor" if kv_heads % sizes["tensor"] == 0 else None
    out = []
    for a in axes:
        a = kv_axis if a == "kv" else a
        out.append(a if a is not None and sizes[a] > 1 else None)
    return jax.sharding.PartitionSpec(*out)


@pytest.mark.parametrize("spec", MESHES)
def test_init_random_sharded_params_and_cache(spec):
    cfg = TINY
    mesh = mj.make_mesh(spec)
    sizes = dict(mesh.shape)
    model = mj.init_random(cfg, seed=0, mesh=mesh)
    assert model.mesh is mesh
    params = model.params()
    abstract = model_lib.abstract_params(cfg, "float32", mesh)
    flat = jax.tree_util.tree_leaves_with_path(params)
    for path, arr in flat:
        axes = functools.reduce(lambda d, k: d[k.key], path, EXPECTED)
        want = _expected_spec(axes, sizes, cfg.num_key_value_heads)
        assert arr.sharding.spec == want, (path, arr.sharding.spec, want)
        # Each device holds only its shard: the global shape divided by the mesh axes it is split over.
        shard = tuple(n // (sizes[a] if a else 1) for n, a in zip(arr.shape, list(want) + [None] * arr.ndim))
        assert {s.data.shape for s in arr.addressable_shards} == {shard}, path
        assert len(arr.addressable_shards) == 8
        target = functools.reduce(lambda d, k: d[k.key], path, abstract)
        assert target.sharding == arr.sharding and target.shape == arr.shape, path
    # The expert weights are never whole on one device: split over expert × tensor.
    w1 = params["layers"]["w1"]
    assert w1.addressable_shards[0].data.size * sizes["expert"] * sizes["tensor"] == w1.size

    cache = init_cache(cfg, 4, 32, jnp.float32, mesh)
    kv_axis = "tensor" if cfg.num_key_value_heads % sizes["tensor"] == 0 and sizes["tensor"] > 1 else None
    # Batch 4 over data then expert: all 4 ways where data × expert is 4, over expert=4 alone, and not at
    # all over expert=8 (4 rows cannot split 8 ways).
    batch = {"expert=8": None, "expert=4,tensor=2": "expert", "data=2,expert=2,tensor=2": ("data", "expert"),
             "expert=2,tensor=4": "expert"}[spec]
    P = jax.sharding.PartitionSpec
    assert cache["k"].sharding.spec == cache["v"].sharding.spec == P(None, batch, kv_axis, None, None)
    assert cache["pos"].sharding.spec == P(batch, None)
    assert cache["k"].shape == (cfg.num_hidden_layers, 4, cfg.num_key_value_heads, 32, cfg.head_dim)
    assert (np.asarray(cache["pos"]) == -1).all()


def test_kv_heads_shard_when_tensor_divides_them():
    cfg = from_hf_dict({**testing.TINY_HF, "num_key_value_heads": 4})
    shardings = model_lib.param_shardings(cfg, mj.make_mesh("expert=2,tensor=4"))
    P = jax.sharding.PartitionSpec
    assert shardings["layers"]["wk"].spec == P(None, None, "tensor", None)
    assert sharding.cache_shardings(cfg, 2, 8, mj.make_mesh("expert=2,tensor=4"))["k"].spec == P(
        None, "expert", "tensor", None, None)


def test_batch_splits_over_data_then_expert_as_far_as_it_divides():
    mesh = mj.make_mesh("data=2,expert=4")
    P = jax.sharding.PartitionSpec
    pos = lambda b: sharding.cache_shardings(TINY, b, 8, mesh)["pos"].spec
    assert pos(8) == P(("data", "expert"), None)
    assert pos(2) == pos(6) == P("data", None)
    assert pos(1) == P(None, None)  # a decode batch of 1: replicated
    assert sharding.logical_to_spec(("vocab", "embed"), mj.make_mesh("tensor=8"), (32001, 64)) == P(None, None)


def test_rule_collision_is_an_error():
    with pytest.raises(ValueError, match="mesh axis 'tensor' used twice"):
        sharding.logical_to_spec(("heads", "ffn"))


@pytest.mark.parametrize("overrides,spec,match", [
    (dict(num_key_value_heads=1), "tensor=8", "tensor=8 does not divide num_attention_heads=4"),
    (dict(num_local_experts=6), "expert=4,tensor=2", "expert=4 does not divide num_local_experts=6"),
    (dict(num_attention_heads=8, intermediate_size=100), "tensor=8", "tensor=8 does not divide intermediate_size=100"),
])
def test_indivisible_mesh_is_a_clear_error(overrides, spec, match):
    cfg = from_hf_dict({**testing.TINY_HF, **overrides})
    mesh = mj.make_mesh(spec)
    with pytest.raises(ValueError, match=match):
        sharding.check_mesh(cfg, mesh)
    with pytest.raises(ValueError, match=match):
        model_lib.abstract_params(cfg, "bfloat16", mesh)
    with pytest.raises(ValueError, match=match):
        mj.init_random(cfg, mesh=mesh)


# ---------------------------------------------------------------- expert-parallel MoE


def _ep(x, p, k, mesh, capacity_factor=None):
    """moe_expert_parallel on weights placed per the rule table."""
    axes = {"router": ("embed", None), "w1": ("experts", "embed", "ffn"), "w3": ("experts", "embed", "ffn"),
            "w2": ("experts", "ffn", "embed")}
    p = {name: jax.device_put(v, sharding.named_sharding(mesh, axes[name], v.shape)) for name, v in p.items()}
    fn = jax.jit(functools.partial(expert_parallel.moe_expert_parallel, k=k, mesh=mesh, capacity_factor=capacity_factor))
    out, dropped = fn(x, p)
    return np.asarray(out), int(dropped)


def _capacity_reference(x, p, k, num_shards, capacity):
    """float64 loop reference of fixed-capacity dispatch: tokens split into `num_shards`
    contiguous groups; in each group the first `capacity` assignments (token order) to an
    expert are kept, later ones dropped. Returns (out [N, D], dropped count)."""
    x64 = np.asarray(x, np.float64)
    n = x.shape[0]
    per = -(-n // num_shards)
    out = np.zeros_like(x64)
    dropped = 0
    for g in range(num_shards):
        used = {}
        for i in range(g * per, min(n, (g + 1) * per)):
            logits = x64[i] @ p["router"]
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            chosen = np.argsort(-probs, kind="stable")[:k]
            for e, w in zip(chosen, probs[chosen] / probs[chosen].sum()):
                used[e] = used.get(e, 0) + 1
                if used[e] > capacity:
                    dropped += 1
                    continue
                a, b = x64[i] @ p["w1"][e], x64[i] @ p["w3"][e]
                out[i] += w * (((a / (1 + np.exp(-a))) * b) @ p["w2"][e])
    return out, dropped


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("n,k", [(1, 2), (13, 2), (64, 3)])
def test_expert_parallel_matches_loop_reference(spec, n, k):
    p = testing.moe_params(8, seed=n)
    x = np.random.RandomState(n).randn(n, 32).astype(np.float32)
    out, dropped = _ep(x, p, k, mj.make_mesh(spec))
    assert dropped == 0
    np.testing.assert_allclose(out, testing.moe_loop_reference(x, p, k), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", MESHES)
def test_expert_parallel_skewed_routing_and_empty_experts(spec):
    # Every token chooses expert 6 (one device receives every source's rows: the receive
    # buffer's worst case, dropless) and nobody chooses experts 0, 1 or 2 (empty shards).
    p = testing.moe_params(8, seed=3)
    x = np.random.RandomState(3).randn(48, 32).astype(np.float32)
    for e, sign in ((6, 12.0), (0, -12.0), (1, -12.0), (2, -12.0)):
        x += sign * p["router"][:, e] / np.linalg.norm(p["router"][:, e])
    counts = np.bincount(np.argsort(-(x @ p["router"]), axis=1)[:, :2].ravel(), minlength=8)
    assert counts[6] == 48 and counts[:3].sum() == 0, counts
    out, dropped = _ep(x, p, 2, mj.make_mesh(spec))
    assert dropped == 0
    np.testing.assert_allclose(out, testing.moe_loop_reference(x, p, 2), rtol=1e-4, atol=1e-5)


def test_exchange_plan_hand_arithmetic():
    # 8x7B on expert=8, batch 8 x 2048: 2048 tokens per device, 4096 assignments; balanced, each
    # expert gets 2048 x 2 / 8 = 512 rows from each of the 8 sources; the worst case is every
    # source's 2048 tokens choosing this device's one expert.
    plan = expert_parallel.exchange_plan(8 * 2048, 8, 2, expert=8)
    assert plan == {"tokens_per_device": 2048, "capacity": 2048, "rows_per_source": 2048, "buffer_rows": 8 * 2048,
                    "rows_balanced": 4096, "rows_sent_balanced": 7 * 512}
    # Capacity 1.25: ceil(1.25 x 512) = 640 rows per (source, expert), so 8 x 640 buffer rows.
    assert expert_parallel.exchange_plan(8 * 2048, 8, 2, expert=8, capacity_factor=1.25)["buffer_rows"] == 8 * 640
    # expert=4, tensor=2: tokens split over the 4 expert shards (16 each, shared by both tensor
    # peers); 2 experts per shard, so a source sends a shard at most 16 x 2 rows: 4 x 32 buffer rows.
    plan = expert_parallel.exchange_plan(64, 8, 2, expert=4)
    assert plan["tokens_per_device"] == 16 and plan["buffer_rows"] == 4 * 16 * 2
    assert plan["rows_balanced"] == 2 * 64 * 2 / 8  # E_loc x tokens x k / E
    assert plan["rows_sent_balanced"] == 6 * 16 * 2 / 8  # to the 6 experts of the other 3 shards, no tensor factor


def test_expert_parallel_exact_drops_constructed():
    # 8 devices × 4 tokens, top-1, capacity factor 1 → one slot per (device, expert).
    # Token i is steered to expert route[i]; device 0 sends 3 tokens to expert 0 (2 drop),
    # device 1 sends all 4 to expert 5 (3 drop), the others one token per expert (none drop).
    e, d = 8, 32
    p = testing.moe_params(e, d=d)
    p["router"] = np.eye(d, e, dtype=np.float32)
    route = [0, 0, 1, 0, 5, 5, 5, 5] + [0, 1, 2, 3] * 6
    x = np.random.RandomState(0).randn(32, d).astype(np.float32) * 0.1
    x[np.arange(32), route] += 5.0
    mesh = mj.make_mesh("expert=8")
    assert expert_parallel.expert_capacity(4, e, 1, 1.0) == 1
    out, dropped = _ep(x, p, 1, mesh, capacity_factor=1.0)
    assert dropped == 5
    ref, ref_dropped = _capacity_reference(x, p, 1, 8, capacity=1)
    assert ref_dropped == 5
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    dropped_rows = [1, 3, 5, 6, 7]
    assert np.all(out[dropped_rows] == 0) and np.all(np.abs(out[[0, 2, 4]]).max(axis=1) > 0)
    assert expert_parallel.count_dropped(np.array(route)[None, :, None], 8, e, 1.0).tolist() == [5]
    assert expert_parallel.count_dropped(np.array(route)[None, :, None], 8, e, None).tolist() == [0]


@pytest.mark.parametrize("spec,capacity_factor", [("expert=4,tensor=2", 1.0), ("data=2,expert=2,tensor=2", 0.5),
                                                  ("expert=8", 1.25)])
def test_expert_parallel_capacity_matches_reference(spec, capacity_factor):
    # Skewed routing so that some (device, expert) pairs overflow.
    p = testing.moe_params(8, seed=1)
    x = np.random.RandomState(2).randn(70, 32).astype(np.float32)
    x += 2 * p["router"][:, 3] / np.linalg.norm(p["router"][:, 3])
    mesh = mj.make_mesh(spec)
    out, dropped = _ep(x, p, 2, mesh, capacity_factor)
    shards = expert_parallel.token_shards(mesh)  # tokens split over data x expert, shared by tensor peers
    capacity = expert_parallel.expert_capacity(-(-70 // shards), 8, 2, capacity_factor)
    ref, ref_dropped = _capacity_reference(x, p, 2, shards, capacity)
    assert dropped == ref_dropped > 0
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    experts = np.asarray(moe.route(jnp.asarray(x), jnp.asarray(p["router"]), 2)[1])
    assert expert_parallel.count_dropped(experts[None], shards, 8, capacity_factor).tolist() == [dropped]


def test_capacity_factor_needs_a_mesh():
    with pytest.raises(ValueError, match="capacity_factor applies to expert-parallel"):
        moe.moe(jnp.zeros((2, 32)), testing.moe_params(8), 2, capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity_factor must be positive"):
        expert_parallel.expert_capacity(4, 8, 2, 0.0)


# ---------------------------------------------------------------- whole model on meshes


@functools.lru_cache(maxsize=None)
def _hf_and_params():
    hf = testing.hf_model(seed=1)
    cfg = testing.config_of(hf)
    return hf, cfg, convert.params_from_state_dict(testing.state_dict_numpy(hf), cfg)


def _on_mesh(spec):
    _, cfg, params = _hf_and_params()
    mesh = None if spec is None else mj.make_mesh(spec)
    if mesh is None:
        return Mixtral(cfg, jax.tree.map(jnp.asarray, params))
    return Mixtral(cfg, jax.device_put(params, model_lib.param_shardings(cfg, mesh)), mesh)


@functools.lru_cache(maxsize=None)
def _single_device_results():
    hf, cfg, _ = _hf_and_params()
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12))
    prompts = [list(map(int, r)) for r in np.random.RandomState(1).randint(3, cfg.vocab_size, (3, 7))]
    prompts[1] = prompts[1][:3]
    model = _on_mesh(None)
    greedy = mj.generate(model, prompts, max_new_tokens=6, stop_tokens=[])
    hf_greedy = []
    for prompt in prompts:
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          pad_token_id=0)
        hf_greedy.append(out[0, len(prompt):].tolist())
    return tokens, np.asarray(mj.forward(model, tokens)), testing.hf_logits(hf, tokens), prompts, greedy, hf_greedy


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_logits_and_greedy_equal_one_device_and_transformers(spec):
    tokens, single, hf_logits, prompts, greedy, hf_greedy = _single_device_results()
    model = _on_mesh(spec)
    logits = mj.forward(model, tokens)
    assert logits.dtype == jnp.float32
    assert testing.rel_err(logits, single) <= 1e-5
    assert testing.rel_err(logits, hf_logits) <= 1e-4
    assert greedy == hf_greedy
    assert mj.generate(model, prompts, max_new_tokens=6, stop_tokens=[]) == greedy
    # One prompt: the decode step has a single token for eight devices (padded dispatch).
    assert mj.generate(model, prompts[:1], max_new_tokens=3, stop_tokens=[]) == [greedy[0][:3]]


@pytest.mark.parametrize("spec", ["expert=2,tensor=4", "data=2,expert=2,tensor=2"])
def test_sharded_int8_logits_equal_one_device(spec):
    # int8 attention projections in groups of 32 inputs, sharded by heads like their float weights.
    single = mj.init_random(TINY, seed=3, dtype="float32", layout="stacked", quantize="int8")
    sharded = mj.init_random(TINY, seed=3, dtype="float32", mesh=mj.make_mesh(spec), quantize="int8")
    assert sharded.params()["layers"]["wq"]["scale"].shape[1] == TINY.hidden_size // 32
    tokens = np.random.RandomState(4).randint(0, TINY.vocab_size, (4, 9))
    assert testing.rel_err(mj.forward(sharded, tokens), mj.forward(single, tokens)) <= 1e-5


def test_load_with_mesh_restores_shards_and_runs_expert_parallel(tmp_path):
    model = mj.init_random(TINY, seed=2, dtype="float32")
    mj.save(model, tmp_path / "ckpt")
    mesh = mj.make_mesh("data=2,expert=2,tensor=2")
    loaded = mj.load(tmp_path / "ckpt", dtype="float32", mesh=mesh)
    assert loaded.mesh is mesh
    want = model_lib.param_shardings(TINY, mesh)
    assert jax.tree.all(jax.tree.map(lambda a, s: a.sharding == s, loaded.params(), want))
    tokens = np.arange(24).reshape(2, 12) % TINY.vocab_size
    assert testing.rel_err(mj.forward(loaded, tokens), mj.forward(model, tokens)) <= 1e-5


def _numpy_drops(experts, num_shards, capacity):
    """Independent count of the capacity rule on router choices [L, B, T, k]: per layer, tokens
    split into `num_shards` contiguous groups, the (capacity+1)-th and later assignments of a
    group to one expert dropped."""
    out = []
    for layer in experts.reshape(experts.shape[0], -1, experts.shape[-1]):
        per = -(-len(layer) // num_shards)
        out.append(sum(max(0, np.sum(layer[g * per:(g + 1) * per] == e) - capacity)
                       for g in range(num_shards) for e in range(8)))
    return out


def test_model_capacity_factor_drops_are_counted_and_change_the_output():
    model = _on_mesh("expert=4,tensor=2")
    tokens = np.random.RandomState(5).randint(0, model.cfg.vocab_size, (2, 12))
    dropless = np.asarray(mj.forward(model, tokens))
    routing = mj.expert_routing(model, tokens, capacity_factor=0.5)
    drops = expert_parallel.count_dropped(routing.experts, 4, 8, 0.5)  # 24 tokens over the 4 expert shards
    assert drops.tolist() == _numpy_drops(routing.experts, 4, expert_parallel.expert_capacity(6, 8, 2, 0.5)) and drops.sum() > 0
    assert testing.rel_err(mj.forward(model, tokens, capacity_factor=0.5), dropless) > 1e-3
    # Capacity factor E / k gives every expert the whole device: nothing drops, output as dropless.
    assert expert_parallel.count_dropped(mj.expert_routing(model, tokens, 4.0).experts, 4, 8, 4.0).tolist() == [0, 0]
    assert testing.rel_err(mj.forward(model, tokens, capacity_factor=4.0), dropless) <= 1e-6


# ---------------------------------------------------------------- the MoE compiled for TPU (libtpu, no TPU needed)

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _tpu_mesh(topology, spec, bounds):
    pytest.importorskip("libtpu", reason="needs the tpu extra (pip install -e '.[tpu]')")
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                           chips_per_host_bounds=bounds, num_slices=1,
                                           wrap=(False, False, False)).devices
    return mj.make_mesh(spec, list(devices))


def _tpu_moe(mesh, tokens, capacity_factor=None, d=256, f=512, e=8, k=2):
    """The MoE block compiled for `mesh`'s TPU devices, bf16: (cost analysis, optimized HLO)."""
    def spec(shape, axes):
        return jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding.named_sharding(mesh, axes, shape))
    p = {"router": spec((d, e), ("embed", None)), "w1": spec((e, d, f), ("experts", "embed", "ffn")),
         "w3": spec((e, d, f), ("experts", "embed", "ffn")), "w2": spec((e, f, d), ("experts", "ffn", "embed"))}
    x = spec((tokens, d), ("batch", "embed"))  # as activations arrive: split over data, expert
    compiled = jax.jit(lambda x, p: moe.moe(x, p, k, mesh=mesh, capacity_factor=capacity_factor)).lower(x, p).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost), compiled.as_text()


def test_tpu_single_device_moe_flops_are_the_ideal():
    # One chip: the grouped matmul runs over exactly tokens x k rows (no capacity padding), so
    # the compiler's FLOPs are 2 x tokens x k x 3 x D x F plus the router and small change.
    mesh = _tpu_mesh("v5e:1x1", "", (1, 1, 1))
    cost, hlo = _tpu_moe(mesh, 1024)
    ideal = 2 * 1024 * 2 * 3 * 256 * 512
    assert ideal <= cost["flops"] <= 1.05 * ideal, cost["flops"] / ideal


def test_tpu_single_device_decode_runs_each_expert_once_per_token():
    # Few tokens: every expert once on each token (one batched product, weights read once), not on
    # each of its k sorted copies (2x the FLOPs) nor on every sorted row of every token (8x, dense).
    mesh = _tpu_mesh("v5e:1x1", "", (1, 1, 1))
    every_expert = 2 * 8 * 8 * 3 * 256 * 512  # tokens x E x 3 matmuls of D x F
    cost, hlo = _tpu_moe(mesh, 8)
    assert every_expert <= cost["flops"] <= 1.05 * every_expert, cost["flops"] / every_expert
    assert not re.search(r'op_name="[^"]*/sort/', hlo)  # no by-expert sort (top_k's own sort is in route/)


@pytest.mark.parametrize("spec,capacity_factor", [("expert=8", None), ("expert=4,tensor=2", None),
                                                  ("expert=8", 1.0)])
def test_tpu_expert_parallel_compiles_with_ragged_all_to_all(spec, capacity_factor):
    # The exchange is the real ragged-all-to-all (no dense all-to-all, no all-gather of tokens),
    # and the grouped matmul runs over the receive buffer that exchange_plan sizes: dropless,
    # the worst case; at capacity 1.0, within 1.1x of the ideal FLOPs.
    mesh = _tpu_mesh("v5e:2x4", spec, (2, 2, 1))
    tokens, d, f = 2048, 256, 512
    cost, hlo = _tpu_moe(mesh, tokens, capacity_factor)
    assert "ragged-all-to-all" in hlo and not re.search(r"(?<!ragged-)all-to-all\(", hlo)
    # Rows travel in the activation dtype both ways, F-partials (tensor > 1) included.
    assert set(re.findall(r"= (\w+)\[[\d,]*\]\S* ragged-all-to-all\(", hlo)) == {"bf16"}, hlo
    # Any other collective carries the per-expert row counts (int32 [devices, E]) and the drop
    # count, never token rows; with tensor > 1, but for the float32 sum of the output over tensor
    # (the TPU compiler fuses the cast into it: a float32 operand and reduction, a bfloat16 result).
    sizes = dict(mesh.shape)
    other = re.findall(r"= (\w+)\[([\d,]*)\]\S* (?:all-gather|all-reduce|reduce-scatter|collective-permute)", hlo)
    out_sum = [(t, dims) for t, dims in other if dims == f"{tokens // expert_parallel.token_shards(mesh)},{d}"]
    assert len(out_sum) == (sizes["tensor"] > 1), other
    assert other and all(t == "s32" and np.prod([int(n) for n in dims.split(",")]) <= 8 * 8 + 1
                         for t, dims in other if (t, dims) not in out_sum), other
    plan = expert_parallel.exchange_plan(tokens, 8, 2, sizes["expert"], sizes["data"], capacity_factor)
    grouped = 2 * plan["buffer_rows"] * 3 * d * (f // sizes["tensor"])
    assert grouped <= cost["flops"] <= 1.1 * grouped, cost["flops"] / grouped
    ideal = 2 * tokens * 2 * 3 * d * f / mesh.size
    if capacity_factor == 1.0:
        assert cost["flops"] <= 1.1 * ideal


def test_tpu_v5e_over_16_chips_refuses_ragged_all_to_all_even_over_8_devices(monkeypatch):
    # has_ragged_all_to_all judges the slice, not the exchange group: the group is `expert` only,
    # yet libtpu refuses it on v5e:8x8. If this starts compiling, narrow has_ragged_all_to_all.
    mesh = _tpu_mesh("v5e:8x8", "expert=8,tensor=8", (2, 2, 1))
    assert not expert_parallel.has_ragged_all_to_all(mesh.devices)
    monkeypatch.setattr(expert_parallel, "has_ragged_all_to_all", lambda devices: True)
    with pytest.raises(Exception, match="not supported in limited ICI routing settings"):
        _tpu_moe(mesh, 64)
