"""The Mixtral decoder: parameter table, NNX module, and the forward pass.

Parameters are described abstractly first (`param_specs`: shape + logical
axes), then initialised or restored. Two layouts of the same weights:

  stacked     (TPU/GPU, any mesh; the checkpoint layout) layers stacked on a
              leading L axis and run with `jax.lax.scan`, so compile time does
              not grow with depth.
  per_expert  (one CPU device, the default there) one buffer per layer and per
              (layer, expert), experts in HF's [out, in] layout, layers
              unrolled. XLA:CPU copies any slice of a stacked weight before a
              dot (docs/cpu_probe/FINDINGS.md): a decode step over stacked
              weights moves each chosen expert three times. Whole buffers are
              read in place, so decode streams the weights once.

Stacked parameter tree (the Orbax checkpoint has exactly this layout):

    embed       [V, D]
    layers/
      attn_norm [L, D]
      wq        [L, D, H, Dh]    wk, wv [L, D, K, Dh]    wo [L, H, Dh, D]
      mlp_norm  [L, D]
      router    [L, D, E]
      w1, w3    [L, E, D, F]     w2 [L, E, F, D]
    final_norm  [D]
    lm_head     [D, V]

The per_expert tree keeps every matrix in HF's [out, in] orientation, since
XLA:CPU multiplies a few rows by it faster than by [in, out] (at 4 rows: 21.6
vs 13.4 GB/s for an lm_head-sized weight, docs/cpu_probe/results/lm_head_layout.txt):

    embed       [V, D]
    layers      list of L dicts:
      attn_norm [D]
      wqkv      [(H + 2K) * Dh, D]   (wq, wk, wv concatenated)    wo [D, H * Dh]
      mlp_norm  [D]
      router    [D, E]
      experts   list of E dicts: w1, w3 [F, D], w2 [D, F]
    final_norm  [D]
    lm_head     [V, D]
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
LAYOUTS = ("stacked", "per_expert")
ACT_BTD = ("batch", "seq", "embed")  # logical axes of the residual stream [B, T, D]
ACT_BTV = ("batch", "seq", "vocab")  # logits [B, T, V], split over vocab like the lm_head


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


def abstract_params(cfg: MixtralConfig, dtype="bfloat16", mesh=None, expert_dtype=None) -> Params:
    """jax.ShapeDtypeStruct for every parameter (with shardings if `mesh`); allocates nothing."""
    shapes = jax.eval_shape(functools.partial(init_params, cfg, dtype=jnp.dtype(dtype), expert_dtype=expert_dtype),
                            jax.random.key(0))
    if mesh is None:
        return shapes
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, param_shardings(cfg, mesh))


def param_count(cfg: MixtralConfig) -> dict[str, int]:
    """Total and per-token active parameter counts, from abstract params (nothing allocated).

    Active counts every non-expert weight plus top-k of the E experts in each layer.
    """
    return _total_and_active(cfg, abstract_params(cfg), lambda a: math.prod(a.shape))


def param_bytes(cfg: MixtralConfig, dtype, expert_dtype=None) -> dict[str, int]:
    """As `param_count`, in bytes, for parameters held in `dtype` (experts in `expert_dtype`, see `param_dtypes`)."""
    shapes = abstract_params(cfg, dtype, expert_dtype=expert_dtype)
    return _total_and_active(cfg, shapes, lambda a: math.prod(a.shape) * a.dtype.itemsize)


def _total_and_active(cfg: MixtralConfig, shapes: Params, size) -> dict[str, int]:
    """{"total", "active"}: `size` summed over all parameters, and without the unchosen experts' share."""
    total = sum(size(a) for a in jax.tree.leaves(shapes))
    expert = sum(size(shapes["layers"][n]) for n in EXPERT_PARAMS)
    inactive = expert // cfg.num_local_experts * (cfg.num_local_experts - cfg.num_experts_per_tok)
    return {"total": total, "active": total - inactive}


