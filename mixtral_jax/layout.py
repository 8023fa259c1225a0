"""Weight layouts: the one seam between the CPU's layout and everyone else's.

Two layouts of the same weights:

  stacked     (TPU/GPU, any mesh; the checkpoint's layout) layers stacked on a
              leading L axis and run with `jax.lax.scan`, so compile time does
              not grow with depth (tree in model.py's docstring).
  per_expert  (one CPU device, the default there) one buffer per layer and
              weight, every matrix in HF's [out, in] orientation, a layer's
              experts stacked in one buffer per weight that the C++ kernel
              reads at each expert's offset, layers unrolled. XLA:CPU copies
              any slice of a stacked weight before a dot
              (docs/performance.md#stacked-weights-are-copied-the-per_expert-layout), so a decode step
              over stacked weights would move each weight it reads again;
              whole buffers are read in place (figures: docs/performance.md, "MoE").

        embed       [V, D]
        layers      list of L dicts:
          attn_norm [D]
          wqkv      [(H + 2K) * Dh, D]   (wq, wk, wv concatenated)    wo [D, H * Dh]
          mlp_norm  [D]
          router    [D, E]
          experts   w1, w3 [E, F, D], w2 [E, D, F]
        final_norm  [D]
        lm_head     [V, D]

A `Layout` (from `of(params)`) does what differs: the attention projections,
the experts handed to `moe.grouped_ffn`, the layer loop, the lm_head and the
cache's form. The model, attention, MoE and generate code call it and never
test which layout they hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import functools
from typing import Any, NamedTuple

from mixtral_jax import layers, quant, sharding
from mixtral_jax.config import MixtralConfig

Params = dict[str, Any]

LAYOUTS = ("stacked", "per_expert")
EXPERT_PARAMS = ("w1", "w3", "w2")


class HFExperts(NamedTuple):
    """A per_expert layer's experts as `moe.grouped_ffn` takes them: each weight stacked over the E experts
    in HF's [out, in] orientation, w1, w3 [E, F, D], w2 [E, D, F] (float, or quant.py's {"qvalue", "scale"}
    in the same orientation). Stacked-layout experts are a dict of [E, in, out] weights instead."""

    w1: Any
    w3: Any
    w2: Any


class Stacked:
    """Layers stacked on a leading L axis and scanned."""

    name = "stacked"
    splits = False  # a run of layers as a call of its own (`layer_span`) would slice the stacked arrays: a copy

    # Quantized weights (quant.py) are dequantized to the activations' dtype before their product, as
    # Qwix's weight-only dot does: the same products as the float model's on the dequantized weights.

    @staticmethod
    def qkv(x, lp, head_dim: int):
        """x [B, T, D] → q [B, T, H, Dh], k, v [B, T, K, Dh]."""
        del head_dim  # in the weights' shapes
        q = jnp.einsum("BTD,DNH->BTNH", x, quant.dequantize(lp["wq"], x.dtype))
        k = jnp.einsum("BTD,DKH->BTKH", x, quant.dequantize(lp["wk"], x.dtype))
        v = jnp.einsum("BTD,DKH->BTKH", x, quant.dequantize(lp["wv"], x.dtype))
        return q, k, v

    @staticmethod
    def out(o, lp):
        """o [B, T, H * Dh] → [B, T, D]; wo as one [H*Dh, D] matrix (XLA:CPU copies a 3-D one before the dot)."""
        return jnp.einsum("BTF,FD->BTD", o, quant.dequantize(lp["wo"], o.dtype).reshape(o.shape[-1], -1))

    @staticmethod
    def lm_head(h, params):
        """h [B, T, D] → float32 logits [B, T, V]."""
        return jnp.einsum("BTD,DV->BTV", h, quant.dequantize(params["lm_head"], h.dtype),
                          preferred_element_type=jnp.float32)

    @staticmethod
    def layers(params, h, cache, body, last_only: bool, mesh=None):
        """Runs `body(h, lp, cache=, layer=)` over the layers under a scan: (h, cache, routing [L, ...])."""
        del last_only  # the scan runs every layer on all positions; apply keeps the last

        def step(carry, xs):
            h, kv = carry
            lp, l = xs
            h, kv, routing = body(h, lp, cache=kv, layer=l)
            if kv is not None:
                # The carried cache keeps its own sharding: left to propagation, XLA may pick another
                # inside the loop and all-gather the whole cache after it.
                kv = tuple(sharding.constrain(c, mesh, sharding.CACHE_AXES["k"]) for c in kv)
            return (h, kv), routing

        # int4 experts go to a custom call on TPU (int4_tpu.py), which would get a copy of the layer's slice
        # were the scan to slice them: they are passed whole with the layer's index, and sliced where used.
        whole = {n: w for n, w in params["layers"].items() if quant.mode_of(w) == "int4"}
        sliced = {n: w for n, w in params["layers"].items() if n not in whole}

        def layer_step(carry, xs):
            lp, l = xs
            return step(carry, ({**lp, **{n: {**w, "layer": l} for n, w in whole.items()}}, l))

        num_layers = params["layers"]["attn_norm"].shape[0]
        (h, cache), routing = jax.lax.scan(layer_step, (h, cache), (sliced, jnp.arange(num_layers)))
        return h, cache, routing

    @staticmethod
    def from_stacked(params):
        return params

    @staticmethod
    def layer_span(params, cache, lo: int, hi: int):
        """(params, cache) holding layers [lo, hi) only: here every layer (`splits` is False)."""
        assert lo == 0 and hi == params["layers"]["attn_norm"].shape[0], (lo, hi)
        return params, cache

    @staticmethod
    def put_layer_span(cache, part, lo: int, hi: int):
        """`cache` with layers [lo, hi) from `part` (what `layer_span`'s cache became): here all of it."""
        del cache, lo, hi
        return part

    @staticmethod
    def init_cache(shapes, dtype, make_sharded):
        """k, v [L, B, K, S, Dh]; made through `make_sharded` (jit with out_shardings on a mesh)."""
        return make_sharded(lambda: {"k": jnp.zeros(shapes["k"], dtype), "v": jnp.zeros(shapes["v"], dtype),
                                     "pos": jnp.full(shapes["pos"], -1, jnp.int32)})


class PerExpert:
    """One buffer per layer and weight (a layer's experts stacked), HF's [out, in] orientation, layers
    unrolled (one CPU device)."""

    name = "per_expert"
    splits = True  # its lists of layers slice for free

    @staticmethod
    def qkv(x, lp, head_dim: int):
        """One product with the fused wqkv [(H + 2K) * Dh, D]."""
        b, t, d = x.shape
        q_dim = jax.tree.leaves(lp["wo"])[0].shape[1]  # the float weight, or a quantized one's qvalue
        kv_dim = (jax.tree.leaves(lp["wqkv"])[0].shape[0] - q_dim) // 2
        dh = head_dim
        qkv = layers.linear_t(x.reshape(b * t, d), lp["wqkv"]).reshape(b, t, -1)
        return (qkv[..., :q_dim].reshape(b, t, -1, dh), qkv[..., q_dim:q_dim + kv_dim].reshape(b, t, -1, dh),
                qkv[..., q_dim + kv_dim:].reshape(b, t, -1, dh))

    @staticmethod
    def out(o, lp):
        b, t, _ = o.shape
        return layers.linear_t(o.reshape(b * t, -1), lp["wo"]).reshape(b, t, -1)

    @staticmethod
    def lm_head(h, params):
        """lm_head [V, D], feature-major for a few rows (layers.linear_t)."""
        rows = layers.linear_t(h.reshape(-1, h.shape[-1]), params["lm_head"], preferred_element_type=jnp.float32)
        return rows.reshape(*h.shape[:-1], -1)

    @staticmethod
    def layers(params, h, cache, body, last_only: bool, mesh=None):
        """Unrolled (one device, so `mesh` has nothing to pin): every weight and cache entry is its own buffer, read and updated in place.

        With `last_only`, the last layer needs its keys and values (the cache)
        at every position but its attention output and MoE only at the last
        one: 1/L of the prompt's MoE work skipped, with equal logits and cache.
        """
        new_k, new_v, routings = [], [], []
        num_layers = len(params["layers"])
        for l, lp in enumerate(params["layers"]):
            h, layer_cache, routing = body(h, lp, cache=None if cache is None else (cache[0][l], cache[1][l]),
                                           last_only=last_only and l == num_layers - 1)
            routings.append(routing)
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        routing = None if routings[0] is None else jax.tree.map(lambda *r: jnp.stack(r), *routings)
        return h, None if cache is None else (new_k, new_v), routing

    @staticmethod
    def from_stacked(params):
        """Stacked params (deleted as they are split) in this layout: `unstack_params`."""
        return unstack_params(params)

    @staticmethod
    def layer_span(params, cache, lo: int, hi: int):
        """(params, cache) holding layers [lo, hi) only, for `model.apply(from_h=, to_h=)`: list slices."""
        return ({**params, "layers": params["layers"][lo:hi]},
                {"k": cache["k"][lo:hi], "v": cache["v"][lo:hi], "pos": cache["pos"]})

    @staticmethod
    def put_layer_span(cache, part, lo: int, hi: int):
        """`cache` with layers [lo, hi) from `part` (what `layer_span`'s cache became)."""
        k, v = cache["k"], cache["v"]
        return {"k": k[:lo] + part["k"] + k[hi:], "v": v[:lo] + part["v"] + v[hi:], "pos": part["pos"]}

    @staticmethod
    def init_cache(shapes, dtype, make_sharded):
        """k, v: lists of L [B, K, S, Dh] buffers, one per unrolled layer (one device: no sharding)."""
        del make_sharded
        per_layer, num_layers = shapes["k"][1:], shapes["k"][0]
        return {"k": [jnp.zeros(per_layer, dtype) for _ in range(num_layers)],
                "v": [jnp.zeros(per_layer, dtype) for _ in range(num_layers)],
                "pos": jnp.full(shapes["pos"], -1, jnp.int32)}


def of(params) -> type[Stacked] | type[PerExpert]:
    """The layout of a parameter tree."""
    return PerExpert if isinstance(params["layers"], list) else Stacked


def get(name: str):
    return {"stacked": Stacked, "per_expert": PerExpert}[name]


def default(mesh=None) -> str:
    """per_expert on a single CPU device (decode reads weights in place), else stacked."""
    single = mesh is None or mesh.size == 1
    return "per_expert" if single and jax.default_backend() == "cpu" else "stacked"


def check(layout: str | None, mesh=None) -> str:
    """Resolves `layout` (None: `default`) and rejects per_expert on a multi-device mesh."""
    layout = default(mesh) if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS} (or None for the default).")
    if layout == "per_expert" and mesh is not None and mesh.size > 1:
        raise ValueError("layout='per_expert' runs on one device; use layout='stacked' (the default) with a mesh.")
    return layout


