"""The Mixtral decoder: parameter table, NNX module, and the forward pass.

Parameters are described abstractly first (`param_specs`: shape + logical
axes), then initialised or restored. This is the stacked layout (TPU/GPU,
any mesh; the Orbax checkpoint has exactly this tree); one CPU device runs
the same weights in the per_expert layout (layout.py, the one seam that
knows the difference):

    embed       [V, D]
    layers/
      attn_norm [L, D]
      wq        [L, D, H, Dh]    wk, wv [L, D, K, Dh]    wo [L, H, Dh, D]
      mlp_norm  [L, D]
      router    [L, D, E]
      w1, w3    [L, E, D, F]     w2 [L, E, F, D]
    final_norm  [D]
    lm_head     [D, V]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixtral_jax import attention, cpu_kernel, layers, layout as layout_lib, moe, quant, sharding
from mixtral_jax.config import MixtralConfig

Params = dict[str, Any]
EXPERT_PARAMS = layout_lib.EXPERT_PARAMS
ACT_BTD = ("batch", "seq", "embed")  # logical axes of the residual stream [B, T, D]
ACT_BTV = ("batch", "seq", "vocab")  # logits [B, T, V], split over vocab like the lm_head


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # "normal" (std 0.02, as HF's initializer_range) or "ones"


class Quantized(NamedTuple):
    """How one weight is quantized (quant.py): width, input axes (negative) and, for int8, None (a scale per
    output channel) or a group size along its one input axis."""

    width: str
    in_axes: tuple[int, ...]
    group: int | None = None


def quantized(mode: str | None) -> dict[tuple[str, ...], Quantized]:
    """The weights a quantization mode (quant.MODES) stores quantized, by their paths in the stacked tree: the
    experts at the mode's width; the attention projections at int8 in groups of quant.GROUP along the input
    (wo's: along each head's Dh), as llama.cpp's q8_0 blocks (per output channel, they doubled the random
    bench model's KLD: docs/benchmarks.md#int8-attention-in-groups-of-32); the lm_head at int8 per output
    channel (groups would add 4 MB a token to the bench model for a KLD of 1e-5); the embedding at int8 in
    groups of quant.GROUP along each token's row (a lookup dequantizes only its rows; one scale per row
    cost measurably more accuracy: docs/benchmarks.md#quantized-weights)."""
    if not mode:
        return {}
    out = {("layers", n): Quantized(quant.width(mode), (-2,)) for n in EXPERT_PARAMS}
    if quant.dense(mode):
        g = quant.GROUP
        out |= {("layers", "wq"): Quantized("int8", (-3,), g), ("layers", "wk"): Quantized("int8", (-3,), g),
                ("layers", "wv"): Quantized("int8", (-3,), g), ("layers", "wo"): Quantized("int8", (-2,), g),
                ("lm_head",): Quantized("int8", (-2,)), ("embed",): Quantized("int8", (-1,), g)}
    return out


def _replace(tree: dict, path: tuple[str, ...], fn) -> None:
    """tree[path] = fn(tree[path]), in place."""
    node = tree
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = fn(node[path[-1]])


def param_specs(cfg: MixtralConfig, quantize: str | None = None) -> Params:
    """Shapes and logical axes of every parameter, as a tree like the params.

    With `quantize` (quant.MODES) each weight it quantizes (`quantized`) is {"qvalue", "scale"} (quant.py).
    """
    v, d, f = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    l, h, kv, dh, e = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                       cfg.head_dim, cfg.num_local_experts)
    specs = {
        "embed": ParamSpec((v, d), ("vocab", "embed")),
        "layers": {
            "attn_norm": ParamSpec((l, d), ("layers", "embed"), "ones"),
            "wq": ParamSpec((l, d, h, dh), ("layers", "embed", "heads", "head_dim")),
            "wk": ParamSpec((l, d, kv, dh), ("layers", "embed", "kv_heads", "head_dim")),
            "wv": ParamSpec((l, d, kv, dh), ("layers", "embed", "kv_heads", "head_dim")),
            "wo": ParamSpec((l, h, dh, d), ("layers", "heads", "head_dim", "embed")),
            "mlp_norm": ParamSpec((l, d), ("layers", "embed"), "ones"),
            "router": ParamSpec((l, d, e), ("layers", "embed", None)),
            "w1": ParamSpec((l, e, d, f), ("layers", "experts", "embed", "ffn")),
            "w3": ParamSpec((l, e, d, f), ("layers", "experts", "embed", "ffn")),
            "w2": ParamSpec((l, e, f, d), ("layers", "experts", "ffn", "embed")),
        },
        "final_norm": ParamSpec((d,), ("embed",), "ones"),
        "lm_head": ParamSpec((d, v), ("embed", "vocab")),
    }
    for path, q in quantized(quant.check_mode(quantize)).items():
        _replace(specs, path, lambda spec: {
            k: ParamSpec(shape, quant.axes(spec.axes, *q)[k], "quantized")
            for k, (shape, _) in quant.shapes(spec.shape, *q).items()})
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_shardings(cfg: MixtralConfig, mesh, quantize: str | None = None) -> Params:
    """NamedSharding for every parameter on `mesh`, from the logical-axis rules (scales with their weights)."""
    quant.check_split(cfg.intermediate_size, quantize, dict(mesh.shape).get("tensor", 1))
    return jax.tree.map(lambda s: sharding.named_sharding(mesh, s.axes, s.shape), param_specs(cfg, quantize),
                        is_leaf=_is_spec)


