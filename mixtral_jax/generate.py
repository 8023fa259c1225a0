"""Inference engine: KV cache, jitted prefill and decode step, sampling, generate().

Prompts of different lengths are LEFT-padded to a shared bucket length, so the
last prompt token of every row sits in the same slot and every decode step
writes one shared cache slot. Each row keeps its own positions (padding gets
position -1, which masks it out as a key), so padding is invisible: a row's
continuation equals what it gets alone.

Shapes are bucketed (batch and prompt length to powers of two, cache length
to a power of two ≥ prompt bucket + new tokens), so new prompt lengths and
batch sizes inside a bucket reuse the compiled prefill and decode.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import model as model_lib
from mixtral_jax import sharding
from mixtral_jax.config import MixtralConfig

MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling settings: temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}.")


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum, 1)
    return 1 << (n - 1).bit_length()


def init_cache(cfg: MixtralConfig, batch: int, max_len: int, dtype, mesh=None) -> dict[str, jax.Array]:
    """An empty KV cache, the same in either weight layout: k, v [L, B, K, S, Dh] in `dtype`; pos [B, S]
    int32, -1 = empty slot.

    With `mesh`, created directly in `sharding.cache_shardings` (never whole on one device).
    """
    shapes = sharding.cache_shapes(cfg, batch, max_len)
    make = lambda: {"k": jnp.zeros(shapes["k"], dtype), "v": jnp.zeros(shapes["v"], dtype),
                    "pos": jnp.full(shapes["pos"], -1, jnp.int32)}
    return make() if mesh is None else jax.jit(make, out_shardings=sharding.cache_shardings(cfg, batch, max_len,
                                                                                             mesh))()


def greedy_tokens(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis as int32 (the first largest value, or the first NaN), as two plain
    reductions: XLA:CPU runs argmax's reduction of (value, index) pairs element by element, 150 µs for
    32,000 logits against 18 µs for these (docs/benchmarks.md#greedy-tokens-in-two-reductions)."""
    top = jnp.max(logits, axis=-1, keepdims=True)  # NaN if a row has one, then equal to nothing
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where((logits == top) | jnp.isnan(logits), index, logits.shape[-1]), axis=-1)


def sample_logits(logits: jax.Array, keys: jax.Array, temperature=0.0, top_k=0, top_p=1.0) -> jax.Array:
    """Samples one token per row.

    Args:
      logits: float32 [B, V].
      keys: [B] PRNG keys.
      temperature, top_k, top_p: one setting for all rows (Python numbers: a disabled step is not traced)
        or one per row ([B] arrays, as the serving engine's slots have). Temperature 0 is greedy; top_k 0
        and top_p 1 disable those filters.

    Returns:
      int32 [B].
    """
    greedy = greedy_tokens(logits)
    fixed = lambda v, off: isinstance(v, (int, float)) and v == off  # a setting known, at trace time, to be off
    if fixed(temperature, 0.0):
        return greedy
    rows = lambda v, dtype: jnp.broadcast_to(jnp.asarray(v, dtype), logits.shape[:1])
    t, k, p = rows(temperature, jnp.float32), rows(top_k, jnp.int32), rows(top_p, jnp.float32)

    def filtered(x):
        desc = jnp.sort(x, axis=-1)[:, ::-1]
        if not fixed(top_k, 0):
            kth = jnp.take_along_axis(desc, jnp.clip(k - 1, 0, x.shape[-1] - 1)[:, None], axis=-1)
            drop = (k > 0)[:, None]
            x = jnp.where(drop & (x < kth), -jnp.inf, x)
            desc = jnp.where(drop & (desc < kth), -jnp.inf, desc)  # still sorted: the dropped are the smallest
        if not fixed(top_p, 1.0):
            # Keep the smallest set of most likely tokens whose probability reaches top_p.
            probs = jax.nn.softmax(desc, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs
            cutoff = jnp.min(jnp.where(before < p[:, None], desc, jnp.inf), axis=-1, keepdims=True)
            x = jnp.where((p < 1.0)[:, None] & (x < cutoff), -jnp.inf, x)
        return x

    def sampled():
        x = logits / jnp.where(t > 0, t, 1.0)[:, None]
        if not (fixed(top_k, 0) and fixed(top_p, 1.0)):
            # Per-row settings: the sort runs only in steps where some row filters.
            x = jax.lax.cond(jnp.any((k > 0) | (p < 1.0)), filtered, lambda x: x, x)
        return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)

    if isinstance(temperature, (int, float)):
        return sampled()
    # Per-row temperatures: the draw runs only in steps where some row samples.
    return jnp.where(t > 0, jax.lax.cond(jnp.any(t > 0), sampled, lambda: greedy), greedy)


def _row_keys(seed_key: jax.Array, step: int | jax.Array, batch: int) -> jax.Array:
    """One key per row and step: row r's randomness depends on (seed, r, step) only."""
    step_key = jax.random.fold_in(seed_key, step)
    return jax.vmap(lambda r: jax.random.fold_in(step_key, r))(jnp.arange(batch))


