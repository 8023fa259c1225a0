"""Weight layouts: the one seam between the CPU's layout and everyone else's.

Two layouts of the same weights:

  stacked     (TPU/GPU, any mesh; the checkpoint's layout) layers stacked on a
              leading L axis and run with `jax.lax.scan`, so compile time does
              not grow with depth (tree in model.py's docstring).
  per_expert  (one CPU device, the default there) every matrix in HF's
              [out, in] orientation, still one buffer per weight for all
              the layers (and a layer's experts), layers unrolled: the C++
              kernels read layer l (and expert e) where it lies, at its
              offset. XLA:CPU copies any slice of a stacked weight before a
              dot (docs/performance.md#stacked-weights-are-copied-the-per_expert-layout),
              so XLA ops would move each weight a decode step reads again;
              one operand per weight, not per layer, keeps a decode step's
              dispatch short (docs/performance.md#every-layer-in-one-buffer-per-weight).

        embed       [V, D]
        layers
          attn_norm [L, D]
          wqkv      [L, (H + 2K) * Dh, D]   (wq, wk, wv concatenated)    wo [L, D, H * Dh]
          mlp_norm  [L, D]
          router    [L, D, E]
          experts   w1, w3 [L, E, F, D], w2 [L, E, D, F]
        final_norm  [D]
        lm_head     [V, D]

A `Layout` (from `of(params)`) does what differs: the attention projections,
the experts handed to `moe.grouped_ffn`, the layer loop and the lm_head (the
KV cache is the same in both: `generate.init_cache`). The model, attention,
MoE and generate code call it and never test which layout they hold.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mixtral_jax import layers, quant, quant_tpu, sharding
from mixtral_jax.config import MixtralConfig
from mixtral_jax.layers import AtLayer

Params = dict[str, Any]

LAYOUTS = ("stacked", "per_expert")
EXPERT_PARAMS = ("w1", "w3", "w2")


@dataclasses.dataclass(frozen=True)
class HFExperts:
    """A per_expert layer's experts as `moe.grouped_ffn` takes them: each weight stacked over the E experts
    in HF's [out, in] orientation, w1, w3 [E, F, D], w2 [E, D, F] (float, or quant.py's {"qvalue", "scale"}
    in the same orientation); with `layer` (a Python int, static under jit), every layer's, [L, E, ...],
    of which layer `layer`'s run. Stacked-layout experts are a dict of [E, in, out] weights instead."""

    w1: Any
    w3: Any
    w2: Any
    layer: int | None = None

    def weights(self) -> list:
        """[w1, w3, w2] as stored (every layer's when `layer` is set)."""
        return [self.w1, self.w3, self.w2]

    def expert(self, e: int) -> list:
        """Expert e's [w1, w3, w2] ([out, in] each), sliced out (a copy on XLA:CPU)."""
        at = (e,) if self.layer is None else (self.layer, e)
        return [jax.tree.map(lambda a: a[at], w) for w in self.weights()]


jax.tree_util.register_dataclass(HFExperts, data_fields=["w1", "w3", "w2"], meta_fields=["layer"])


class Stacked:
    """Layers stacked on a leading L axis and scanned."""

    name = "stacked"
    splits = False  # a run of layers as a call of its own (`layer_span`) would slice the stacked arrays: a copy

    # Quantized weights (quant.py) are dequantized to the activations' dtype before their product, as
    # Qwix's weight-only dot does: the same products as the float model's on the dequantized weights;
    # on TPU, int8 in groups goes through quant_tpu.py's kernels instead (_to_heads, _from_heads).

    @staticmethod
    def qkv(x, lp, head_dim: int, mesh=None):
        """x [B, T, D] → q [B, T, H, Dh], k, v [B, T, K, Dh]."""
        del head_dim  # in the weights' shapes
        return tuple(_to_heads(x, lp[n], heads, mesh) for n, heads in (("wq", "heads"), ("wk", "kv_heads"),
                                                                         ("wv", "kv_heads")))

    @staticmethod
    def out(o, lp, mesh=None):
        """o [B, T, H * Dh] → [B, T, D]."""
        return _from_heads(o, lp["wo"], mesh)

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

        # Weights quantized in groups go to a custom call on TPU (quant_tpu.py), which would get a copy of the
        # layer's slice were the scan to slice them: they are passed whole with the layer's index, and sliced
        # where used.
        whole = {n: w for n, w in params["layers"].items() if quant.in_groups(w)}
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
    def layer_span(params, lo: int, hi: int):
        """params running layers [lo, hi) only: here every layer (`splits` is False)."""
        assert lo == 0 and hi == params["layers"]["attn_norm"].shape[0], (lo, hi)
        return params


