"""The bench's arithmetic: bytes per token, useful FLOPs, experts touched, token agreement (pure, unit-tested)."""

from __future__ import annotations

import statistics

import numpy as np

import mixtral_jax as mj


def active_bytes_per_token(cfg, dtype, expert_dtype=None) -> int:
    """Weight bytes one decode token reads: the active parameters minus the embedding table.

    The embedding is a gather of one row per token; every other active weight
    (attention, router, the top-k experts, norms, the whole lm_head) is read in full.

    Args:
      cfg: a `MixtralConfig`.
      dtype: the parameters' dtype ("float32").
      expert_dtype: the experts' dtype, if not `dtype` ("bfloat16" with load(expert_dtype=...)).

    Returns:
      Bytes per token at batch 1.
    """
    embed = cfg.vocab_size * cfg.hidden_size * np.dtype(dtype).itemsize
    return mj.param_bytes(cfg, dtype, expert_dtype)["active"] - embed


def prefill_useful_flops(cfg, tokens: int) -> int:
    """FLOPs a prefill of `tokens` (batch 1) must do to produce the next token.

    2 × active weights per token for every layer weight (embedding excluded),
    and causal attention: scores and values, 2 × 2 × H × Dh per (query,
    visible key) pair. Only the last token's logits are needed, so the lm_head
    runs for it alone, and so does the last layer, except for its attention
    norm and key/value projections (the cache needs every position's keys and
    values).

    Args:
      cfg: a `MixtralConfig`.
      tokens: prompt length.

    Returns:
      The FLOP count.
    """
    lm_head = cfg.vocab_size * cfg.hidden_size
    layers = cfg.num_hidden_layers
    final_norm = cfg.hidden_size
    per_layer = (mj.param_count(cfg)["active"] - cfg.vocab_size * cfg.hidden_size - lm_head - final_norm) // layers
    kv = cfg.hidden_size + 2 * cfg.hidden_size * cfg.num_key_value_heads * cfg.head_dim  # norm + wk, wv
    visible = [t + 1 if cfg.sliding_window is None else min(t + 1, cfg.sliding_window) for t in range(tokens)]
    pair_flops = 4 * cfg.num_attention_heads * cfg.head_dim
    weights = (2 * per_layer * tokens * (layers - 1) + 2 * kv * tokens + 2 * (per_layer - kv)
               + 2 * final_norm + 2 * lm_head)
    return weights + pair_flops * (sum(visible) * (layers - 1) + visible[-1])


def experts_touched(experts, start: int, steps: int) -> float:
    """Mean number of distinct experts a decode step's tokens choose, over layers and steps.

    Args:
      experts: int [L, B, T, k] router choices (from `mj.expert_routing`) of the decoded sequences.
      start: position of the first decode step's input token (the prompt length).
      steps: decode steps (new tokens - 1: the last new token is never fed back).

    Returns:
      The mean over the L × steps (layer, step) pairs of the number of distinct
      ids among that step's B × k choices.
    """
    chosen = np.asarray(experts)[:, :, start:start + steps, :]  # [L, B, S, k]
    num_layers, batch, num_steps, k = chosen.shape
    per_step = chosen.transpose(0, 2, 1, 3).reshape(num_layers * num_steps, batch * k)
    return float(np.mean([len(np.unique(row)) for row in per_step]))


def tokens_agree(ours, theirs, eos: int) -> tuple[bool, int]:
    """Whether greedy tokens agree, compared up to each row's first EOS in ours.

    transformers' `min_new_tokens` masks EOS until the end, which changes its
    argmax only at a step where EOS wins; ours (stop_tokens=[]) keeps EOS. So the
    rows are compared up to (excluding) our first EOS.

    Args:
      ours, theirs: int [B, N] new tokens.
      eos: the EOS id.

    Returns:
      (all compared tokens equal, number of tokens compared).
    """
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    equal, compared = True, 0
    for row_ours, row_theirs in zip(ours, theirs):
        stop = int(np.argmax(row_ours == eos)) if (row_ours == eos).any() else len(row_ours)
        equal &= bool((row_ours[:stop] == row_theirs[:stop]).all())
        compared += stop
    return equal, compared


def median(values):
    """The median of a list, None for an empty one."""
    return statistics.median(values) if values else None


def ratio(a, b):
    """a / b, None when either is missing or b is 0."""
    return a / b if a is not None and b else None
