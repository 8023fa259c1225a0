"""Grouped-query attention with RoPE, optional sliding window, and the KV-cache update."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixtral_jax import cpu_kernel, layers
from mixtral_jax.layout import Stacked

# Prefill splits the queries into chunks of this many tokens; chunk i attends
# only to the slots up to its own end (causal), which skips about half of the
# score matrix and keeps each chunk's scores in cache.
QUERY_CHUNK = 128

# A finite mask value: a row with every key masked (a padding query) yields a
# uniform average instead of NaN, and its output is never used.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None, q_seg: jax.Array | None = None,
                   k_seg: jax.Array | None = None) -> jax.Array:
    """Boolean mask [B, T, S]: key visible to query.

    Args:
      q_pos: [B, T] query positions.
      k_pos: [B, S] key positions; negative marks an empty or padded slot.
      sliding_window: if set, a query sees keys with q_pos - k_pos < window (HF semantics).
      q_seg, k_seg: optional [B, T], [B, S] segment ids of packed sequences: a query sees only keys
        of its own segment (positions restart in each, so position order is slot order within one).
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    mask = (k <= q) & (k >= 0)
    if sliding_window is not None:
        mask &= (q - k) < sliding_window
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask


def gqa(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled dot-product attention with grouped kv heads; softmax in float32.

    Args:
      q: [B, T, H, Dh]; k, v: [B, K, S, Dh] with H a multiple of K.
      mask: [B, T, S] boolean.

    Returns:
      [B, T, H, Dh] in q's dtype.
    """
    b, t, h, dh = q.shape
    kv, g = k.shape[1], h // k.shape[1]
    # Query heads of a group next to each other, (B, K) leading: plain batched matmuls, which
    # XLA:CPU runs faster than an einsum with G and T apart (docs/performance.md#attention-as-batched-matmuls).
    qg = q.reshape(b, t, kv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, dh)  # [B, K, G*T, Dh]
    scores = jnp.einsum("BKQH,BKSH->BKQS", qg, k, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, g, t, -1) * (dh ** -0.5)  # [B, K, G, T, S]
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * t, -1)
    out = jnp.einsum("BKQS,BKSH->BKQH", probs, v)  # [B, K, G*T, Dh]
    return out.reshape(b, kv, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def attend(q, k, v, q_pos, k_pos, sliding_window, prefix: bool, segments=None):
    """gqa with its mask; with `prefix` (query t sits at slot t), causal query chunks.

    Args:
      q: [B, T, H, Dh]; k, v: [B, K, S, Dh]; q_pos [B, T]; k_pos [B, S].
      prefix: the queries occupy slots [0, T) of k / v, so chunk [a, b) needs slots [0, b) only.
      segments: optional [B, T] segment ids of packed sequences (needs `prefix` and S == T).
    """
    t = q.shape[1]
    if not prefix:
        return gqa(q, k, v, attention_mask(q_pos, k_pos, sliding_window))
    outs = []
    for start in range(0, t, QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, t)
        seg = (None, None) if segments is None else (segments[:, start:end], segments[:, :end])
        mask = attention_mask(q_pos[:, start:end], k_pos[:, :end], sliding_window, *seg)
        outs.append(gqa(q[:, start:end], k[:, :, :end], v[:, :, :end], mask))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _static(layer) -> bool:
    """Whether a cache's layer is known when tracing (None: the cache is one layer's): the CPU kernels'
    attribute. The layer scan's index is traced."""
    return layer is None or isinstance(layer, int)


def write_cache(c: jax.Array, new: jax.Array, index, layer=None, rows=None) -> jax.Array:
    """Writes new [B, K, T, Dh] into c [B, K, S, Dh] (or layer `layer` of c [L, B, K, S, Dh]) at slots
    [index, index + T).

    `index` is a scalar (every row at the same slot, as generate's left-padded batch) or int [B], each
    row at its own slot (the serving engine's rows hold requests that started at different times).
    With `rows` (int [P], new [P, K, T, Dh]), new's row r goes to c's row rows[r] instead: the serving
    engine's few decoding slots write their keys into the whole cache, which is never copied.
    A Python int `layer` (the per_expert layout's unrolled layers) lets the CPU kernel write it in place.
    """
    new = new.astype(c.dtype)
    at = jnp.broadcast_to(jnp.asarray(index, jnp.int32).reshape(-1), new.shape[:1])  # each row's first slot
    if _static(layer) and cpu_kernel.usable(c):  # in place, one buffer for the write and the reads after it
        return cpu_kernel.write_cache_cpu(c, new, at, rows, layer)
    zero = jnp.zeros((), jnp.int32)
    if rows is not None:  # P is static and small: one slice update per row, each in place
        for r in range(rows.shape[0]):
            start = (rows[r], zero, at[r], zero) if layer is None else (layer, rows[r], zero, at[r], zero)
            c = jax.lax.dynamic_update_slice(c, new[r:r + 1] if layer is None else new[None, r:r + 1], start)
        return c
    if jnp.ndim(index) == 1 and index.shape[0] == 1:  # one row: the plain slice update (the vmapped one is slower)
        index = index[0]
    if jnp.ndim(index) == 0:
        index = jnp.asarray(index, jnp.int32)
        at = (zero, zero, index, zero) if layer is None else (layer, zero, zero, index, zero)
        return jax.lax.dynamic_update_slice(c, new if layer is None else new[None], at)
    if layer is None:
        return jax.vmap(lambda c1, n1, i: jax.lax.dynamic_update_slice(c1, n1, (zero, i, zero)))(c, new, index)
    return jax.vmap(lambda c1, n1, i: jax.lax.dynamic_update_slice(c1, n1[None], (layer, zero, i, zero)),
                    in_axes=(1, 0, 0), out_axes=1)(c, new, index)


