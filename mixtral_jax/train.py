"""`python -m mixtral_jax.train`: fine-tune a Mixtral (fully or with LoRA) on a JSONL file.

    python -m mixtral_jax.train --checkpoint DIR | --config tiny --data FILE.jsonl --out DIR
        [--lora_rank R [--quantize int8|int4]] [--mesh SPEC] [--steps N] [--batch B] [--seq_len T] [--resume] ...

Each JSONL line is a chat {"messages": [...]} (loss on the assistant turns)
or {"text": ...}. Progress lines show the loss, tokens/s and expert load;
the whole train state is checkpointed to --state_dir every --save_every
steps (atomically), with a loss-curve PNG; --resume continues from it
exactly. At the end --out holds the fine-tuned model (LoRA merged), which
`sample --checkpoint` and `serve` load. This module only turns flags into
library calls.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from mixtral_jax import cli
from mixtral_jax.tokenizer import preset_for

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "Base model checkpoint directory (from mixtral_jax.convert or mj.save).")
flags.DEFINE_string("config", "tiny", "Without --checkpoint: preset or config.json path of a randomly initialised model.")
flags.DEFINE_string("data", None, "JSONL file: one {\"messages\": [...]} or {\"text\": ...} object per line.")
flags.DEFINE_string("out", None, "Directory for the fine-tuned model (a checkpoint that sample and serve load).")
flags.DEFINE_string("state_dir", None, "Train-state checkpoints, progress and loss.png (default: OUT.train).")
flags.DEFINE_integer("lora_rank", 0, "Rank of LoRA adapters on attention and every expert; 0 trains all weights.")
flags.DEFINE_string("mesh", "", "Device mesh, e.g. expert=4,tensor=2 (axes data, expert, tensor).")
flags.DEFINE_integer("steps", 100, "Optimizer steps.")
flags.DEFINE_integer("batch", 8, "Packed rows per micro-batch.")
flags.DEFINE_integer("seq_len", 256, "Tokens per packed row.")
flags.DEFINE_integer("grad_accum", 1, "Micro-batches per optimizer step.")
flags.DEFINE_float("learning_rate", 3e-4, "Peak learning rate (linear warmup, then cosine to 10%).")
flags.DEFINE_integer("warmup_steps", 10, "Warmup steps.")
flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.")
flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clip.")
flags.DEFINE_float("router_aux_loss_coef", None, "Load-balancing loss weight (default: the model config's).")
flags.DEFINE_float("router_z_loss_coef", 0.0, "Router z-loss weight.")
flags.DEFINE_integer("seed", 0, "Seed of the data order, the LoRA init and (with --config) the random weights.")
flags.DEFINE_enum("quantize", None, ["int8", "int4"],
                  "With --lora_rank: hold the frozen base's experts quantized (the merged --out model's are float).")
flags.DEFINE_string("dtype", None, "Parameter dtype; default float32 on CPU, bfloat16 on TPU/GPU.")
flags.DEFINE_integer("log_every", 10, "Steps between progress lines.")
flags.DEFINE_integer("save_every", 50, "Steps between train-state checkpoints (and at the end).")
flags.DEFINE_boolean("resume", False, "Continue from the train state in --state_dir.")
flags.DEFINE_boolean("overwrite", False, "Replace a checkpoint already at --out.")


class UsageError(Exception):
    """Bad input: printed as one sentence, exit status 2."""


def _check_flags() -> None:
    for name in ("data", "out"):
        if not getattr(FLAGS, name):
            raise UsageError(f"--{name} is required.")
    for name in ("steps", "batch", "grad_accum", "log_every", "save_every"):
        if getattr(FLAGS, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(FLAGS, name)}.")
    if FLAGS.seq_len < 2:
        raise UsageError(f"--seq_len must be at least 2, got {FLAGS.seq_len}.")
    if FLAGS.lora_rank < 0:
        raise UsageError(f"--lora_rank must be >= 0 (0 trains every weight), got {FLAGS.lora_rank}.")
    if FLAGS.quantize and not FLAGS.lora_rank:
        raise UsageError(f"--quantize {FLAGS.quantize} holds a frozen base; it needs --lora_rank R (R > 0).")
    if FLAGS.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be > 0, got {FLAGS.learning_rate}.")
    if not os.path.isfile(FLAGS.data):
        raise UsageError(f"--data {FLAGS.data} is not a file.")
    if FLAGS.checkpoint and not os.path.isdir(FLAGS.checkpoint):
        raise UsageError(f"--checkpoint {FLAGS.checkpoint} is not a directory.")


def _model(mesh):
    import jax
    import mixtral_jax as mj

    dtype = FLAGS.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    if FLAGS.checkpoint:
        return mj.load(FLAGS.checkpoint, dtype=dtype, mesh=mesh, layout="stacked", quantize=FLAGS.quantize)
    return mj.init_random(mj.load_config(FLAGS.config), seed=FLAGS.seed, dtype=dtype, mesh=mesh, layout="stacked",
                          quantize=FLAGS.quantize)


def plot_loss(losses: list[float], path: str) -> None:
    """Writes the loss curve (loss per step) as a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run() -> None:
    _check_flags()
    import jax
    import numpy as np

    import mixtral_jax as mj
    from mixtral_jax import ckpt_files, data, finetune

    out = os.path.abspath(FLAGS.out)
    state_dir = os.path.abspath(FLAGS.state_dir or out + ".train")
    try:
        ckpt_files.check_destination(out, FLAGS.overwrite)
    except FileExistsError as e:
        raise UsageError(str(e)) from None
    if finetune.has_state(state_dir) and not FLAGS.resume:
        raise UsageError(f"{state_dir} holds the train state of an earlier run; pass --resume to continue it, or "
                         "choose another --out or --state_dir.")
    try:
        mesh = mj.make_mesh(FLAGS.mesh) if FLAGS.mesh else None
    except ValueError as e:
        raise UsageError(f"--mesh {FLAGS.mesh}: {e}") from None
    # The data first: a bad line is reported before minutes of loading a large model.
    cfg = mj.load_config(FLAGS.checkpoint or FLAGS.config)
    tokenizer = mj.load_tokenizer(preset_for(cfg.vocab_size))
    rows = data.pack(data.load_jsonl(FLAGS.data, tokenizer), FLAGS.seq_len)
    model = _model(mesh)
    tc = finetune.TrainConfig(learning_rate=FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps,
                              total_steps=FLAGS.steps, weight_decay=FLAGS.weight_decay, clip_norm=FLAGS.clip_norm,
                              grad_accum=FLAGS.grad_accum, lora_rank=FLAGS.lora_rank,
                              router_aux_loss_coef=FLAGS.router_aux_loss_coef,
                              router_z_loss_coef=FLAGS.router_z_loss_coef)
    state = finetune.init_state(model, tc, seed=FLAGS.seed)
    losses = []
    if FLAGS.resume and finetune.has_state(state_dir):
        state, progress = finetune.restore_state(state_dir, state)
        losses = progress["losses"]
        print(f"resumed at step {int(state['step'])} from {state_dir}", flush=True)
    step_fn = finetune.make_train_step(model, tc, state)
    frozen = finetune.frozen_params(model, tc)
    e = model.cfg.num_local_experts
    print(f"{len(rows['tokens'])} packed rows of {FLAGS.seq_len} tokens; {FLAGS.batch * FLAGS.grad_accum} rows per "
          f"step; {'LoRA rank ' + str(tc.lora_rank) if tc.lora_rank else 'all weights'}", flush=True)
    start, tick, tokens_since = int(state["step"]), time.perf_counter(), 0
    for step in range(start, FLAGS.steps):
        batch = data.batch_at(rows, step, FLAGS.batch, FLAGS.grad_accum, FLAGS.seed)
        state, metrics = step_fn(state, frozen, batch)
        losses.append(float(metrics["loss"]))
        done = step + 1
        if step == start:  # the first step compiles: tokens/s counts from its end
            tick = time.perf_counter()
        else:
            tokens_since += int(np.count_nonzero(batch["segment_ids"]))
        if done % FLAGS.log_every == 0 or done == FLAGS.steps:
            now = time.perf_counter()
            load = np.asarray(metrics["load"])
            print(f"step {done}/{FLAGS.steps}  loss {losses[-1]:.4f}  ce {float(metrics['ce']):.4f}  "
                  f"aux {float(metrics['aux']):.4f}  z {float(metrics['z']):.3f}  "
                  f"tok/s {tokens_since / max(now - tick, 1e-9):,.0f}  expert load min {load.min():.3f} max {load.max():.3f} "
                  f"(balanced {1 / e:.3f})", flush=True)
            tick, tokens_since = now, 0
        if done % FLAGS.save_every == 0 or done == FLAGS.steps:
            finetune.save_state(state, state_dir, {"step": done, "losses": losses})
            plot_loss(losses, os.path.join(state_dir, "loss.png"))
    mj.save(finetune.trained_model(model, tc, state), out, overwrite=FLAGS.overwrite)
    print(f"fine-tuned model written to {out}; loss curve and train state in {state_dir}", flush=True)


def main(argv):
    # Progress goes to stdout as plain lines; JAX's and Orbax's INFO chatter stays out.
    absl_logging.set_verbosity(absl_logging.WARNING)
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; flags look like --data FILE.jsonl.", file=sys.stderr)
        sys.exit(2)
    from mixtral_jax import CheckpointError

    try:
        run()
    except (UsageError, CheckpointError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last saved step.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
