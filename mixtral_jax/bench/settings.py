"""What a bench run measures: the model's shape, the token counts, and their checks."""

from __future__ import annotations

import dataclasses
from typing import Any

# The bench model: the shape flags' defaults, also what `python -m mixtral_jax.bench.serve --config bench` serves.
MODEL = dict(hidden_size=1024, intermediate_size=3584, num_layers=8, num_heads=16, num_kv_heads=4, num_experts=8,
             top_k=2, vocab_size=32000)
# --quick: every flag here that is not given explicitly takes this value.
QUICK = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8,
             top_k=2, vocab_size=512, prompt_len=32, decode_prompt_len=8, new_tokens=8, batch_sizes=["1", "4"],
             repeats=1)

# Host probe: x[1, D] @ W[D, N] with W larger than the L3 cache of the hosts we measure on (260 MiB),
# so it streams from DRAM.
BANDWIDTH_BYTES = 470_000_000
QUICK_BANDWIDTH_BYTES = 64_000_000
QUIET_WAIT_S = 20.0  # longest wait for a quiet machine before each timed measurement (not with --quick)
DENSE_MAX_NEW_TOKENS = 16  # computing all experts is slow; its rate needs few steps
MIN_DECODE_TOKENS = 8  # bounded decode runs still time at least 7 steps


class UsageError(Exception):
    """Bad input: printed as one sentence, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run measures, resolved from the flags (and --quick)."""

    hf_fields: dict[str, Any]
    prompt_len: int
    decode_prompt_len: int
    new_tokens: int
    batch_sizes: tuple[int, ...]
    repeats: int
    dtype: str
    seed: int
    bandwidth_bytes: int
    quiet_wait_s: float  # before each timed measurement, wait up to this long for other processes to go idle
    skip_transformers: bool
    checkpoint_dtype: str | None = None  # the HF checkpoint's dtype (None: `dtype`); both sides compute in `dtype`
    expert_dtype: str | None = None  # our experts' storage dtype (None: `dtype`), as load(expert_dtype=...)

    @property
    def stored_dtype(self) -> str:
        return self.checkpoint_dtype or self.dtype


def hf_config_fields(hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                     num_experts: int, top_k: int, vocab_size: int, max_positions: int) -> dict[str, Any]:
    """transformers.MixtralConfig fields of the benchmark model.

    Args:
      hidden_size ... vocab_size: the model's shape (the flags of the same names).
      max_positions: the longest sequence the bench runs (prompt + new tokens).

    Returns:
      Keyword arguments for `transformers.MixtralConfig`: HF's default
      initialisation, RoPE θ 1e6 as Mixtral, no sliding window, untied lm_head.
    """
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                num_local_experts=num_experts, num_experts_per_tok=top_k,
                max_position_embeddings=max(4096, max_positions), rope_theta=1e6, rms_norm_eps=1e-5,
                sliding_window=None, tie_word_embeddings=False)


def parse_batch_sizes(values) -> tuple[int, ...]:
    """Sorted distinct positive ints, 1 among them, from a list of strings: ["4", "1"] -> (1, 4)."""
    try:
        sizes = tuple(int(v) for v in values)
    except ValueError:
        raise UsageError(f"--batch_sizes {','.join(values)} is not a comma-separated list of integers.") from None
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch_sizes needs positive integers, got {','.join(values) or 'nothing'}.")
    if 1 not in sizes:
        raise UsageError("--batch_sizes must include 1: the roofline, the sparse gain and the token check use batch 1.")
    return tuple(sorted(set(sizes)))


def decode_new_tokens(batch: int, new_tokens: int) -> int:
    """New tokens per decode run at `batch`.

    Args:
      batch: decode batch size.
      new_tokens: new tokens at batch 1 (--new_tokens).

    Returns:
      new_tokens while batch × new tokens stays within 4 × new_tokens, fewer
      beyond (transformers at batch 64 is slow), but at least MIN_DECODE_TOKENS
      (or new_tokens, if smaller) so the rate spans several steps.
    """
    return max(min(new_tokens, MIN_DECODE_TOKENS), min(new_tokens, 4 * new_tokens // batch))


def resolve(values: dict[str, Any], *, quick: bool, dtype: str, seed: int, skip_transformers: bool,
            checkpoint_dtype: str | None, expert_dtype: str | None) -> Settings:
    """Checked Settings from the flag values (`values` holds the flags named in QUICK, --quick applied).

    Raises:
      UsageError: a value no run can use, in one sentence.
    """
    sizes = parse_batch_sizes(values["batch_sizes"])
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "num_experts",
                 "top_k", "vocab_size", "prompt_len", "decode_prompt_len", "repeats"):
        if values[name] < 1:
            raise UsageError(f"--{name} must be a positive integer, got {values[name]}.")
    if values["new_tokens"] < 2:
        raise UsageError(f"--new_tokens must be at least 2 (the decode rate needs one step after the first token), "
                         f"got {values['new_tokens']}.")
    if values["vocab_size"] <= 3:
        raise UsageError(f"--vocab_size must exceed 3 (ids 0-2 are special tokens), got {values['vocab_size']}.")
    fields = hf_config_fields(values["hidden_size"], values["intermediate_size"], values["num_layers"],
                              values["num_heads"], values["num_kv_heads"], values["num_experts"], values["top_k"],
                              values["vocab_size"],
                              max(values["prompt_len"] + 1, values["decode_prompt_len"] + values["new_tokens"]))
    stored = checkpoint_dtype or dtype
    if expert_dtype == "bfloat16" and stored == "float32":  # the only narrower pair of the two choices
        raise UsageError(f"--expert_dtype {expert_dtype} would round mixtral_jax's experts but not transformers' "
                         f"{stored} weights; pass --checkpoint_dtype {expert_dtype} so both read the same weights.")
    from mixtral_jax.config import from_hf_dict

    try:
        from_hf_dict(fields)  # an impossible shape (heads vs kv heads, top-k vs experts) fails here, in one sentence
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Settings(fields, values["prompt_len"], values["decode_prompt_len"], values["new_tokens"], sizes,
                    values["repeats"], dtype, seed, QUICK_BANDWIDTH_BYTES if quick else BANDWIDTH_BYTES,
                    0.0 if quick else QUIET_WAIT_S, skip_transformers, checkpoint_dtype, expert_dtype)
