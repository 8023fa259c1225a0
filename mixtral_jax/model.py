"""The Mixtral decoder: parameter table, NNX module, and the scanned forward pass.

Parameters are described abstractly first (`param_specs`: shape + logical
axes), then initialised or restored. Layers are stacked on a leading L axis and
run with `jax.lax.scan`, so compile time does not grow with depth.

Parameter tree (the Orbax checkpoint has exactly this layout):

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
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax import attention, layers, moe, sharding
from mixtral_jax.config import MixtralConfig

Params = dict[str, Any]
EXPERT_PARAMS = ("w1", "w3", "w2")
ACT_BTD = ("batch", "seq", "embed")  # logical axes of the residual stream [B, T, D]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # "normal" (std 0.02, as HF's initializer_range) or "ones"


def param_specs(cfg: MixtralConfig) -> Params:
    """Shapes and logical axes of every parameter, as a tree like the params."""
    v, d, f = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    l, h, kv, dh, e = (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                       cfg.head_dim, cfg.num_local_experts)
    return {
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


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_shardings(cfg: MixtralConfig, mesh) -> Params:
    """NamedSharding for every parameter on `mesh`, from the logical-axis rules."""
    return jax.tree.map(lambda s: sharding.named_sharding(mesh, s.axes, s.shape), param_specs(cfg),
                        is_leaf=_is_spec)


def init_params(cfg: MixtralConfig, key: jax.Array, dtype) -> Params:
    """Random parameters (normal std 0.02, norms at one), like HF's initialisation."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    out = [jnp.ones(s.shape, dtype) if s.init == "ones"
           else (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)
           for s, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, out)


def abstract_params(cfg: MixtralConfig, dtype="bfloat16", mesh=None) -> Params:
    """jax.ShapeDtypeStruct for every parameter (with shardings if `mesh`); allocates nothing."""
    shapes = jax.eval_shape(functools.partial(init_params, cfg, dtype=jnp.dtype(dtype)), jax.random.key(0))
    if mesh is None:
        return shapes
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, param_shardings(cfg, mesh))


def param_count(cfg: MixtralConfig) -> dict[str, int]:
    """Total and per-token active parameter counts, from abstract params (nothing allocated).

    Active counts every non-expert weight plus top-k of the E experts in each layer.
    """
    shapes = abstract_params(cfg)
    total = sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))
    expert = sum(math.prod(shapes["layers"][n].shape) for n in EXPERT_PARAMS)
    inactive = expert // cfg.num_local_experts * (cfg.num_local_experts - cfg.num_experts_per_tok)
    return {"total": total, "active": total - inactive}


class DecoderLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading L axis."""

    def __init__(self, params: Params):
        for name, value in params.items():
            setattr(self, name, nnx.Param(value))


class Mixtral(nnx.Module):
    """Mixtral causal LM. Holds parameters; the computation lives in pure functions.

    Build with `init_random` or `load`. `model(tokens)` equals `forward(model, tokens)`.
    `mesh` is the mesh the parameters are sharded over (None: one device); on a
    mesh of more than one device the MoE blocks run expert-parallel.
    """

    def __init__(self, cfg: MixtralConfig, params: Params, mesh=None):
        self.cfg = cfg
        self.mesh = mesh
        self.embed = nnx.Param(params["embed"])
        self.layers = DecoderLayers(params["layers"])
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = nnx.Param(params["lm_head"])

    @property
    def dtype(self):
        return self.embed[...].dtype

    def params(self) -> Params:
        """The parameters as a plain nested dict of arrays (the checkpoint layout)."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return forward(self, tokens)