def _int8_in_groups(w) -> bool:
    """Whether w is int8 with scales per group of inputs: on TPU, quant_tpu.py's kernels' case."""
    return quant.in_groups(w) and quant.mode_of(w) == "int8"


def _per_device(fn, mesh, x, w, x_axes, w_axes, out_axes, out_shape):
    """fn(x, w) on each device's shards under shard_map, by the logical axes of x, of the float weight and of
    the result (XLA cannot partition a Pallas call); fn itself on one device."""
    if mesh is None or mesh.size == 1:
        return fn(x, w)
    spec = lambda axes, shape: sharding.logical_to_spec(axes, mesh, shape)
    w_axes = ("layers", *w_axes) if "layer" in w else w_axes
    w_spec = {k: (P() if k == "layer" else spec(w_axes, w[k].shape)) for k in w}
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec(x_axes, x.shape), w_spec),
                         out_specs=spec(out_axes, out_shape))(x, w)


def _to_heads(x, w, heads: str, mesh):
    """x [B, T, D] times wq, wk or wv [D, N, Dh] (`heads`: N's logical axis) → [B, T, N, Dh]."""
    xla = lambda x, w: jnp.einsum("BTD,DNH->BTNH", x, quant.dequantize(w, x.dtype))
    if not _int8_in_groups(w):
        return xla(x, w)

    def local(x, w):
        b, t, d = x.shape
        return quant_tpu.int8_to_heads(x.reshape(b * t, d), w, x.dtype).reshape(b, t, *w["qvalue"].shape[-2:])

    n, dh = w["qvalue"].shape[-2:]
    tpu = lambda x, w: _per_device(local, mesh, x, w, ("batch", "seq", "embed"), ("embed", heads, "head_dim"),
                                   ("batch", "seq", heads, "head_dim"), (*x.shape[:2], n, dh))
    # Chosen when lowering, so a TPU compile from a CPU host gets the kernel.
    return jax.lax.platform_dependent(x, w, tpu=tpu, default=xla)


def _from_heads(o, w, mesh):
    """o [B, T, H * Dh] times wo [H, Dh, D] → [B, T, D]."""
    # wo as one [H * Dh, D] matrix: XLA:CPU copies a 3-D one before the dot.
    xla = lambda o, w: jnp.einsum("BTF,FD->BTD", o, quant.dequantize(w, o.dtype).reshape(o.shape[-1], -1))
    if not _int8_in_groups(w):
        return xla(o, w)

    def local(o, w):
        b, t, _ = o.shape
        h, dh = w["qvalue"].shape[-3:-1]
        y = quant_tpu.int8_from_heads(o.reshape(b * t, h, dh), w, o.dtype).reshape(b, t, -1)
        # Each device holds some heads of wo: its product is a partial sum over them.
        return y if mesh is None or mesh.shape["tensor"] == 1 else jax.lax.psum(y, "tensor")

    d = w["qvalue"].shape[-1]
    tpu = lambda o, w: _per_device(local, mesh, o, w, ("batch", "seq", "heads"), ("heads", "head_dim", "embed"),
                                   ("batch", "seq", "embed"), (*o.shape[:2], d))
    return jax.lax.platform_dependent(o, w, tpu=tpu, default=xla)


@dataclasses.dataclass(frozen=True)
class LayerSpan:
    """Layers [lo, hi) of a per_expert layer tree (`PerExpert.layer_span`): the same buffers, the span
    static, so a serving engine's decode part runs its layers without slicing (copying) any weight."""

    layers: Any
    lo: int
    hi: int


jax.tree_util.register_dataclass(LayerSpan, data_fields=["layers"], meta_fields=["lo", "hi"])