def param_dtypes(cfg: MixtralConfig, dtype, expert_dtype=None) -> Params:
    """The dtype of every parameter, as a tree like the stacked params: `dtype`,
    except the experts' w1, w3, w2 in `expert_dtype` when it is given.

    The model computes in `dtype` (its activations, cache and logits); expert
    weights stored in another dtype are converted as they are used. On the CPU,
    bfloat16 experts with float32 compute halve the bytes a decode step
    streams and the host memory, and equal float32 compute on a bfloat16
    checkpoint (Mixtral is published in bfloat16) exactly.
    """
    dtype = jnp.dtype(dtype)
    expert = dtype if expert_dtype is None else jnp.dtype(expert_dtype)
    for name, dt in (("dtype", dtype), ("expert_dtype", expert)):
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"{name} must be a floating-point dtype such as float32 or bfloat16, got {dt}.")
    out = jax.tree.map(lambda s: dtype, param_specs(cfg), is_leaf=_is_spec)
    for name in EXPERT_PARAMS:
        out["layers"][name] = expert
    return out


def init_params(cfg: MixtralConfig, key: jax.Array, dtype, expert_dtype=None) -> Params:
    """Random parameters (normal std 0.02, norms at one), like HF's initialisation."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    dtypes = jax.tree.leaves(param_dtypes(cfg, dtype, expert_dtype))
    keys = jax.random.split(key, len(leaves))
    out = [jnp.ones(s.shape, dt) if s.init == "ones"
           else (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(dt)
           for s, dt, k in zip(leaves, dtypes, keys)]
    return jax.tree.unflatten(treedef, out)


def abstract_params(cfg: MixtralConfig, dtype="bfloat16", mesh=None, expert_dtype=None,
                    quantize: str | None = None) -> Params:
    """jax.ShapeDtypeStruct for every parameter (with shardings if `mesh`); allocates nothing.

    With `quantize`, the experts' {"qvalue", "scale"} (quant.py) instead of float weights.
    """
    shapes = jax.eval_shape(functools.partial(init_params, cfg, dtype=jnp.dtype(dtype), expert_dtype=expert_dtype),
                            jax.random.key(0))
    for path, q in quantized(quant.check_mode(quantize)).items():
        _replace(shapes, path, lambda a: {k: jax.ShapeDtypeStruct(shape, dt)
                                          for k, (shape, dt) in quant.shapes(a.shape, *q).items()})
    if mesh is None:
        return shapes
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, param_shardings(cfg, mesh, quantize))


def param_count(cfg: MixtralConfig) -> dict[str, int]:
    """Total and per-token active parameter counts, from abstract params (nothing allocated).

    Active counts every non-expert weight plus top-k of the E experts in each layer.
    """
    return _total_and_active(cfg, abstract_params(cfg), lambda a: math.prod(a.shape))


def param_bytes(cfg: MixtralConfig, dtype, expert_dtype=None, quantize: str | None = None) -> dict[str, int]:
    """As `param_count`, in bytes, for parameters held in `dtype` (experts in `expert_dtype`, see
    `param_dtypes`, or quantized: `quantize` "int8" / "int4", their qvalues and scales)."""
    shapes = abstract_params(cfg, dtype, expert_dtype=expert_dtype, quantize=quantize)
    return _total_and_active(cfg, shapes, lambda a: math.prod(a.shape) * a.dtype.itemsize)


def _total_and_active(cfg: MixtralConfig, shapes: Params, size) -> dict[str, int]:
    """{"total", "active"}: `size` summed over all parameters, and without the unchosen experts' share."""
    total = sum(size(a) for a in jax.tree.leaves(shapes))
    expert = sum(size(a) for n in EXPERT_PARAMS for a in jax.tree.leaves(shapes["layers"][n]))
    inactive = expert // cfg.num_local_experts * (cfg.num_local_experts - cfg.num_experts_per_tok)
    return {"total": total, "active": total - inactive}