# ---------------------------------------------------------------- conversions (load, save)


@functools.cache  # one jit per (name, depth): a fresh one per load would compile every time
def _unstack_fn(name: str, num_layers: int):
    """Jitted [L, ...] -> L per-layer buffers; experts [L, E, a, b] -> L [E, b, a] buffers;
    wo [L, H, Dh, D] -> L [D, H * Dh]."""
    if name in EXPERT_PARAMS:  # a float weight, or a quantized one's {"qvalue", "scale"} (quant.py)
        return jax.jit(lambda w: [quant.transpose(jax.tree.map(lambda a: a[l], w)) for l in range(num_layers)])
    if name == "wo":  # (an int8 scale [L, 1, 1, D] -> L [D, 1])
        return jax.jit(lambda w: [jax.tree.map(lambda a: a[l].reshape(-1, a.shape[-1]).T, w)
                                  for l in range(num_layers)])
    return jax.jit(lambda w: [w[l] for l in range(num_layers)])


@functools.partial(jax.jit, static_argnums=3)
def _fuse_qkv(wq, wk, wv, num_layers: int):
    """wq [L, D, H, Dh], wk / wv [L, D, K, Dh] -> L [(H + 2K) * Dh, D] buffers (quantized: qvalues alike,
    int8 scales [L, 1, H, Dh] ... -> L [(H + 2K) * Dh, 1])."""
    fuse = lambda *ws: [jnp.concatenate([w[l].reshape(w.shape[1], -1) for w in ws], axis=1).T
                        for l in range(num_layers)]
    if not isinstance(wq, dict):
        return fuse(wq, wk, wv)
    parts = {k: fuse(wq[k], wk[k], wv[k]) for k in wq}
    return [{k: parts[k][l] for k in parts} for l in range(num_layers)]


