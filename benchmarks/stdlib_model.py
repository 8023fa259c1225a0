"""The tiny Mixtral trained on Python's standard library: data, training and evaluation in one reproducible run.

    python benchmarks/stdlib_model.py [--out /work/stdlib_tiny] [--steps 600] [--plot_dir docs]
    python benchmarks/stdlib_model.py --config benchmarks/stdlib_256.json --out /work/stdlib_256

1. Data: /usr/lib/python3.11/*.py (sorted), split by a shuffle seeded with 0
   into 90% train / 10% held-out files; the first 20 kB of each file as
   {"text"} lines of 4 kB -> OUT/train.jsonl, OUT/heldout.jsonl (kept if there).
2. Training: `python -m mixtral_jax.train --config tiny` (random init, all
   weights; `--config benchmarks/stdlib_256.json`: every matrix's rows a multiple of
   256, so llama.cpp's K-quants apply to each, as they do to Mixtral's) with the hub configs' load-balancing weight 0.02 -> OUT/model
   (kept if there; an interrupted run resumes from OUT/model.train).
3. Evaluation: benchmarks/stdlib_eval.py (held-out perplexity, expert load,
   routing by token type) -> OUT/eval.json and the plots; OUT/READY holds the
   perplexity line once the model and its evaluation exist.
Weights stay out of the repository.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = "/usr/lib/python3.11/*.py"
FILE_CHARS, LINE_CHARS, HELDOUT = 20_000, 4_000, 0.1


def build_data(out: str) -> None:
    """Writes OUT/train.jsonl and OUT/heldout.jsonl from the stdlib sources, deterministically."""
    files = sorted(glob.glob(SOURCES))
    if not files:
        sys.exit(f"error: no files match {SOURCES}; this script needs Python 3.11's standard library sources.")
    random.Random(0).shuffle(files)
    n_held = round(len(files) * HELDOUT)
    for name, part in (("heldout.jsonl", files[:n_held]), ("train.jsonl", files[n_held:])):
        path = os.path.join(out, name)
        if os.path.exists(path):
            continue
        with open(path + ".tmp", "w") as f:
            for src in part:
                with open(src, encoding="utf-8", errors="replace") as g:
                    text = g.read(FILE_CHARS)
                for at in range(0, len(text), LINE_CHARS):
                    f.write(json.dumps({"text": text[at:at + LINE_CHARS]}) + "\n")
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(part)} files", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/work/stdlib_tiny")
    parser.add_argument("--config", default="tiny", help="preset or config.json of the model to train")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--router_aux_loss_coef", type=float, default=0.02)
    parser.add_argument("--plot_dir", help="where the loss and routing plots go (default: docs/ for the tiny "
                        "preset, whose plots the docs show; OUT for any other config)")
    args = parser.parse_args()
    args.plot_dir = args.plot_dir or (os.path.join(ROOT, "docs") if args.config == "tiny" else args.out)

    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.plot_dir, exist_ok=True)
    build_data(args.out)
    model, env = os.path.join(args.out, "model"), dict(os.environ, PYTHONPATH=ROOT)
    if not os.path.isdir(model):
        cmd = [sys.executable, "-m", "mixtral_jax.train", "--config", args.config,
               "--data", os.path.join(args.out, "train.jsonl"), "--out", model,
               "--steps", str(args.steps), "--batch", str(args.batch), "--seq_len", str(args.seq_len),
               "--learning_rate", str(args.learning_rate), "--warmup_steps", "20",
               "--router_aux_loss_coef", str(args.router_aux_loss_coef), "--log_every", "25", "--save_every", "100"]
        if os.path.isdir(model + ".train"):
            cmd.append("--resume")
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    curve = os.path.join(model + ".train", "loss.png")
    if os.path.isfile(curve):
        shutil.copyfile(curve, os.path.join(args.plot_dir, "stdlib_loss.png"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "stdlib_eval.py"), "--checkpoint", model,
                             "--data", os.path.join(args.out, "heldout.jsonl"),
                             "--plot", os.path.join(args.plot_dir, "stdlib_routing.png")],
                            check=True, cwd=ROOT, env=env, capture_output=True, text=True)
    print(result.stderr[-2000:], file=sys.stderr)
    line = result.stdout.strip().splitlines()[-1]
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        f.write(line + "\n")
    ev = json.loads(line)
    ready = (f"held-out perplexity {ev['heldout_perplexity']:.1f} (CE {ev['heldout_ce']:.3f} over "
             f"{ev['heldout_targets']} targets; uniform {ev['uniform_perplexity']}); model {model}\n")
    with open(os.path.join(args.out, "READY"), "w") as f:
        f.write(ready)
    print(line)
    print(ready, end="")


if __name__ == "__main__":
    main()