def _to_nnx(tree):
    if isinstance(tree, dict):
        return nnx.Dict({k: _to_nnx(v) for k, v in tree.items()})
    if isinstance(tree, (list, tuple)):
        return nnx.List([_to_nnx(v) for v in tree])
    return nnx.Param(tree)


def _from_nnx(node):
    if isinstance(node, nnx.Dict):
        return {k: _from_nnx(v) for k, v in node.items()}
    if isinstance(node, nnx.List):
        return [_from_nnx(v) for v in node]
    return node[...]


class Mixtral(nnx.Module):
    """Mixtral causal LM. Holds parameters; the computation lives in pure functions.

    Build with `init_random` or `load`. `model(tokens)` equals `forward(model, tokens)`.
    `mesh` is the mesh the parameters are sharded over (None: one device); on a
    mesh of more than one device the MoE blocks run expert-parallel. `layout`
    is "stacked" or "per_expert" (layout.py).
    """

    def __init__(self, cfg: MixtralConfig, params: Params, mesh=None):
        self.cfg = cfg
        self.mesh = mesh
        self.layout = layout_lib.check(layout_lib.of(params).name, mesh)
        self.embed = _to_nnx(params["embed"])
        self.layers = _to_nnx(params["layers"])
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = _to_nnx(params["lm_head"])

    @property
    def dtype(self):
        """The compute dtype: activations, cache and all weights but (maybe) the experts'."""
        return self.final_norm[...].dtype

    @property
    def expert_dtype(self):
        """The dtype the expert weights are stored in (`dtype` unless loaded with another; int8 or
        uint8, two int4 values per byte, when quantized)."""
        return next(a for path, a in jax.tree_util.tree_leaves_with_path(self.params())
                    if any(getattr(k, "key", None) == "w1" for k in path)).dtype

    @property
    def quantization(self) -> str | None:
        """The quantization mode (quant.MODES) when the experts are quantized, else None."""
        experts = {"int8": "int8", "uint8": "int4"}.get(jnp.dtype(self.expert_dtype).name)
        if experts is None:
            return None
        return experts if isinstance(self.lm_head, nnx.Dict) else f"{experts}-experts"

    def params(self) -> Params:
        """The parameters as a plain pytree of arrays (in this model's layout)."""
        return {"embed": _from_nnx(self.embed), "layers": _from_nnx(self.layers),
                "final_norm": self.final_norm[...], "lm_head": _from_nnx(self.lm_head)}

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return forward(self, tokens)


def decoder_layer(h, lp, *, cfg: MixtralConfig, layout, positions, k_pos, cos, sin, strategy, cache=None,
                  cache_index=None, cache_rows=None, layer=None, collect_routing=False, mesh=None, capacity_factor=None,
                  last_only=False, segments=None, router_logits=False, adapt_layer=None):
    """One pre-norm decoder layer: h + attn(norm(h)), then + moe(norm(h)). h [B, T, D].

    `lp` is one layer's weights in `layout` (layout.py); `cache`, `cache_rows` and `layer` as in
    `attention.self_attention`. With `last_only`, keys and values (and the
    cache) cover all T positions, and the rest only the last: h [B, 1, D] out.
    `segments` [B, T]: packed sequences, attention stays within a segment.
    `adapt_layer`, if given, maps `lp` to the weights used (e.g. LoRA: base + A·B).

    Returns (h, updated cache or None, routing): routing is (weights, expert ids),
    each [B, T, k], when `collect_routing`; the router logits float32 [B, T, E]
    when `router_logits`; else None.
    """
    if adapt_layer is not None:
        lp = adapt_layer(lp)
    a, new_cache = attention.self_attention(
        layers.rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps), lp, positions, k_pos, cos, sin,
        sliding_window=cfg.sliding_window, cache=cache, cache_index=cache_index, cache_rows=cache_rows, layer=layer,
        last_query=last_only, layout=layout, segments=segments, mesh=mesh)
    if last_only:
        h = h[:, -1:]
    h = sharding.constrain(h + a, mesh, ACT_BTD)
    x = layers.rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    routing = None
    if collect_routing:
        w, e = moe.route(x.reshape(-1, x.shape[-1]), lp["router"], cfg.num_experts_per_tok)
        routing = (w.reshape(*x.shape[:-1], -1), e.reshape(*x.shape[:-1], -1))
    elif router_logits:
        # The router's product as moe.route computes it (model dtype, as HF's gate), for the router losses.
        routing = jnp.einsum("BTD,DE->BTE", x, lp["router"]).astype(jnp.float32)
    # A token at a negative position is padding (or an idle serving slot): its output is never read.
    active = positions[:, -1:] >= 0 if last_only else positions >= 0
    h = h + moe.moe(x, lp, cfg.num_experts_per_tok, strategy, mesh, capacity_factor, active=active)
    return sharding.constrain(h, mesh, ACT_BTD), new_cache, routing