def default_layout(mesh=None) -> str:
    """per_expert on a single CPU device (decode reads weights in place), else stacked."""
    single = mesh is None or mesh.size == 1
    return "per_expert" if single and jax.default_backend() == "cpu" else "stacked"


def layout_of(params: Params) -> str:
    return "per_expert" if isinstance(params["layers"], list) else "stacked"


def _unstack_fn(name: str, num_layers: int):
    """Jitted [L, ...] -> L per-layer buffers; experts [L, E, a, b] -> L lists of E [b, a] buffers;
    wo [L, H, Dh, D] -> L [D, H * Dh]."""
    if name in EXPERT_PARAMS:
        return jax.jit(lambda w: [[w[l, e].T for e in range(w.shape[1])] for l in range(num_layers)])
    if name == "wo":
        return jax.jit(lambda w: [w[l].reshape(-1, w.shape[-1]).T for l in range(num_layers)])
    return jax.jit(lambda w: [w[l] for l in range(num_layers)])


@functools.partial(jax.jit, static_argnums=3)
def _fuse_qkv(wq, wk, wv, num_layers: int):
    """wq [L, D, H, Dh], wk / wv [L, D, K, Dh] -> L [(H + 2K) * Dh, D] buffers."""
    d = wq.shape[1]
    return [jnp.concatenate([w[l].reshape(d, -1) for w in (wq, wk, wv)], axis=1).T for l in range(num_layers)]


def unstack_params(params: Params) -> Params:
    """Stacked -> per_expert layout, one parameter at a time (wq, wk, wv together: they are fused).

    Each stacked array is deleted once split, so the peak is the model plus
    its largest parameter (an expert tensor, bigger than wq, wk and wv
    together), not two models.
    """
    layers = dict(params["layers"])
    num_layers = layers["wq"].shape[0]
    out_layers = [{"experts": [{} for _ in range(layers["w1"].shape[1])]} for _ in range(num_layers)]
    qkv = [layers.pop(name) for name in ("wq", "wk", "wv")]
    for l, w in enumerate(_fuse_qkv(*qkv, num_layers)):
        out_layers[l]["wqkv"] = w
    for w in qkv:
        w.delete()
    for name in list(layers):
        stacked = layers.pop(name)
        split = _unstack_fn(name, num_layers)(stacked)
        stacked.delete()
        for l in range(num_layers):
            if name in EXPERT_PARAMS:
                for e, w in enumerate(split[l]):
                    out_layers[l]["experts"][e][name] = w
            else:
                out_layers[l][name] = split[l]
    lm_head = params["lm_head"]
    lm_head_t = jax.jit(jnp.transpose)(lm_head)  # [V, D]
    lm_head.delete()
    return {**{k: v for k, v in params.items() if k not in ("layers", "lm_head")},
            "layers": out_layers, "lm_head": lm_head_t}


def stacked_global(params: Params, name: str):
    """Per_expert params: the non-layer parameter `name` in the stacked orientation (lm_head [D, V])."""
    return params[name].T if name == "lm_head" else params[name]


