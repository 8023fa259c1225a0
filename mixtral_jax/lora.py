"""LoRA adapters: rank-r updates W + A·B on the attention projections and on every expert's w1, w3, w2.

Each expert has its own adapter (A, B stacked [L, E, ...] like the experts),
so the experts stay as distinct after fine-tuning as they were. The base
weights are frozen (the experts may be held quantized, quant.py: each layer's
are dequantized inside the scan, then A·B added); the adapters are a
parameter tree of their own:

    layers/
      wq, wk, wv  a [L, D, R]      b [L, R, N, Dh]   (N: H or K heads)
      wo          a [L, H, Dh, R]  b [L, R, D]
      w1, w3      a [L, E, D, R]   b [L, E, R, F]
      w2          a [L, E, F, R]   b [L, E, R, D]

The update is A·B with no extra alpha/rank factor (B starts at zero, so the
adapted model starts equal to the base; the optimizer's step size sets how
fast it moves). In the forward pass each layer's update is added inside the
layer scan (`AddAdapters`), so one layer's merged weights exist at a time.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mixtral_jax import model as model_lib, quant, sharding
from mixtral_jax.config import MixtralConfig

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")

# One layer's update, per target: A [..., in, R] · B [..., R, out] → the weight's shape.
_DELTA = {"wq": "DR,RNH->DNH", "wk": "DR,RNH->DNH", "wv": "DR,RNH->DNH", "wo": "NHR,RD->NHD",
          "w1": "EDR,ERF->EDF", "w3": "EDR,ERF->EDF", "w2": "EFR,ERD->EFD"}


def lora_specs(cfg: MixtralConfig, rank: int) -> dict:
    """Shapes and logical axes of the adapters (model.ParamSpec; B's init "zeros"), as a tree like them."""
    d, f, l, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_local_experts
    h, kv, dh, r = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, rank
    spec = model_lib.ParamSpec

    def attn_in(heads, head_axis):
        return {"a": spec((l, d, r), ("layers", "embed", None)),
                "b": spec((l, r, heads, dh), ("layers", None, head_axis, "head_dim"), "zeros")}

    def expert(n_in, in_axis, n_out, out_axis):
        return {"a": spec((l, e, n_in, r), ("layers", "experts", in_axis, None)),
                "b": spec((l, e, r, n_out), ("layers", "experts", None, out_axis), "zeros")}

    return {"layers": {
        "wq": attn_in(h, "heads"), "wk": attn_in(kv, "kv_heads"), "wv": attn_in(kv, "kv_heads"),
        "wo": {"a": spec((l, h, dh, r), ("layers", "heads", "head_dim", None)),
               "b": spec((l, r, d), ("layers", None, "embed"), "zeros")},
        "w1": expert(d, "embed", f, "ffn"), "w3": expert(d, "embed", f, "ffn"), "w2": expert(f, "ffn", d, "embed"),
    }}


def lora_shardings(cfg: MixtralConfig, rank: int, mesh) -> dict:
    """NamedSharding of every adapter on `mesh`: sharded like the weight it adapts, the rank replicated."""
    return jax.tree.map(lambda s: sharding.named_sharding(mesh, s.axes, s.shape), lora_specs(cfg, rank),
                        is_leaf=lambda x: isinstance(x, model_lib.ParamSpec))


def init_lora(cfg: MixtralConfig, rank: int, seed: int = 0, dtype="float32", mesh=None) -> dict:
    """Adapters of rank `rank`: A normal with std 1/sqrt(fan-in), B zero (the adapted model equals the base).

    Args:
      cfg: the model's config.
      rank: R, at least 1.
      seed: PRNG seed for A.
      dtype: the adapters' dtype (float32 keeps small updates exact when the base is bfloat16).
      mesh: optional mesh; the adapters are created in `lora_shardings`.

    Returns:
      The adapter tree (module docstring).
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}.")
    return _jitted_init(cfg, rank, jnp.dtype(dtype), mesh)(jax.random.key(seed))


@functools.cache
def _jitted_init(cfg, rank, dtype, mesh):
    # One jit per (config, rank, dtype, mesh): a fresh jit per call would compile again for every seed.
    shardings = None if mesh is None else lora_shardings(cfg, rank, mesh)
    return jax.jit(functools.partial(_init, cfg, rank, dtype), out_shardings=shardings)


def _init(cfg, rank, dtype, key):
    specs = lora_specs(cfg, rank)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, model_lib.ParamSpec))
    keys = jax.random.split(key, len(leaves))
    out = [jnp.zeros(s.shape, dtype) if s.init == "zeros"
           else (jax.random.normal(k, s.shape, jnp.float32) / jnp.sqrt(_fan_in(s))).astype(dtype)
           for s, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, out)


def _fan_in(spec) -> int:
    """Inputs of an A matrix: D, F, or H·Dh for wo (every dimension between L (and E) and R)."""
    lead = 2 if spec.axes[1] == "experts" else 1
    n = 1
    for size in spec.shape[lead:-1]:
        n *= size
    return n


@dataclasses.dataclass(frozen=True)
class AddAdapters:
    """`model.apply`'s adapt_layer: one layer's weights plus its adapters' A·B (under `lp["lora"]`).

    A frozen dataclass, so jit sees equal instances as the same static argument.
    """

    def __call__(self, lp):
        out = {k: v for k, v in lp.items() if k != "lora"}
        for name, ab in lp["lora"].items():
            # A quantized weight (quant.py) becomes float here, one layer at a time, in the model's dtype (the
            # norms', never quantized): the layer would dequantize it to that dtype anyway.
            w = out[name]
            if quant.is_quantized(w):
                w = quant.dequantize(w, out["attn_norm"].dtype)
            # A·B in float32, added in the weight's dtype: no float32 copy of the (expert) weights.
            out[name] = w + jnp.einsum(_DELTA[name], ab["a"].astype(jnp.float32),
                                       ab["b"].astype(jnp.float32)).astype(w.dtype)
        return out


def with_adapters(params: dict, lora: dict) -> dict:
    """Stacked params with the adapters under layers/lora, the form `AddAdapters` reads inside the scan."""
    return {**params, "layers": {**params["layers"], "lora": lora["layers"]}}


@jax.jit
def _merge(params, lora):
    """Every layer's W + A·B at once, computed as `AddAdapters` does (so merged equals adapted)."""
    layers = dict(params["layers"])
    for name, ab in lora["layers"].items():
        spec = "L" + _DELTA[name].replace(",", ",L").replace("->", "->L")  # the same product, per layer
        delta = jnp.einsum(spec, ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32))
        w = layers[name]
        if quant.is_quantized(w):
            w = quant.dequantize(w, layers["attn_norm"].dtype)
        layers[name] = w + delta.astype(w.dtype)
    # Quantized weights without adapters (the lm_head) become float too: the result is a plain model.
    return jax.tree.map(lambda w: quant.dequantize(w, params["final_norm"].dtype) if quant.is_quantized(w) else w,
                        {**params, "layers": layers}, is_leaf=quant.is_quantized)


def merge_lora(model: model_lib.Mixtral, lora: dict) -> model_lib.Mixtral:
    """A plain model whose weights are the base plus the adapters' A·B (what `mj.save` writes).

    Args:
      model: the base `Mixtral` in the stacked layout (sharded or not).
      lora: adapters from `init_lora` (or trained), on the same mesh.

    Returns:
      A `Mixtral` with the merged weights, in the base's dtypes and shardings; over a
      quantized base, every quantized weight float in the model's dtype (dequantized, + A·B
      where adapted), which `mj.load(..., quantize=...)` of the saved checkpoint quantizes again.
    """
    if model.layout != "stacked":
        raise ValueError("merge_lora needs the stacked layout; load or create the base model with layout='stacked'.")
    merged = _merge(model.params(), lora)
    if model.mesh is not None:
        merged = jax.device_put(merged, model_lib.param_shardings(model.cfg, model.mesh))
    return model_lib.Mixtral(model.cfg, merged, model.mesh)