class PerExpert:
    """HF's [out, in] orientation, one buffer per weight for all the layers, layers unrolled (one CPU
    device): layer l's products read their weights in place (`AtLayer`, `HFExperts.layer`)."""

    name = "per_expert"
    splits = True  # a run of layers is a static span of the same buffers (`layer_span`)

    @staticmethod
    def qkv(x, lp, head_dim: int, mesh=None):
        """One product with the fused wqkv [(H + 2K) * Dh, D]."""
        del mesh  # one device
        b, t, d = x.shape
        q_dim = jax.tree.leaves(lp["wo"])[0].shape[-1]  # the float weight, or a quantized one's qvalue
        kv_dim = (jax.tree.leaves(lp["wqkv"])[0].shape[-2] - q_dim) // 2
        dh = head_dim
        qkv = layers.linear_t(x.reshape(b * t, d), lp["wqkv"]).reshape(b, t, -1)
        return (qkv[..., :q_dim].reshape(b, t, -1, dh), qkv[..., q_dim:q_dim + kv_dim].reshape(b, t, -1, dh),
                qkv[..., q_dim + kv_dim:].reshape(b, t, -1, dh))

    @staticmethod
    def out(o, lp, mesh=None):
        del mesh  # one device
        b, t, _ = o.shape
        return layers.linear_t(o.reshape(b * t, -1), lp["wo"]).reshape(b, t, -1)

    @staticmethod
    def lm_head(h, params):
        """lm_head [V, D], feature-major for a few rows (layers.linear_t)."""
        rows = layers.linear_t(h.reshape(-1, h.shape[-1]), params["lm_head"], preferred_element_type=jnp.float32)
        return rows.reshape(*h.shape[:-1], -1)

    @staticmethod
    def layer(tree, l: int):
        """Layer l's weights as the layer body takes them: the products' as `AtLayer`s and `HFExperts` of
        layer l, read in place by the kernels; the norms and router ([D], [D, E]) sliced."""
        out = {}
        for name, w in tree.items():
            if name == "experts":
                out[name] = HFExperts(**w, layer=l)
            elif name in ("wqkv", "wo"):
                out[name] = AtLayer(w, l)
            else:
                out[name] = jax.tree.map(lambda a: a[l], w)
        return out

    @staticmethod
    def layers(params, h, cache, body, last_only: bool, mesh=None):
        """Unrolled (one device, so `mesh` has nothing to pin), every layer's weights and cache read and
        written in place at that layer (the CPU kernels' `layer`); a `LayerSpan` runs its layers only.

        With `last_only`, the last layer needs its keys and values (the cache)
        at every position but its attention output and MoE only at the last
        one: 1/L of the prompt's MoE work skipped, with equal logits and cache.
        """
        tree, lo, hi = params["layers"], 0, None
        if isinstance(tree, LayerSpan):
            tree, lo, hi = tree.layers, tree.lo, tree.hi
        hi = tree["attn_norm"].shape[0] if hi is None else hi
        routings = []
        for l in range(lo, hi):
            h, cache, routing = body(h, PerExpert.layer(tree, l), cache=cache, layer=l,
                                     last_only=last_only and l == hi - 1)
            routings.append(routing)
        routing = None if routings[0] is None else jax.tree.map(lambda *r: jnp.stack(r), *routings)
        return h, cache, routing

    @staticmethod
    def from_stacked(params):
        """Stacked params (deleted as they are converted) in this layout: `to_per_expert`."""
        return to_per_expert(params)

    @staticmethod
    def layer_span(params, lo: int, hi: int):
        """params running layers [lo, hi) only, for `model.apply(from_h=, to_h=)`: a static `LayerSpan` of
        the same buffers (with the whole cache, which they write in place at those layers)."""
        return {**params, "layers": LayerSpan(params["layers"], lo, hi)}


def of(params) -> type[Stacked] | type[PerExpert]:
    """The layout of a parameter tree."""
    tree = params["layers"]
    return PerExpert if isinstance(tree, LayerSpan) or "wqkv" in tree else Stacked


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