@functools.partial(jax.jit, static_argnames=("cfg", "strategy", "sampling", "mesh", "capacity_factor"),
                   donate_argnames=("cache",))
def prefill(params, tokens, positions, cache, seed_key, start=None, *, cfg: MixtralConfig, strategy: str,
            sampling: SamplingParams, mesh=None, capacity_factor=None):
    """Runs the prompt, or one chunk of it, through the model, filling cache slots [start, start + T).

    Args:
      params: parameter tree.
      tokens: int32 [B, T] left-padded prompts (or the chunk of them at `start`).
      positions: int32 [B, T] per-row positions, -1 on padding.
      cache: from `init_cache` (donated).
      seed_key: PRNG key for sampling.
      start: None for a whole prompt (slots [0, T): its queries read those slots only), or an int32
        scalar, the first slot of a chunk (its queries read every slot of the cache; one compile
        serves every chunk).
      mesh, capacity_factor: as in `model.apply`.

    Returns:
      (first new token int32 [B], last-position logits float32 [B, V], cache);
      the token and logits replicated on every device (readable by every process).
      Only a prompt's last chunk's token and logits mean anything.
    """
    index = 0 if start is None else start
    k_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions, index, axis=1)
    logits, (k, v) = model_lib.apply(params, tokens, positions, cfg=cfg, strategy=strategy,
                                     cache=(cache["k"], cache["v"]), cache_index=index, k_pos=k_pos, last_only=True,
                                     mesh=mesh, capacity_factor=capacity_factor)
    last = sharding.constrain(logits[:, -1], mesh, (None, None))
    nxt = sample_logits(last, _row_keys(seed_key, 0, tokens.shape[0]), sampling.temperature,
                       sampling.top_k, sampling.top_p)
    return nxt, last, {"k": k, "v": v, "pos": k_pos}


@functools.partial(jax.jit, static_argnames=("cfg", "strategy", "sampling", "mesh", "capacity_factor"),
                   donate_argnames=("cache",))
def decode_step(params, tokens, positions, index, cache, seed_key, step, *, cfg: MixtralConfig,
                strategy: str, sampling: SamplingParams, mesh=None, capacity_factor=None):
    """One token per row: writes cache slot `index`, returns the next token.

    Args:
      params: parameter tree.
      tokens: int32 [B] the previous token of each row.
      positions: int32 [B] its position.
      index: int32 scalar cache slot to write (shared by all rows).
      cache: the KV cache (donated).
      seed_key, step: sampling randomness.
      mesh, capacity_factor: as in `model.apply`.

    Returns:
      (next token int32 [B], logits float32 [B, V], cache); token and logits replicated.
    """
    k_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions[:, None], index, axis=1)
    logits, (k, v) = model_lib.apply(params, tokens[:, None], positions[:, None], cfg=cfg,
                                     strategy=strategy, cache=(cache["k"], cache["v"]),
                                     cache_index=index, k_pos=k_pos, mesh=mesh, capacity_factor=capacity_factor)
    last = sharding.constrain(logits[:, 0], mesh, (None, None))
    nxt = sample_logits(last, _row_keys(seed_key, step, tokens.shape[0]), sampling.temperature,
                       sampling.top_k, sampling.top_p)
    return nxt, last, {"k": k, "v": v, "pos": k_pos}


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists (encode text with load_tokenizer).")
    out = []
    for i, p in enumerate(prompts):
        ids = [int(t) for t in np.asarray(p).reshape(-1)]
        if not ids:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS).")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary [0, {vocab_size}).")
        out.append(ids)
    return out