def self_attention(x, p, positions, k_pos, cos, sin, *, sliding_window, cache=None, cache_index=None, layer=None,
                   cache_rows=None, last_query=False, layout=Stacked, segments=None, mesh=None):
    """One attention block (no residual) on normalised input.

    Args:
      x: [B, T, D] normalised hidden states.
      p: this layer's weights in `layout` (layout.py), which does the projections.
      positions: [B, T] absolute positions of x's tokens.
      k_pos: [B, S] positions of the keys attended to (the cache's slots after
        this update, or `positions` without a cache); negative marks empty slots.
      cos, sin: RoPE tables [B, T, Dh].
      sliding_window: None or the window size.
      cache: optional (k, v), each [B, K, S, Dh], or each [L, B, K, S, Dh]
        when `layer` is given; x's keys and values are written at slots
        [cache_index, cache_index + T) (of `layer`), in place.
      cache_index: int slot where x's first token goes: a scalar, or [B], one per row.
      layer: layer index into a stacked cache (a Python int: the per_expert layout's, written and read
        in place by the CPU kernels; traced: the layer scan's), or None.
      cache_rows: optional int [B]: x's row b uses the cache's row cache_rows[b] (the cache may hold
        more rows than x: the serving engine's slots); None: row b.
      last_query: keys and values for all T positions (and the cache), but
        the output for the last position only: out [B, 1, D].
      layout: the weights' layout (layout.Stacked or layout.PerExpert).
      segments: optional [B, T] segment ids of packed sequences (training: no cache, all queries);
        a token attends only within its segment.
      mesh: the mesh the weights are sharded over, or None (the layout's projections may need it).

    Returns:
      (out [B, T, D], updated (k, v) or None).
    """
    if segments is not None and (cache is not None or last_query):
        raise ValueError("segments (packed sequences) apply to a full forward pass without a cache.")
    b, t, d = x.shape
    q, k, v = layout.qkv(x, p, cos.shape[-1], mesh)  # [B, T, H, Dh], [B, T, K, Dh], [B, T, K, Dh]
    q = layers.apply_rope(q, cos, sin)
    k = layers.apply_rope(k, cos, sin)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, Dh]: the cache's order
    if cache is None:
        new_cache = None
    else:
        ck, cv = (write_cache(c, new, cache_index, layer, cache_rows) for c, new in ((cache[0], k), (cache[1], v)))
        new_cache = (ck, cv)
        if t == 1 and _static(layer) and cpu_kernel.usable(q, ck):  # a decode step: the admitted slots only
            rows = jnp.arange(b, dtype=jnp.int32) if cache_rows is None else cache_rows
            out = cpu_kernel.attend_cpu(q[:, 0], ck, cv, rows, positions[:, 0], k_pos, sliding_window, layer)
            return layout.out(out.reshape(b, 1, -1), p, mesh), new_cache
        if cache_rows is None:
            k, v = (ck, cv) if layer is None else (ck[layer], cv[layer])
        else:  # the rows' keys and values gathered for the attention: a copy of P rows, read only
            k, v = (c[cache_rows] if layer is None else c[layer, cache_rows] for c in (ck, cv))
    # The prompt's own slots start at 0 when there is no cache or a prefill writes from slot 0:
    # then query i never sees a slot past i, and later slots (empty) need not be read at all.
    prefix = cache is None or (isinstance(cache_index, int) and cache_index == 0)
    if last_query:
        if prefix:  # the last query sees the prompt's own slots [0, T) at most
            k, v, k_pos = k[:, :, :t], v[:, :, :t], k_pos[:, :t]
        q, positions, t = q[:, -1:], positions[:, -1:], 1
        out = gqa(q, k.astype(q.dtype), v.astype(q.dtype), attention_mask(positions, k_pos, sliding_window))
    else:
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), positions, k_pos, sliding_window, prefix, segments)
    return layout.out(out.reshape(b, t, -1), p, mesh), new_cache
