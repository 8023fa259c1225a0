"""The serving engine's jitted steps over its slots: prefill one chunk of each of some slots, decode every slot or
some of them, and per-row sampling keys (engine.py schedules them).

Every row of the KV cache is one slot; a slot's position p sits at cache index
p + offset (the offset makes a prompt's chunks whole, see `Engine`). Tokens come
out replicated, so every process of a multi-process run can read them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixtral_jax import model as model_lib
from mixtral_jax import sharding
from mixtral_jax.generate import sample_logits


def _batch_axis(a: jax.Array) -> int:
    """The slot axis: of the cache's keys and values [(L,) B, K, S, Dh], its positions [B, S], tokens [B]."""
    return max(a.ndim - 4, 0)


# A call's P rows are read and written one slice each on one device (P is static and small): a slice update is
# done in place, where a scatter may copy the whole cache. On a mesh the slot axis is sharded, and a slice at a
# traced index makes XLA all-gather the whole array (docs/serving.md#on-a-mesh-and-on-several-hosts): there each
# device masks its own shard instead, so only the P rows travel. (The KV cache on one device takes neither:
# `_on_slots` writes its new keys in place.)
def _rows(a: jax.Array, slot: jax.Array, mesh=None) -> jax.Array:
    """Slots `slot` [P] of `a` along its slot axis."""
    axis = _batch_axis(a)
    if mesh is None:
        return jnp.concatenate([jax.lax.dynamic_slice_in_dim(a, slot[r], 1, axis=axis)
                                for r in range(slot.shape[0])], axis=axis)
    mask = lambda r: jnp.expand_dims(jnp.arange(a.shape[axis]) == slot[r], tuple(range(1, a.ndim - axis)))
    return jnp.concatenate([jnp.sum(jnp.where(mask(r), a, jnp.zeros((), a.dtype)), axis=axis, keepdims=True)
                            for r in range(slot.shape[0])], axis=axis)


def _put(a: jax.Array, new: jax.Array, slot: jax.Array, mesh=None) -> jax.Array:
    """`a` with its slots `slot` [P] replaced by the P rows of `new` (rows for the same slot hold the same values)."""
    axis = _batch_axis(a)
    if mesh is None:
        for r in range(slot.shape[0]):
            a = jax.lax.dynamic_update_slice_in_dim(a, jax.lax.slice_in_dim(new, r, r + 1, axis=axis), slot[r], axis)
        return a
    writer = jnp.full((a.shape[axis],), -1, jnp.int32).at[slot].set(jnp.arange(slot.shape[0], dtype=jnp.int32))
    taken = jnp.take(new, jnp.maximum(writer, 0), axis=axis)  # [..., B, ...]: each slot's row of `new`
    mask = jnp.expand_dims(writer >= 0, tuple(range(1, a.ndim - axis)))
    return jnp.where(mask, taken, a)


@functools.partial(jax.jit, static_argnames=("cfg", "strategy", "mesh"), donate_argnames=("cache",))
def prefill_chunk(params, tokens, start, offset, slot, cache, last_tokens, key_data, temperature, top_k, top_p,
                  *, cfg, strategy, mesh):
    """Prefills one chunk of each of P slots: row r's tokens [L] at cache indices [start[r], start[r] + L) of
    slot slot[r], position = index - offset[r] (negative: the padding in front of a prompt's first chunk).

    A row may repeat another row exactly (the engine pads P that way): both compute and write the same values.

    Args:
      tokens: int32 [P, L]; start, offset, slot: int32 [P]; key_data: uint32 [P, 2];
      temperature, top_k, top_p: [P], as in `sample_rows`.

    Returns (the token sampled after each row's last token, int32 [P], last_tokens [B] with it in rows `slot`,
    cache); a row's token only means something for a prompt's last chunk.
    """
    p, c = tokens.shape
    q = start[:, None] - offset[:, None] + jnp.arange(c, dtype=jnp.int32)
    # A request's first chunk (its first token at position <= 0) clears the slot's positions: the previous
    # request's keys go invisible.
    return _on_slots(params, tokens, jnp.where(q >= 0, q, -1), start, q[:, 0] <= 0, slot, cache, last_tokens,
                     key_data, jnp.zeros((p,), jnp.int32), temperature, top_k, top_p, cfg=cfg, strategy=strategy,
                     mesh=mesh)