def unstack_params(params: Params) -> Params:
    """Stacked -> per_expert layout, one parameter at a time (wq, wk, wv together: they are fused).

    Each stacked array is deleted once split, so the peak is the model plus
    its largest parameter (an expert tensor, bigger than wq, wk and wv
    together), not two models.
    """
    layers = dict(params["layers"])
    num_layers = layers["attn_norm"].shape[0]
    out_layers = [{"experts": {}} for _ in range(num_layers)]
    qkv = [layers.pop(name) for name in ("wq", "wk", "wv")]
    for l, w in enumerate(_fuse_qkv(*qkv, num_layers)):
        out_layers[l]["wqkv"] = w
    for a in jax.tree.leaves(qkv):
        a.delete()
    for name in list(layers):
        stacked = layers.pop(name)
        split = _unstack_fn(name, num_layers)(stacked)
        for a in jax.tree.leaves(stacked):
            a.delete()
        for l in range(num_layers):
            if name in EXPERT_PARAMS:
                out_layers[l]["experts"][name] = split[l]
            else:
                out_layers[l][name] = split[l]
    lm_head = params["lm_head"]
    lm_head_t = jax.jit(lambda w: jax.tree.map(jnp.transpose, w))(lm_head)  # [V, D] (int8 scale [V, 1])
    for a in jax.tree.leaves(lm_head):
        a.delete()
    return {**{k: v for k, v in params.items() if k not in ("layers", "lm_head")},
            "layers": out_layers, "lm_head": lm_head_t}