def decoder_layer(h, lp, *, cfg: MixtralConfig, positions, k_pos, cos, sin, strategy, cache=None,
                  cache_index=None, collect_routing=False, mesh=None, capacity_factor=None):
    """One pre-norm decoder layer: h + attn(norm(h)), then + moe(norm(h)). h [B, T, D].

    Returns (h, updated cache or None, routing): routing is (weights, expert ids),
    each [B, T, k], when `collect_routing`, else None.
    """
    a, new_cache = attention.self_attention(
        layers.rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps), lp, positions, k_pos, cos, sin,
        sliding_window=cfg.sliding_window, cache=cache, cache_index=cache_index)
    h = sharding.constrain(h + a, mesh, ACT_BTD)
    x = layers.rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    routing = None
    if collect_routing:
        w, e = moe.route(x.reshape(-1, x.shape[-1]), lp["router"], cfg.num_experts_per_tok)
        routing = (w.reshape(*x.shape[:-1], -1), e.reshape(*x.shape[:-1], -1))
    h = h + moe.moe(x, lp, cfg.num_experts_per_tok, strategy, mesh, capacity_factor)
    return sharding.constrain(h, mesh, ACT_BTD), new_cache, routing


def apply(params: Params, tokens: jax.Array, positions: jax.Array, *, cfg: MixtralConfig,
          strategy: str = "sparse", cache=None, cache_index=None, k_pos=None, collect_routing=False,
          mesh=None, capacity_factor=None):
    """The decoder on token ids; the pure function behind forward, prefill and decode.

    Args:
      params: the parameter tree.
      tokens: [B, T] int ids.
      positions: [B, T] absolute positions.
      cfg: model config (static).
      strategy: MoE dispatch strategy.
      cache: optional (k, v) each [L, B, S, K, Dh]; updated at [cache_index, cache_index + T).
      cache_index: scalar slot of the first token when `cache` is given.
      k_pos: [B, S] key positions (negative: empty) when `cache` is given.
      collect_routing: also return every layer's router choices.
      mesh: the mesh `params` are sharded over (static), or None; activations
        are pinned to it and the MoE runs expert-parallel on it.
      capacity_factor: expert-parallel capacity (static); None is dropless.

    Returns:
      (logits [B, T, V] float32, updated cache or None), plus, when
      `collect_routing`, (weights float32 [L, B, T, k], expert ids int32 [L, B, T, k]).
    """
    x = sharding.constrain(layers.embed(tokens, params["embed"]), mesh, ACT_BTD)
    cos, sin = layers.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    body = functools.partial(decoder_layer, cfg=cfg, positions=positions,
                             k_pos=positions if cache is None else k_pos, cos=cos, sin=sin,
                             strategy=strategy, cache_index=cache_index, collect_routing=collect_routing,
                             mesh=mesh, capacity_factor=capacity_factor)

    def step(h, xs):
        lp, layer_cache = xs
        h, layer_cache, routing = body(h, lp, cache=layer_cache)
        return h, (layer_cache, routing)

    h, (new_cache, routing) = jax.lax.scan(step, x, (params["layers"], cache))
    h = layers.rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    logits = jnp.einsum("BTD,DV->BTV", h, params["lm_head"], preferred_element_type=jnp.float32)
    return (logits, new_cache, routing) if collect_routing else (logits, new_cache)


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


def init_random(cfg: MixtralConfig, seed: int = 0, dtype="float32", mesh=None) -> Mixtral:
    """A model with random weights, created already sharded when `mesh` is given.

    Args:
      cfg: model config.
      seed: PRNG seed.
      dtype: parameter dtype ("float32" on CPU; "bfloat16" on TPU/GPU).
      mesh: optional `jax.sharding.Mesh` (see `make_mesh`); parameters are
        created directly in their shardings, never whole on one device.

    Returns:
      A `Mixtral`.
    """
    dtype = jnp.dtype(dtype)
    shardings = None if mesh is None else param_shardings(cfg, mesh)
    init = jax.jit(functools.partial(init_params, cfg, dtype=dtype), out_shardings=shardings)
    return Mixtral(cfg, init(jax.random.key(seed)), mesh)
