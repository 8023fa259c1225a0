"""RMSNorm, rotary position embeddings and token embeddings (pure functions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, Dh]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (the HF layout). x [B, T, N, Dh]; cos, sin [B, T, Dh]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def embed(tokens: jax.Array, table: jax.Array) -> jax.Array:
    """Token ids [B, T] -> embeddings [B, T, D] from table [V, D]."""
    return jnp.take(table, tokens, axis=0)