def layer_slice(params: Params, cfg: MixtralConfig, name: str, l: int, e: int | None = None):
    """Per_expert params: layer l's (and expert e's) `name`, as that slice of the stacked array.

    Matrices are transposed back from HF's [out, in] orientation; wq, wk, wv
    are cut out of wqkv.
    """
    lp = params["layers"][l]
    if name in EXPERT_PARAMS:
        return lp["experts"][e][name].T
    d, dh, h, kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    if name == "wo":
        return lp["wo"].T.reshape(h, dh, d)
    if name in ("wq", "wk", "wv"):
        start, heads = {"wq": (0, h), "wk": (h * dh, kv), "wv": ((h + kv) * dh, kv)}[name]
        return lp["wqkv"][start:start + heads * dh].T.reshape(d, heads, dh)
    return lp[name]


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
    is "stacked" or "per_expert" (see the module docstring).
    """

    def __init__(self, cfg: MixtralConfig, params: Params, mesh=None):
        self.cfg = cfg
        self.mesh = mesh
        self.layout = check_layout(layout_of(params), mesh)
        self.embed = nnx.Param(params["embed"])
        self.layers = _to_nnx(params["layers"])
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = nnx.Param(params["lm_head"])

    @property
    def dtype(self):
        """The compute dtype: activations, cache and all weights but (maybe) the experts'."""
        return self.embed[...].dtype

    @property
    def expert_dtype(self):
        """The dtype the expert weights are stored in (`dtype` unless loaded with another)."""
        w1 = self.layers[0]["experts"][0]["w1"] if isinstance(self.layers, nnx.List) else self.layers["w1"]
        return w1[...].dtype

    def params(self) -> Params:
        """The parameters as a plain pytree of arrays (in this model's layout)."""
        return {"embed": self.embed[...], "layers": _from_nnx(self.layers),
                "final_norm": self.final_norm[...], "lm_head": self.lm_head[...]}

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return forward(self, tokens)


def decoder_layer(h, lp, *, cfg: MixtralConfig, positions, k_pos, cos, sin, strategy, cache=None,
                  cache_index=None, layer=None, collect_routing=False, mesh=None, capacity_factor=None,
                  last_only=False):
    """One pre-norm decoder layer: h + attn(norm(h)), then + moe(norm(h)). h [B, T, D].

    `lp` is one layer's weights in either layout; `cache` and `layer` as in
    `attention.self_attention`. With `last_only`, keys and values (and the
    cache) cover all T positions, and the rest only the last: h [B, 1, D] out.

    Returns (h, updated cache or None, routing): routing is (weights, expert ids),
    each [B, T, k], when `collect_routing`, else None.
    """
    a, new_cache = attention.self_attention(
        layers.rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps), lp, positions, k_pos, cos, sin,
        sliding_window=cfg.sliding_window, cache=cache, cache_index=cache_index, layer=layer, last_query=last_only)
    if last_only:
        h = h[:, -1:]
    h = sharding.constrain(h + a, mesh, ACT_BTD)
    x = layers.rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    routing = None
    if collect_routing:
        w, e = moe.route(x.reshape(-1, x.shape[-1]), lp["router"], cfg.num_experts_per_tok)
        routing = (w.reshape(*x.shape[:-1], -1), e.reshape(*x.shape[:-1], -1))
    # A prompt (more than one position per row) runs once: moe favours compile time there.
    one_shot = x.shape[1] > 1 or last_only
    h = h + moe.moe(x, lp, cfg.num_experts_per_tok, strategy, mesh, capacity_factor, one_shot=one_shot)
    return sharding.constrain(h, mesh, ACT_BTD), new_cache, routing


