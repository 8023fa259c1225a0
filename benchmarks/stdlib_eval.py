"""Held-out perplexity and expert specialisation of a model fine-tuned with `python -m mixtral_jax.train`.

    python benchmarks/stdlib_eval.py --checkpoint MODEL --data heldout.jsonl --plot docs/stdlib_routing.png

Perplexity is exp(mean CE) over the held-out file packed as in training. The
plot shows, per layer, the share of each token type's tokens whose top-1
expert is e (token types from the sentencepiece piece: Python keyword, name,
number, punctuation/operator, whitespace/newline).
"""

from __future__ import annotations

import argparse
import json
import keyword
import math
import string

import numpy as np

import mixtral_jax as mj
from mixtral_jax import data

TYPES = ("keyword", "name", "number", "punct", "space")


def token_type(piece: str) -> str:
    text = piece.replace("\u2581", " ")
    core = text.strip()
    if not core or piece.startswith("<0x0"):  # spaces, newlines and tabs as byte pieces
        return "space"
    if keyword.iskeyword(core):
        return "keyword"
    if core.isdigit():
        return "number"
    if all(c in string.punctuation for c in core):
        return "punct"
    return "name"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()

    model = mj.load(args.checkpoint, dtype="float32", layout="stacked")
    tok = mj.load_tokenizer("8x7b")
    rows = data.pack(data.load_jsonl(args.data, tok), args.seq_len)
    nll, targets = 0.0, 0.0
    counts = np.zeros((model.cfg.num_hidden_layers, len(TYPES), model.cfg.num_local_experts))
    for start in range(0, len(rows["tokens"]) - args.batch + 1, args.batch):
        batch = {k: v[start:start + args.batch] for k, v in rows.items()}
        _, metrics = mj.lm_loss(model, batch["tokens"], batch["loss_mask"], segment_ids=batch["segment_ids"])
        nll += float(metrics["ce"]) * float(metrics["targets"])
        targets += float(metrics["targets"])
        routing = mj.expert_routing(model, batch["tokens"])  # top-1 experts [L, B, T]
        kinds = np.vectorize(lambda i: TYPES.index(token_type(tok.id_to_piece(int(i)))))(batch["tokens"])
        real = batch["segment_ids"] != 0
        for l in range(counts.shape[0]):
            np.add.at(counts[l], (kinds[real], routing.experts[l, :, :, 0][real]), 1)
    share = counts / counts.sum(axis=2, keepdims=True)
    print(json.dumps({"heldout_targets": int(targets), "heldout_ce": nll / targets,
                      "heldout_perplexity": math.exp(nll / targets), "uniform_perplexity": model.cfg.vocab_size,
                      "tokens_per_type": dict(zip(TYPES, counts[0].sum(axis=1).astype(int).tolist())),
                      "top1_share_layer0": np.round(share[0], 3).tolist()}))
    if args.plot:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.2 * counts.shape[0], 3.2))
        for l in range(counts.shape[0]):
            ax = fig.add_subplot(1, counts.shape[0], l + 1)
            im = ax.imshow(share[l], vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"layer {l}")
            ax.set_xlabel("top-1 expert")
            ax.set_yticks(range(len(TYPES)), TYPES if l == 0 else [""] * len(TYPES))
        fig.colorbar(im, ax=fig.axes, label="share of the type's tokens")
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
