"""Fine-tuning data: JSONL examples → token ids with a loss mask → packed rows → batches in a seeded order.

Each line of the file is one example, either a chat
{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
(loss on the assistant turns only, `Tokenizer.encode_chat_for_training`) or
{"text": ...} (loss on every token after BOS, the text closed by EOS).
"""

from __future__ import annotations

import json
import os

import numpy as np


class DataError(ValueError):
    """Bad training data, described in one sentence that names the file and line."""


def load_jsonl(path: str | os.PathLike, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Reads and tokenizes every example of a JSONL file.

    Args:
      path: the file.
      tokenizer: a `Tokenizer`.

    Returns:
      A list of (ids, mask) per example; mask 1 where the token is a target.

    Raises:
      DataError: an unreadable or empty file, a line that is not JSON, not an
        example, or a chat the format rejects (the message names the line).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}.") from None
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON ({e.msg} at column {e.colno}).") from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str) and "messages" not in obj:
            if not obj["text"]:
                raise DataError(f"{where} has an empty \"text\"; remove the line or give it text.")
            ids = tokenizer.encode(obj["text"], bos=True) + [tokenizer.eos_id]
            examples.append((ids, [0] + [1] * (len(ids) - 1)))
        elif isinstance(obj, dict) and "messages" in obj and "text" not in obj:
            try:
                examples.append(tokenizer.encode_chat_for_training(obj["messages"]))
            except ValueError as e:
                raise DataError(f"{where}: {e}") from None
        else:
            raise DataError(f"{where} must be a JSON object with either \"messages\" (a chat) or \"text\" "
                            "(a string).")
    if not examples:
        raise DataError(f"{path} has no examples; give one JSON object per line.")
    return examples


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int) -> dict[str, np.ndarray]:
    """Packs examples back to back into rows of `seq_len` tokens, with segment ids.

    An example that does not fit the rest of a row continues in the next as a
    new segment. Attention never crosses a segment, so a segment's first token
    has no context and is never a target (`loss.loss_and_metrics` also
    enforces it). The last row is padded (segment 0).

    Args:
      examples: (ids, mask) pairs from `load_jsonl`.
      seq_len: T, at least 2.

    Returns:
      {"tokens", "loss_mask", "segment_ids"}: int32 [N, T] each; segments numbered from 1 in each row.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}.")
    ids = np.concatenate([np.asarray(i, np.int32) for i, _ in examples])
    mask = np.concatenate([np.asarray(m, np.int32) for _, m in examples])
    example = np.repeat(np.arange(len(examples)), [len(i) for i, _ in examples])
    rows = -(-len(ids) // seq_len)
    pad = rows * seq_len - len(ids)
    tokens = np.pad(ids, (0, pad)).reshape(rows, seq_len)
    loss_mask = np.pad(mask, (0, pad)).reshape(rows, seq_len)
    example = np.pad(example, (0, pad), constant_values=-1).reshape(rows, seq_len)
    starts = np.ones_like(example, bool)
    starts[:, 1:] = example[:, 1:] != example[:, :-1]
    segments = np.where(example >= 0, np.cumsum(starts, axis=1), 0).astype(np.int32)
    loss_mask = np.where(starts, 0, loss_mask).astype(np.int32)
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": segments}


def batch_at(rows: dict[str, np.ndarray], step: int, batch: int, accum: int, seed: int) -> dict[str, np.ndarray]:
    """The rows of train step `step`: [accum, batch, T] each, in an order fixed by `seed` alone.

    Step s takes rows s·A·B to (s+1)·A·B - 1 of the endless sequence of
    epochs, each a fresh permutation of the rows (numpy's PCG64 seeded with
    (seed, epoch)); a resumed run therefore sees exactly the same batches.
    """
    n = len(rows["tokens"])
    per_step = batch * accum
    index = np.arange(step * per_step, (step + 1) * per_step)
    epochs = index // n
    order = np.empty_like(index)
    for epoch in np.unique(epochs):
        at = epochs == epoch
        order[at] = np.random.default_rng((seed, int(epoch))).permutation(n)[index[at] % n]
    return {k: v[order].reshape(accum, batch, -1) for k, v in rows.items()}