def apply(params: Params, tokens: jax.Array, positions: jax.Array, *, cfg: MixtralConfig,
          strategy: str = "sparse", cache=None, cache_index=None, k_pos=None, collect_routing=False,
          last_only=False, mesh=None, capacity_factor=None):
    """The decoder on token ids; the pure function behind forward, prefill and decode.

    Args:
      params: the parameter tree, stacked (layers scanned) or per_expert (layers unrolled).
      tokens: [B, T] int ids.
      positions: [B, T] absolute positions.
      cfg: model config (static).
      strategy: MoE dispatch strategy.
      cache: optional (k, v): each [L, B, K, S, Dh] for stacked params, a list
        of L [B, K, S, Dh] for per_expert; updated in place at slots
        [cache_index, cache_index + T).
      cache_index: scalar slot of the first token when `cache` is given.
      k_pos: [B, S] key positions (negative: empty) when `cache` is given.
      collect_routing: also return every layer's router choices.
      last_only: logits for the last position only ([B, 1, V]; prefill needs no more).
        With per_expert params (and no `collect_routing`) the last layer's
        attention output and MoE then run for the last position only.
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
    h = x
    per_expert = layout_of(params) == "per_expert"
    if per_expert:
        # Unrolled: every weight and cache entry is its own buffer, read and updated in place.
        new_k, new_v, routings = [], [], []
        num_layers = len(params["layers"])
        for l, lp in enumerate(params["layers"]):
            # With last_only, the last layer needs its keys and values (the cache) at every
            # position but its attention output and MoE only at the last one: 1/L of the
            # prompt's MoE work skipped, with equal logits and cache.
            last = last_only and l == num_layers - 1 and not collect_routing
            h, layer_cache, routing = body(h, lp, cache=None if cache is None else (cache[0][l], cache[1][l]),
                                           last_only=last)
            routings.append(routing)
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        new_cache = None if cache is None else (new_k, new_v)
        routing = jax.tree.map(lambda *r: jnp.stack(r), *routings) if collect_routing else None
    else:
        # Scanned: the whole cache rides in the carry and each layer updates its slots in place.
        def step(carry, xs):
            h, kv = carry
            lp, l = xs
            h, kv, routing = body(h, lp, cache=kv, layer=l)
            # The carried cache keeps its own sharding: left to propagation, XLA may pick another
            # inside the loop and all-gather the whole cache after it.
            if kv is not None:
                kv = tuple(sharding.constrain(c, mesh, sharding.CACHE_AXES["k"]) for c in kv)
            return (h, kv), routing

        num_layers = params["layers"]["wq"].shape[0]
        (h, new_cache), routing = jax.lax.scan(step, (h, cache), (params["layers"], jnp.arange(num_layers)))
    if last_only:
        h = h[:, -1:]
    h = layers.rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    if per_expert:
        # lm_head [V, D]: feature-major for a few rows (layers.linear_t).
        rows = layers.linear_t(h.reshape(-1, h.shape[-1]), params["lm_head"], preferred_element_type=jnp.float32)
        logits = rows.reshape(*h.shape[:-1], -1)
    else:
        # Vocab-sharded logits: each tensor shard multiplies its rows by its own columns of the
        # lm_head, so only activations and logits travel, never the [D, V] weight.
        h = sharding.constrain(h, mesh, ACT_BTD)
        logits = jnp.einsum("BTD,DV->BTV", h, params["lm_head"], preferred_element_type=jnp.float32)
        logits = sharding.constrain(logits, mesh, ACT_BTV)
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


def check_layout(layout: str | None, mesh=None) -> str:
    """Resolves `layout` (None: `default_layout`) and rejects per_expert on a multi-device mesh."""
    layout = default_layout(mesh) if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS} (or None for the default).")
    if layout == "per_expert" and mesh is not None and mesh.size > 1:
        raise ValueError("layout='per_expert' runs on one device; use layout='stacked' (the default) with a mesh.")
    return layout


def init_random(cfg: MixtralConfig, seed: int = 0, dtype="float32", mesh=None, layout: str | None = None,
                expert_dtype=None) -> Mixtral:
    """A model with random weights, created already sharded when `mesh` is given.

    Args:
      cfg: model config.
      seed: PRNG seed.
      dtype: parameter dtype ("float32" on CPU; "bfloat16" on TPU/GPU).
      mesh: optional `jax.sharding.Mesh` (see `make_mesh`); parameters are
        created directly in their shardings, never whole on one device.
      layout: "stacked", "per_expert", or None: per_expert on one CPU device,
        stacked otherwise (see the module docstring).
      expert_dtype: the experts' weights in this dtype instead (see `param_dtypes`).

    Returns:
      A `Mixtral`.
    """
    layout = check_layout(layout, mesh)
    dtype = jnp.dtype(dtype)
    shardings = None if mesh is None else param_shardings(cfg, mesh)
    init = jax.jit(functools.partial(init_params, cfg, dtype=dtype, expert_dtype=expert_dtype),
                   out_shardings=shardings)
    params = init(jax.random.key(seed))
    return Mixtral(cfg, unstack_params(params) if layout == "per_expert" else params, mesh)
