"""`python -m mixtral_jax.bench`: mixtral_jax against transformers on the same Mixtral weights.

Writes a random-weight Hugging Face `MixtralForCausalLM` of the stated size,
converts it with `convert_hf_checkpoint`, loads it both ways and measures, in
one run with the two sides alternating: prefill tokens/s, decode tokens/s at
several batch sizes, and (ours only) decode with every expert computed. It
also measures this host's float32 streaming-read bandwidth (an XLA matvec and
the CPU MoE kernel, the faster counts) and XLA matmul rate, and derives the
decode roofline fraction and prefill efficiency from them. The tables are
printed and, unless `--out_dir ''`, written to `OUT_DIR/benchmarks.md` with a
plot in `OUT_DIR/benchmarks.png`. The bench compares; docs/benchmarks.md and
docs/performance.md judge.

Pieces: settings.py (flags -> checked Settings), measure.py (the two sides,
warm-up, alternating timed rounds), host.py (/proc facts, other processes'
load, reference rates), metrics.py (pure arithmetic), report.py (tables,
plot, markdown). Like every CLI here, it only calls the library.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import sys
import tempfile

from absl import app, flags

from mixtral_jax.bench import host, measure, report
from mixtral_jax.bench.settings import MODEL, QUICK, UsageError, resolve

FLAGS = flags.FLAGS
EXIT_USAGE = 2


def _define_flags() -> None:
    flags.DEFINE_integer("hidden_size", MODEL["hidden_size"], "Model width D.")
    flags.DEFINE_integer("intermediate_size", MODEL["intermediate_size"], "Expert hidden width F.")
    flags.DEFINE_integer("num_layers", MODEL["num_layers"], "Decoder layers.")
    flags.DEFINE_integer("num_heads", MODEL["num_heads"], "Attention heads.")
    flags.DEFINE_integer("num_kv_heads", MODEL["num_kv_heads"], "Key/value heads.")
    flags.DEFINE_integer("num_experts", MODEL["num_experts"], "Experts per layer.")
    flags.DEFINE_integer("top_k", MODEL["top_k"], "Experts per token.")
    flags.DEFINE_integer("vocab_size", MODEL["vocab_size"], "Vocabulary size.")
    flags.DEFINE_integer("prompt_len", 512, "Prompt tokens of the prefill measurement (batch 1).")
    flags.DEFINE_integer("decode_prompt_len", 16, "Prompt tokens of the decode measurements.")
    flags.DEFINE_integer("new_tokens", 64, "New tokens per decode run at batch 1 (fewer at big batches; the table "
                         "says how many).")
    flags.DEFINE_list("batch_sizes", ["1", "4", "16", "64"], "Decode batch sizes.")
    flags.DEFINE_integer("repeats", 3, "Timed repeats of every measurement; medians are reported.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype of both sides.")
    flags.DEFINE_enum("checkpoint_dtype", None, ["float32", "bfloat16"], "dtype the HF checkpoint is written in "
                      "(default: --dtype); bfloat16 is how Mixtral is published. Both sides load it in --dtype.")
    flags.DEFINE_enum("expert_dtype", None, ["float32", "bfloat16"], "mixtral_jax keeps the expert weights in this "
                      "dtype, computing in --dtype (load(expert_dtype=...)); default: --dtype.")
    flags.DEFINE_string("out_dir", "bench_results", "Where benchmarks.md and benchmarks.png go; '' writes nothing.")
    flags.DEFINE_string("workdir", None, "Directory for the HF and converted checkpoints, kept and reused by later "
                        "runs of the same model; default: a temporary directory, deleted at the end.")
    flags.DEFINE_boolean("keep", False, "Keep the temporary checkpoint directory (prints its path).")
    flags.DEFINE_boolean("skip_transformers", False, "Measure mixtral_jax only.")
    flags.DEFINE_boolean("json", False, "End the output with one JSON line of every number.")
    flags.DEFINE_integer("seed", 0, "Seed of the random weights and prompts.")
    flags.DEFINE_boolean("quick", False, "Tiny model, few tokens, one repeat: runs every code path in under a minute. "
                         "Flags given explicitly still apply.")


def resolve_settings():
    """The flags (with --quick defaults for flags not given) as checked Settings."""
    values = {name: FLAGS[name].value for name in QUICK}
    if FLAGS.quick:
        values.update({name: v for name, v in QUICK.items() if not FLAGS[name].present})
    return resolve(values, quick=FLAGS.quick, dtype=FLAGS.dtype, seed=FLAGS.seed,
                   skip_transformers=FLAGS.skip_transformers, checkpoint_dtype=FLAGS.checkpoint_dtype,
                   expert_dtype=FLAGS.expert_dtype)


def run() -> int:
    """The CLI body; returns the exit status."""
    settings = resolve_settings()
    if FLAGS.out_dir and os.path.exists(FLAGS.out_dir) and not os.path.isdir(FLAGS.out_dir):
        raise UsageError(f"--out_dir {FLAGS.out_dir} exists and is not a directory.")
    if FLAGS.workdir:
        workdir = os.path.abspath(FLAGS.workdir)
        os.makedirs(workdir, exist_ok=True)
    else:
        workdir = tempfile.mkdtemp(prefix="mixtral_bench-")
    command = "python -m mixtral_jax.bench " + " ".join(sys.argv[1:])
    try:
        result = measure.run_benchmark(settings, workdir)
    finally:
        if FLAGS.workdir or FLAGS.keep:
            measure.say(f"checkpoints kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result.update(command=command.strip(), date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                  machine=host.machine_facts())
    print(report.render_table(result))
    if FLAGS.out_dir:
        os.makedirs(FLAGS.out_dir, exist_ok=True)
        report.write_plot(result, os.path.join(FLAGS.out_dir, "benchmarks.png"))
        report.write_markdown(result, os.path.join(FLAGS.out_dir, "benchmarks.md"), "benchmarks.png")
        measure.say(f"wrote {os.path.join(FLAGS.out_dir, 'benchmarks.md')} and benchmarks.png")
    if FLAGS.json:
        print(json.dumps(result))
    return 0


def main(argv):
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "no TPU found" noise on CPU
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; flags look like --batch_sizes 1,4.", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        sys.exit(run())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