def _rematerialised(body):
    """`body` under jax.checkpoint: the backward pass recomputes a layer from its input, so only
    each layer's input [B, T, D] is kept, not its activations (memory flat in depth)."""
    def run(h, lp, cache=None, layer=None, last_only=False):
        return jax.checkpoint(lambda h, lp, cache, layer: body(h, lp, cache=cache, layer=layer,
                                                               last_only=last_only))(h, lp, cache, layer)
    return run


def apply(params: Params, tokens: jax.Array, positions: jax.Array, *, cfg: MixtralConfig,
          strategy: str = "sparse", cache=None, cache_index=None, cache_rows=None, k_pos=None, collect_routing=False,
          last_only=False, mesh=None, capacity_factor=None, segment_ids=None, router_logits=False,
          remat=False, adapt_layer=None, from_h=False, to_h=False):
    """The decoder on token ids; the pure function behind forward, prefill and decode.

    Args:
      params: the parameter tree in either layout (layout.py).
      tokens: [B, T] int ids.
      positions: [B, T] absolute positions.
      cfg: model config (static).
      strategy: "sparse" (the chosen experts) or "dense" (every expert on every token).
      cache: optional (k, v) from `generate.init_cache`, each [L, B, K, S, Dh]; updated in place at slots
        [cache_index, cache_index + T).
      cache_index: slot of the first token when `cache` is given: a scalar, or int [B], one per row.
      cache_rows: optional int [B]: the cache row each row of `tokens` uses, where the cache holds more
        rows (the serving engine's slots, written in place: attention.write_cache); None: row b.
      k_pos: [B, S] key positions (negative: empty) when `cache` is given, for the rows of `tokens`.
      collect_routing: also return every layer's router choices.
      last_only: logits for the last position only ([B, 1, V]; prefill needs no more).
        The layout may then skip the last layer's MoE for the other positions.
      mesh: the mesh `params` are sharded over (static), or None; activations
        are pinned to it and the MoE runs expert-parallel on it.
      capacity_factor: expert-parallel capacity (static); None is dropless.
      segment_ids: optional [B, T] ints, packed sequences without a cache: a
        token attends only to earlier tokens of its own segment (give
        `positions` restarting at each segment).
      router_logits: also return every layer's router logits (training's losses).
      remat: recompute each layer in the backward pass (jax.checkpoint) instead
        of keeping its activations.
      adapt_layer: optional static callable mapping one layer's weights to
        those used (LoRA adds its A·B there, one layer at a time).
      from_h, to_h: run some of the layers only (the serving engine splits a decode step so: engine.py),
        `params` from `layout.PerExpert.layer_span` (which runs those layers only; `cache` stays the whole
        cache, written in place at those layers): `tokens` is the residual
        stream [B, T, D] entering the first of them when `from_h`; `to_h` returns (the residual stream after
        the last of them, updated cache) instead of logits.

    Returns:
      (logits [B, T, V] float32, updated cache or None), plus, when
      `collect_routing`, (weights float32 [L, B, T, k], expert ids int32 [L, B, T, k]),
      or, when `router_logits`, float32 [L, B, T, E].
    """
    if collect_routing and router_logits:
        raise ValueError("ask for collect_routing or router_logits, not both.")
    x = tokens if from_h else layers.embed(tokens, params["embed"], params["final_norm"].dtype)
    x = sharding.constrain(x, mesh, ACT_BTD)
    cos, sin = layers.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    layout = layout_lib.of(params)
    body = functools.partial(decoder_layer, cfg=cfg, layout=layout, positions=positions,
                             k_pos=positions if cache is None else k_pos, cos=cos, sin=sin,
                             strategy=strategy, cache_index=cache_index, cache_rows=cache_rows,
                             collect_routing=collect_routing,
                             mesh=mesh, capacity_factor=capacity_factor, segments=segment_ids,
                             router_logits=router_logits, adapt_layer=adapt_layer)
    if remat:
        body = _rematerialised(body)
    collect = collect_routing or router_logits
    h, new_cache, routing = layout.layers(params, x, cache, body, last_only=last_only and not (collect or to_h),
                                          mesh=mesh)
    if to_h:
        return h, new_cache
    if last_only:
        h = h[:, -1:]
    h = layers.rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    # Vocab-sharded logits: each tensor shard multiplies by its own columns of the lm_head,
    # so only activations and logits travel, never the [D, V] weight.
    logits = sharding.constrain(layout.lm_head(sharding.constrain(h, mesh, ACT_BTD), params), mesh, ACT_BTV)
    return (logits, new_cache, routing) if collect else (logits, new_cache)


