"""Held-out perplexity and expert specialisation of a model fine-tuned with `python -m mixtral_jax.train`.

    python benchmarks/stdlib_eval.py --checkpoint MODEL --data heldout.jsonl --plot docs/stdlib_routing.png

Perplexity is exp(mean CE) over the held-out file packed as in training. The
plot's top row shows, per layer, the share of each token type's tokens whose
top-1 expert is e (token types from the sentencepiece piece: Python keyword,
name, number, punctuation/operator, whitespace/newline); its bottom row each
layer's expert load, the share of the top-k assignments per expert (a layer
whose router sends every token to one expert shows 1/k = 0.5 on it: collapsed).
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
    num_layers, num_experts = model.cfg.num_hidden_layers, model.cfg.num_local_experts
    counts = np.zeros((num_layers, len(TYPES), num_experts))
    assigned = np.zeros((num_layers, num_experts))  # top-k assignments of real tokens
    for start in range(0, len(rows["tokens"]) - args.batch + 1, args.batch):
        batch = {k: v[start:start + args.batch] for k, v in rows.items()}
        _, metrics = mj.lm_loss(model, batch["tokens"], batch["loss_mask"], segment_ids=batch["segment_ids"])
        nll += float(metrics["ce"]) * float(metrics["targets"])
        targets += float(metrics["targets"])
        routing = mj.expert_routing(model, batch["tokens"])  # experts [L, B, T, k], packed rows as one context
        kinds = np.vectorize(lambda i: TYPES.index(token_type(tok.id_to_piece(int(i)))))(batch["tokens"])
        real = batch["segment_ids"] != 0
        for l in range(num_layers):
            np.add.at(counts[l], (kinds[real], routing.experts[l, :, :, 0][real]), 1)
            assigned[l] += np.bincount(routing.experts[l][real].ravel(), minlength=num_experts)
    share = counts / counts.sum(axis=2, keepdims=True)
    load = assigned / assigned.sum(axis=1, keepdims=True)
    print(json.dumps({"heldout_targets": int(targets), "heldout_ce": nll / targets,
                      "heldout_perplexity": math.exp(nll / targets), "uniform_perplexity": model.cfg.vocab_size,
                      "tokens_per_type": dict(zip(TYPES, counts[0].sum(axis=1).astype(int).tolist())),
                      "expert_load": np.round(load, 3).tolist(),
                      "max_load_per_layer": np.round(load.max(axis=1), 3).tolist(),
                      "top1_share_layer0": np.round(share[0], 3).tolist()}))
    if args.plot:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.2 * num_layers, 5.6), layout="constrained")
        axes = fig.subplots(2, num_layers, height_ratios=(3, 1.6), squeeze=False)
        for l in range(num_layers):
            ax = axes[0, l]
            im = ax.imshow(share[l], vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"layer {l}")
            ax.set_xlabel("top-1 expert")
            ax.set_yticks(range(len(TYPES)), TYPES if l == 0 else [""] * len(TYPES))
            bars = axes[1, l]
            bars.bar(range(num_experts), load[l])
            bars.axhline(1 / num_experts, color="gray", linestyle="--", linewidth=0.8)
            bars.set_ylim(0, 1 / model.cfg.num_experts_per_tok)
            bars.set_xlabel("expert")
            bars.set_xticks(range(num_experts))
            if l == 0:
                bars.set_ylabel("load (top-k share)")
        fig.colorbar(im, ax=list(axes[0]), label="share of the type's tokens")
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