@functools.cache  # one jit per name: a fresh one per load would compile every time
def _to_hf_fn(name: str):
    """Jitted stacked -> per_expert orientation of one layer parameter: experts [L, E, in, out] ->
    [L, E, out, in]; wo [L, H, Dh, D] -> [L, D, H * Dh] (an int8 scale [L, H, Dh / 32, D] -> [L, D, H * Dh / 32]); None
    for a parameter kept as it is."""
    if name in EXPERT_PARAMS:  # a float weight, or a quantized one's {"qvalue", "scale"} (quant.py)
        return jax.jit(quant.transpose)
    if name == "wo":
        return jax.jit(lambda w: quant.transpose(jax.tree.map(lambda a: a.reshape(a.shape[0], -1, a.shape[-1]), w)))
    return None


@jax.jit
def _fuse_qkv(wq, wk, wv):
    """wq [L, D, H, Dh], wk / wv [L, D, K, Dh] -> [L, (H + 2K) * Dh, D] (quantized: qvalues alike, int8
    scales [L, D / 32, H, Dh] ... -> [L, (H + 2K) * Dh, D / 32])."""
    fuse = lambda *ws: quant.transpose(jnp.concatenate([w.reshape(*w.shape[:2], -1) for w in ws], axis=-1))
    return jax.tree.map(fuse, wq, wk, wv)


def to_per_expert(params: Params) -> Params:
    """Stacked -> per_expert layout, one parameter at a time (wq, wk, wv together: they are fused).

    Each stacked array is deleted once converted, so the peak is the model
    plus its largest parameter (an expert tensor, bigger than wq, wk and wv
    together), not two models.
    """
    stacked = dict(params["layers"])
    out, experts = {}, {}
    qkv = [stacked.pop(name) for name in ("wq", "wk", "wv")]
    out["wqkv"] = _fuse_qkv(*qkv)
    for a in jax.tree.leaves(qkv):
        a.delete()
    for name in list(stacked):
        w = stacked.pop(name)
        fn = _to_hf_fn(name)
        if fn is not None:
            converted = fn(w)
            for a in jax.tree.leaves(w):
                a.delete()
            w = converted
        (experts if name in EXPERT_PARAMS else out)[name] = w
    out["experts"] = experts
    lm_head = params["lm_head"]
    lm_head_t = jax.jit(quant.transpose)(lm_head)  # [V, D] (int8 scale [V, 1])
    for a in jax.tree.leaves(lm_head):
        a.delete()
    return {**{k: v for k, v in params.items() if k not in ("layers", "lm_head")},
            "layers": out, "lm_head": lm_head_t}


def stacked_global(params: Params, name: str):
    """Per_expert params: the non-layer parameter `name` in the stacked orientation (lm_head [D, V])."""
    return quant.transpose(params[name]) if name == "lm_head" else params[name]


def layer_slice(params: Params, cfg: MixtralConfig, name: str, l: int, e: int | None = None):
    """Per_expert params: layer l's (and expert e's) `name`, as that slice of the stacked array.

    Matrices are transposed back from HF's [out, in] orientation; wq, wk, wv
    are cut out of wqkv.
    """
    tree = params["layers"]
    if name in EXPERT_PARAMS:
        return jax.tree.map(lambda a: a[l, e].T, tree["experts"][name])
    d, dh, h, kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    # An int8 scale's input dimensions (D for wq, wk, wv; H and Dh for wo): size 1 per output channel, the
    # last one divided by the group size in groups.
    inputs = lambda a, *dims: (1,) * len(dims) if a.shape[-1] == 1 else (
        *dims[:-1], dims[-1] * a.shape[-1] // math.prod(dims))
    if name == "wo":
        return jax.tree.map(lambda a: a[l].T.reshape(*inputs(a, h, dh), d), tree["wo"])
    if name in ("wq", "wk", "wv"):
        start, heads = {"wq": (0, h), "wk": (h * dh, kv), "wv": ((h + kv) * dh, kv)}[name]
        return jax.tree.map(lambda a: a[l, start:start + heads * dh].T.reshape(*inputs(a, d), heads, dh),
                            tree["wqkv"])
    return jax.tree.map(lambda a: a[l], tree[name])