@functools.partial(jax.jit, static_argnames=("cfg", "strategy", "mesh", "capacity_factor"))
def _forward(params, tokens, *, cfg, strategy, mesh, capacity_factor):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return apply(params, tokens, positions, cfg=cfg, strategy=strategy, mesh=mesh,
                 capacity_factor=capacity_factor)[0]


def forward(model: Mixtral, tokens, strategy: str = "sparse", capacity_factor: float | None = None) -> jax.Array:
    """Full forward pass without a cache.

    Args:
      model: a `Mixtral`.
      tokens: int [B, T] token ids (positions 0..T-1).
      strategy: single-device MoE dispatch ("sparse" or "dense").
      capacity_factor: expert-parallel capacity on a multi-device mesh; None is dropless.

    Returns:
      float32 logits [B, T, V].
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be a [batch, time] int array, got shape {tokens.shape}.")
    return _forward(model.params(), tokens, cfg=model.cfg, strategy=strategy, mesh=model.mesh,
                    capacity_factor=capacity_factor)


def init_random(cfg: MixtralConfig, seed: int = 0, dtype="float32", mesh=None, layout: str | None = None,
                expert_dtype=None, quantize: str | None = None) -> Mixtral:
    """A model with random weights, created already sharded when `mesh` is given.

    Args:
      cfg: model config.
      seed: PRNG seed.
      dtype: parameter dtype ("float32" on CPU; "bfloat16" on TPU/GPU).
      mesh: optional `jax.sharding.Mesh` (see `make_mesh`); parameters are
        created directly in their shardings, never whole on one device.
      layout: "stacked", "per_expert", or None: per_expert on one CPU device,
        stacked otherwise (layout.py).
      expert_dtype: the experts' weights in this dtype instead (see `param_dtypes`).
      quantize: a quant.MODES mode: the random float weights it covers quantized (quant.py), one layer at a time.

    Returns:
      A `Mixtral`.
    """
    layout = layout_lib.check(layout, mesh)
    quant.check_mode(quantize)
    params = _jitted_init(cfg, jnp.dtype(dtype), None if expert_dtype is None else jnp.dtype(expert_dtype),
                          mesh)(jax.random.key(seed))
    shardings = None if mesh is None or not quantize else param_shardings(cfg, mesh, quantize)
    for path, spec in quantized(quantize).items():
        target = None if shardings is None else functools.reduce(lambda t, k: t[k], path, shardings)

        def quantize_one(w):
            if len(path) == 1:  # embed, lm_head: no layer axis
                q = quant.quantize(np.asarray(jax.device_get(w)), *spec)
                out = {k: jax.device_put(v, None if target is None else target[k]) for k, v in q.items()}
            else:
                out = quant.quantize_layers(w, spec.width, target, spec.in_axes, spec.group)
            w.delete()
            return out

        _replace(params, path, quantize_one)
    params = layout_lib.get(layout).from_stacked(params)
    cpu_kernel.use_huge_pages(params)
    return Mixtral(cfg, params, mesh)


@functools.cache
def _jitted_init(cfg: MixtralConfig, dtype, expert_dtype, mesh):
    # One jitted function per model, dtypes and mesh: a fresh jit per call would compile every time.
    shardings = None if mesh is None else param_shardings(cfg, mesh)
    return jax.jit(functools.partial(init_params, cfg, dtype=dtype, expert_dtype=expert_dtype),
                   out_shardings=shardings)