def _on_slots(params, tokens, positions, index, clear, slot, cache, last_tokens, key_data, step, temperature, top_k,
              top_p, *, cfg, strategy, mesh, first=True, last=True):
    """The model on P slots' own cache rows: row r's tokens [L] at positions [L] from cache index index[r] of
    slot slot[r] (its positions first cleared where `clear`), then a token sampled after each row's last one.
    Some of the layers only, unless `first` and `last` (see `decode`): `tokens` is then the residual stream
    from the previous part, or the part returns it.

    Returns (those tokens [P], or the residual stream [P, L, D] unless `last`; last_tokens [B] with the tokens in
    rows `slot`; cache)."""
    rows = lambda a: _rows(a, slot, mesh)
    put = lambda a, new: _put(a, new, slot, mesh)
    pos_rows = rows(cache["pos"])
    if first:  # the first part writes the new positions; the later parts see them
        pos_rows = jnp.where(clear[:, None], -1, pos_rows)
        pos_rows = jax.vmap(lambda row, pos, i: jax.lax.dynamic_update_slice(row, pos, (i,)))(pos_rows, positions,
                                                                                             index)
    # One device: the rows' new keys go straight into the whole cache (attention.write_cache's `rows`), where
    # the CPU's attention kernel reads them (XLA's attention reads a copy of the P rows). On a mesh: the masked
    # rows, written back whole.
    kv = (cache["k"], cache["v"]) if mesh is None else jax.tree.map(rows, (cache["k"], cache["v"]))
    out, (k, v) = model_lib.apply(params, tokens, positions, cfg=cfg, strategy=strategy, cache=kv,
                                  cache_index=index, cache_rows=slot if mesh is None else None, k_pos=pos_rows,
                                  last_only=True, mesh=mesh, from_h=not first, to_h=not last)
    if mesh is not None:
        k, v = jax.tree.map(put, cache["k"], k), jax.tree.map(put, cache["v"], v)
    cache = {"k": k, "v": v, "pos": put(cache["pos"], pos_rows) if first else cache["pos"]}
    if not last:
        return out, last_tokens, cache
    logits = sharding.constrain(out[:, -1], mesh, (None, None))  # replicated: every process may read the tokens
    nxt = sample_rows(logits, key_data, step, temperature, top_k, top_p)
    last_tokens = sharding.constrain(put(last_tokens, nxt), mesh, (None,))
    return sharding.constrain(nxt, mesh, (None,)), last_tokens, cache


# A decode step may run as several calls, each over some of the layers (`first`: from the tokens, `last`: to
# the sampled tokens, the others passing on the residual stream `h`): between them the engine can prefill a
# prompt that arrived, into another slot (engine.py). `params` then runs those layers only (a
# `layout.LayerSpan`), writing their part of the whole cache in place.
_STEP_STATIC = ("cfg", "strategy", "mesh", "first", "last")


@functools.partial(jax.jit, static_argnames=_STEP_STATIC, donate_argnames=("cache",))
def decode(params, tokens, h, positions, offsets, cache, key_data, step, temperature, top_k, top_p, *, cfg, strategy,
           mesh, idle_index, first=True, last=True):
    """One token for every slot: row r writes cache index positions[r] + offsets[r]; an idle row
    (position -1) writes the spare index `idle_index` with position -1, which no query ever sees.

    Args:
      tokens: int32 [B], each slot's last token (the first part reads them; the last part keeps an idle
        row's, so pass them as they are when it runs).
      h: the residual stream [B, 1, D] the previous part returned (None in the first part).

    Returns (next token int32 [B] (an idle row's `tokens` entry), or the residual stream unless `last`; cache).
    """
    b = tokens.shape[0]
    index = jnp.where(positions >= 0, positions + offsets, idle_index)
    k_pos = cache["pos"].at[jnp.arange(b), index].set(positions) if first else cache["pos"]
    out, (k, v) = model_lib.apply(params, tokens[:, None] if first else h, positions[:, None], cfg=cfg,
                                  strategy=strategy, cache=(cache["k"], cache["v"]), cache_index=index, k_pos=k_pos,
                                  mesh=mesh, from_h=not first, to_h=not last)
    cache = {"k": k, "v": v, "pos": k_pos}
    if not last:
        return out, cache
    nxt = sample_rows(sharding.constrain(out[:, 0], mesh, (None, None)), key_data, step, temperature, top_k, top_p)
    # An idle row keeps its token: a prompt prefilled just before this step starts decoding from it.
    return sharding.constrain(jnp.where(positions >= 0, nxt, tokens), mesh, (None,)), cache


@functools.partial(jax.jit, static_argnames=_STEP_STATIC, donate_argnames=("cache",))
def decode_rows(params, last_tokens, h, slot, positions, offsets, cache, key_data, step, temperature, top_k, top_p, *,
                cfg, strategy, mesh, first=True, last=True):
    """One token for each of P slots only (`decode` computes every slot): row r decodes slot slot[r] from its
    token in `last_tokens`, at position positions[r] and cache index positions[r] + offsets[r]. With few
    slots decoding, a step then computes those rows, not all `max_batch`. A row may repeat another exactly.

    Args:
      slot, positions, offsets, step: int32 [P]; key_data: uint32 [P, 2]; temperature, top_k, top_p: [P].
      h: as in `decode`, [P, 1, D].

    Returns (last_tokens [B] with the P new tokens in rows `slot`, or the residual stream unless `last`; cache).
    """
    out, last_tokens, cache = _on_slots(
        params, last_tokens[slot][:, None] if first else h, positions[:, None], positions + offsets,
        jnp.zeros(slot.shape, bool), slot, cache, last_tokens, key_data, step, temperature, top_k, top_p, cfg=cfg,
        strategy=strategy, mesh=mesh, first=first, last=last)
    return (last_tokens if last else out), cache


def sample_rows(logits, key_data, step, temperature, top_k, top_p):
    """Samples one token per row with per-row settings, drawing row r's token as `mj.generate` draws row 0's.

    Args:
      logits: float32 [B, V].
      key_data: uint32 [B, 2], each row's `jax.random.key(seed)` data.
      step: int32 [B] the index of the token being drawn (0 for the first).
      temperature, top_k, top_p: [B], as in `generate.sample_logits`.

    Returns:
      int32 [B].
    """
    # generate keys row r of a batch fold_in(fold_in(key, step), r); a request alone is row 0.
    keys = jax.vmap(lambda kd, s: jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(kd), s), 0))(
        key_data, step)
    return sample_logits(logits, keys, temperature, top_k, top_p)