def stacked_global(params: Params, name: str):
    """Per_expert params: the non-layer parameter `name` in the stacked orientation (lm_head [D, V])."""
    return quant.transpose(params[name]) if name == "lm_head" else params[name]


def layer_slice(params: Params, cfg: MixtralConfig, name: str, l: int, e: int | None = None):
    """Per_expert params: layer l's (and expert e's) `name`, as that slice of the stacked array.

    Matrices are transposed back from HF's [out, in] orientation; wq, wk, wv
    are cut out of wqkv.
    """
    lp = params["layers"][l]
    if name in EXPERT_PARAMS:
        return jax.tree.map(lambda a: a[e].T, lp["experts"][name])
    d, dh, h, kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    # An int8 scale has size 1 along the input (D for wq, wk, wv; H and Dh for wo).
    inputs = lambda a, *dims: dims if a.shape[1] > 1 else (1,) * len(dims)
    if name == "wo":
        return jax.tree.map(lambda a: a.T.reshape(*inputs(a, h, dh), d), lp["wo"])
    if name in ("wq", "wk", "wv"):
        start, heads = {"wq": (0, h), "wk": (h * dh, kv), "wv": ((h + kv) * dh, kv)}[name]
        return jax.tree.map(lambda a: a[start:start + heads * dh].T.reshape(*inputs(a, d), heads, dh), lp["wqkv"])
    return lp[name]
