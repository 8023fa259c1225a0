"""RMSNorm, rotary position embeddings and token embeddings (pure functions)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mixtral_jax import cpu_kernel, quant


# Products with [out, in] weights (the per_expert layout): up to this many rows
# they run feature-major, beyond it token-major, whichever XLA:CPU runs faster
# (docs/performance.md#feature-major-products-for-few-rows).
FEATURE_MAJOR_MAX_ROWS = 64


@dataclasses.dataclass(frozen=True)
class AtLayer:
    """Layer `layer` (a Python int) of a weight that stacks every layer's, [L, ...], float or quant.py's
    {"qvalue", "scale"} (the per_expert layout, layout.py): the CPU kernels read that layer where it lies;
    XLA ops take the slice (`one_layer`), which XLA:CPU copies."""

    stack: Any
    layer: int


jax.tree_util.register_dataclass(AtLayer, data_fields=["stack"], meta_fields=["layer"])


def one_layer(w):
    """An `AtLayer`'s layer as an array (or quantized dict) of its own; any other weight as it is."""
    return jax.tree.map(lambda a: a[w.layer], w.stack) if isinstance(w, AtLayer) else w


def linear_t(x: jax.Array, w, preferred_element_type=None) -> jax.Array:
    """x [N, I] times a weight in HF's [out, in] orientation, w [O, I] → [N, O].

    For up to FEATURE_MAJOR_MAX_ROWS rows it is computed feature-major (w @ xᵀ),
    where XLA:CPU streams the weight faster; for more rows (a prefill),
    token-major. The barrier keeps XLA from folding the final transpose back
    into the dot, which undoes the gain
    (docs/performance.md#feature-major-products-for-few-rows).

    One float32 row on the CPU (a batch-1 decode step: the attention
    projections and the lm_head) runs the C++ kernel's row-dot product
    (`cpu_kernel.linear_cpu`) where it is built; from 4 rows XLA is as fast
    (docs/performance.md#one-row-products-attention-and-lm_head); so does one
    layer of a weight that stacks every layer's (`AtLayer`) up to
    FEATURE_MAJOR_MAX_ROWS rows, which XLA would copy out first. An int8
    weight (quant.py) runs the kernel up to FEATURE_MAJOR_MAX_ROWS rows, where
    it reads a quarter of the bytes; beyond, and without the kernel, it is
    dequantized first (docs/benchmarks.md#quantized-weights).

    Args:
      x: [N, I] activations.
      w: [O, I] weight, or an int8 one {"qvalue" [O, I], "scale" [O, 1] or [O, I / 32]}; or an `AtLayer` of such weights.
      preferred_element_type: the products' accumulation / output dtype (None: x's).

    Returns:
      [N, O].
    """
    stack, layer = (w.stack, w.layer) if isinstance(w, AtLayer) else (w, None)
    quantized = quant.is_quantized(stack)
    # The kernel takes one row; up to FEATURE_MAJOR_MAX_ROWS where XLA would read 4x the bytes (int8) or copy
    # the layer's slice first (AtLayer).
    kernel_rows = FEATURE_MAJOR_MAX_ROWS if quantized or layer is not None else 1
    if x.shape[0] <= kernel_rows and preferred_element_type in (None, jnp.float32) \
            and cpu_kernel.usable(x, *(() if quantized else (stack,))):
        return cpu_kernel.linear_cpu(x, stack, layer=layer)
    w = one_layer(w)
    if quantized:
        w = quant.dequantize(w, x.dtype, axis=-1)
    if x.shape[0] > FEATURE_MAJOR_MAX_ROWS:
        return jnp.einsum("NI,OI->NO", x, w, preferred_element_type=preferred_element_type)
    out_t = jnp.einsum("OI,IN->ON", w, x.T, preferred_element_type=preferred_element_type)
    return jax.lax.optimization_barrier(out_t).T


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back to x's dtype, then scaled (as HF does).

    Args:
      x: [..., D] activations.
      weight: [D] scale.
      eps: variance epsilon.

    Returns:
      [..., D] in x's dtype (promoted with weight's dtype).
    """
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies [Dh/2] in float32: 1 / theta^(2i/Dh)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for positions [B, T] -> ([B, T, Dh], [B, T, Dh]) in `dtype`."""
    freqs = positions.astype(jnp.float32)[..., None] * rope_inv_freq(head_dim, theta)  # [B, T, Dh/2]
    # [cos | sin] of the Dh/2 frequencies, each copied to both halves of Dh by a product
    # with [I I]: exact (each output is one table value times 1, HIGHEST precision), and
    # XLA:CPU does not fuse the product into its consumers, whereas plain elementwise ops
    # got fused into every layer's q and k rotation and evaluated per head
    # (docs/performance.md#rope-tables-computed-once).
    half = head_dim // 2
    dup = jnp.concatenate([jnp.eye(half, dtype=jnp.float32)] * 2, axis=1)  # [Dh/2, Dh]
    tables = jnp.einsum("BTCF,FD->BTCD", jnp.stack([jnp.cos(freqs), jnp.sin(freqs)], axis=2), dup,
                        precision=jax.lax.Precision.HIGHEST)  # [B, T, 2, Dh]
    return tables[:, :, 0].astype(dtype), tables[:, :, 1].astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the HF layout). x [B, T, N, Dh]; cos, sin [B, T, Dh]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def embed(tokens: jax.Array, table, dtype=None) -> jax.Array:
    """Token ids [B, T] -> embeddings [B, T, D] in `dtype` (default: the table's) from table [V, D], float
    or int8 with scales [V, D / group] (quant.py): only the rows looked up are dequantized."""
    if quant.is_quantized(table):
        rows = {k: jnp.take(a, tokens, axis=0) for k, a in table.items()}
        return quant.dequantize(rows, dtype or jnp.float32)
    return jnp.take(table, tokens, axis=0).astype(dtype or table.dtype)