def _prepare(prompts, cfg: MixtralConfig, max_new_tokens: int, prefill_chunk: int | None = None):
    """Validates and left-pads prompts into bucketed arrays (a whole number of chunks when chunked)."""
    prompts = _check_prompts(prompts, cfg.vocab_size)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 (or None: the whole prompt at once), got {prefill_chunk}.")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{cfg.max_position_embeddings} positions; shorten the prompt or ask for fewer tokens.")
    b, t = bucket(len(prompts)), bucket(longest, MIN_PROMPT_BUCKET)
    if prefill_chunk is not None and t > prefill_chunk:
        t = -(-t // prefill_chunk) * prefill_chunk
    tokens = np.zeros((b, t), np.int32)
    positions = np.full((b, t), -1, np.int32)
    positions[:, -1] = 0  # filler rows: one token at position 0, never read
    lengths = np.ones((b,), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, t - len(p):] = p
        positions[i, t - len(p):] = np.arange(len(p))
        lengths[i] = len(p)
    return prompts, tokens, positions, lengths


def decode_loop(model: model_lib.Mixtral, prompts, max_new_tokens: int, sampling: SamplingParams,
                seed: int = 0, strategy: str = "sparse", capacity_factor: float | None = None,
                prefill_chunk: int | None = None) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Prefill (in chunks of `prefill_chunk` tokens when the prompts are longer), then decode steps:
    yields (new tokens [B], their logits [B, V]) on device, per step.

    B is the batch bucket (rows past len(prompts) are filler). The caller stops
    iterating when it is done; nothing here syncs with the host. The cache and
    the computation live on `model.mesh` when the model has one.
    """
    cfg = model.cfg
    prompts, tokens, positions, lengths = _prepare(prompts, cfg, max_new_tokens, prefill_chunk)
    if max_new_tokens == 0:
        return
    b, t = tokens.shape
    params = model.params()
    seed_key = jax.random.key(seed)
    run = dict(cfg=cfg, strategy=strategy, sampling=sampling, mesh=model.mesh, capacity_factor=capacity_factor)
    cache = init_cache(cfg, b, bucket(t + max_new_tokens), model.dtype, model.mesh)
    if prefill_chunk is None or t <= prefill_chunk:
        nxt, logits, cache = prefill(params, jnp.asarray(tokens), jnp.asarray(positions), cache, seed_key, **run)
    else:  # bounded activations: a long prompt's chunks one after another, one compile for all
        for start in range(0, t, prefill_chunk):
            part = slice(start, start + prefill_chunk)
            nxt, logits, cache = prefill(params, jnp.asarray(tokens[:, part]), jnp.asarray(positions[:, part]),
                                         cache, seed_key, jnp.int32(start), **run)
    yield nxt, logits
    for step in range(1, max_new_tokens):
        # NumPy values, not jnp ones: the jitted call transfers them itself, where jnp.asarray and jnp.int32
        # each dispatch an operation of their own (together 0.3-0.4 ms of host time a step, on a core the
        # step's own work wants: docs/performance.md#a-decode-steps-host-time).
        nxt, logits, cache = decode_step(params, nxt, lengths + np.int32(step - 1), np.int32(t + step - 1),
                                         cache, seed_key, step, **run)
        yield nxt, logits


def generate_stream(model: model_lib.Mixtral, prompts, max_new_tokens: int = 64, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_tokens=None,
                    strategy: str = "sparse", capacity_factor: float | None = None,
                    prefill_chunk: int | None = None) -> Iterator[np.ndarray]:
    """Like `generate`, but yields each step's new tokens as they are produced.

    Yields:
      int [num_prompts] arrays, one per step: the new token of each row, or -1
      for a row that has already stopped. Ends when every row has stopped.
    """
    sampling = SamplingParams(float(temperature), int(top_k), float(top_p))
    stops = np.array(sorted({model.cfg.eos_token_id} if stop_tokens is None else set(stop_tokens)), np.int64)
    n = len(prompts) if isinstance(prompts, Sequence) else 0
    done = np.zeros((n,), bool)
    steps = decode_loop(model, prompts, max_new_tokens, sampling, seed, strategy, capacity_factor, prefill_chunk)
    pending = next(steps, None)
    while pending is not None:
        # Dispatch the next step before reading this one's tokens: the device never waits for
        # the host. If every row stops here, that one step was computed for nothing.
        following = next(steps, None)
        new = np.asarray(pending[0])[:n].astype(np.int64)
        out = np.where(done, -1, new)
        done |= np.isin(new, stops)
        yield out
        if done.all():
            return
        pending = following


def generate(model: model_lib.Mixtral, prompts, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, stop_tokens=None,
             strategy: str = "sparse", capacity_factor: float | None = None,
             prefill_chunk: int | None = None) -> list[list[int]]:
    """Generates continuations for a batch of prompts of any lengths.

    Args:
      model: a `Mixtral`.
      prompts: list of token-id lists (any lengths, each non-empty).
      max_new_tokens: tokens to generate per prompt at most.
      temperature: 0 is greedy; otherwise softmax temperature.
      top_p: nucleus sampling threshold (1 disables).
      top_k: keep only the k most likely tokens (0 disables).
      seed: sampling seed; row r's randomness depends on (seed, r, step) only.
      stop_tokens: ids that end a row (included in its output); default [EOS].
        Pass [] to never stop early.
      strategy: single-device MoE dispatch strategy.
      capacity_factor: expert-parallel capacity on a multi-device `model.mesh`
        (None: dropless).
      prefill_chunk: prefill prompts longer than this many tokens in chunks of it (the prefill's
        activations then stay those of one chunk; the prompt bucket becomes a whole number of
        chunks); None prefills the whole prompt at once.

    Returns:
      One list of new token ids per prompt.
    """
    outs = [[] for _ in prompts]
    for step_tokens in generate_stream(model, prompts, max_new_tokens, temperature, top_p, top_k, seed,
                                       stop_tokens, strategy, capacity_factor, prefill_chunk):
        for row, tok in enumerate(step_tokens):
            if tok >= 0:
                outs[row].append(int(tok))
    return outs
