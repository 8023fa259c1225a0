"""`python -m mixtral_jax.sample`: generate text from the command line.

With no flags: the tiny preset with random weights and the real 8x7B
tokenizer on CPU, streaming the text and ending with a timing summary.
This module only turns flags into library calls.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "Preset (tiny, 8x7b, 8x22b) or a config.json path; ignored with --checkpoint.")
flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory (from mixtral_jax.convert).")
flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat the flag for a batch.")
flags.DEFINE_multi_string("prompt_ids", None, "Prompt as comma-separated token ids, e.g. 1,2,3; repeatable.")
flags.DEFINE_boolean("chat", False, "Wrap each prompt as a user turn in the model's instruct format.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling threshold; 1 disables.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens; 0 disables.")
flags.DEFINE_integer("seed", 0, "Sampling seed (and the random-weight seed).")
flags.DEFINE_string("dtype", None, "Parameter dtype; default float32 on CPU, bfloat16 on TPU/GPU.")
flags.DEFINE_string("expert_dtype", None, "Keep the expert weights in this dtype, computing in --dtype; default: "
                    "bfloat16 for a bfloat16 checkpoint run in float32 on one CPU device with the C++ kernel (exact, half the memory and "
                    "decode bytes), else --dtype.")
flags.DEFINE_string("mesh", "", "Device mesh, e.g. expert=4,tensor=2 (axes data, expert, tensor).")
flags.DEFINE_boolean("dry_run", False, "Plan memory (and, with --topology, speed) per device for --config on --mesh; "
                     "allocate nothing. Exit status 2 when the plan does not fit.")
flags.DEFINE_string("topology", None, "Dry run: compile for this TPU slice with the TPU compiler (libtpu, no TPU "
                    "needed), e.g. v5e:1x1, v5e:2x4, v5e:8x8, v6e:4x4, v4:2x2x1, v5p:4x4x4; unset: virtual CPU "
                    "devices, float32 (an upper bound).")
flags.DEFINE_integer("batch", 1, "Dry run: batch size.")
flags.DEFINE_integer("max_seq_len", None, "Dry run: KV-cache length (default: the model's positions).")
flags.DEFINE_integer("prompt_len", None, "Dry run: prefill length (default: min(max_seq_len, 2048)).")
flags.DEFINE_float("device_memory_gb", None, "Dry run: memory per device in GiB to check the plan against "
                   "(default with --topology: the chip's HBM).")
flags.DEFINE_boolean("json", False, "End the output with one JSON line of tokens, text and timings.")
flags.DEFINE_float("capacity_factor", None, "Expert-parallel capacity per expert (tokens x k / E x factor); "
                   "unset is dropless. Only on a --mesh of more than one device.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")

DEFAULT_PROMPT = "Mixture-of-experts models route each token to"


class UsageError(Exception):
    """Bad input: printed as one sentence, exit status 2."""


def _host_bytes_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_fits(cfg, dtype, n_devices: int, mesh_given: bool, expert_dtype=None) -> None:
    """Refuses, in one sentence, a model whose weights cannot fit where they would live."""
    import jax
    import numpy as np

    import mixtral_jax as mj

    need = mj.param_bytes(cfg, dtype, expert_dtype)["total"]
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        have, where = _host_bytes_available(), "this host has"
    else:
        stats = dev.memory_stats() or {}
        have = stats.get("bytes_limit", 0) * n_devices
        where = f"{n_devices} {dev.platform.upper()} device(s) have"
        if not have:
            return
    if need > 0.9 * have:
        hint = ("run it on a pod with a mesh (e.g. --mesh expert=8,tensor=8 on 64 chips)"
                if not mesh_given or dev.platform == "cpu" else "use a larger mesh")
        raise UsageError(
            f"{cfg.name} needs {need / 1e9:.1f} GB for its weights in {np.dtype(dtype).name}"
            f"{'' if expert_dtype in (None, dtype) else ' (experts in ' + np.dtype(expert_dtype).name + ')'} but {where} "
            f"{have / 1e9:.1f} GB; {hint}, or check a plan first with --dry_run --mesh SPEC.")


def _tokenizer_for(vocab_size: int):
    import mixtral_jax as mj

    return mj.load_tokenizer("8x22b" if vocab_size == 32768 else "8x7b")


def _prompts(tok, cfg) -> list[list[int]]:
    prompts = []
    for spec in FLAGS.prompt_ids or []:
        try:
            ids = [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise UsageError(f"--prompt_ids {spec!r} is not a comma-separated list of integers.") from None
        if not ids:
            raise UsageError("--prompt_ids is empty; give at least one token id.")
        prompts.append(ids)
    texts = FLAGS.prompt if FLAGS.prompt is not None else ([] if prompts else [DEFAULT_PROMPT])
    for text in texts:
        if not text.strip():
            raise UsageError("--prompt is empty; give some text (or --prompt_ids).")
        if FLAGS.chat:
            prompts.append(tok.encode_chat([{"role": "user", "content": text}]))
        else:
            prompts.append(tok.encode(text, bos=True))
    return prompts


def dry_run() -> int:
    """--dry_run: the plan of --config on --mesh, from an AOT compile on abstract arrays; 2 if it does not fit."""
    from mixtral_jax import plan

    if not FLAGS.mesh:
        raise UsageError("--dry_run needs --mesh, e.g. --mesh expert=8,tensor=8.")
    if FLAGS.topology is None:
        plan.ensure_virtual_devices(plan.mesh_size(FLAGS.mesh))
    result = plan.dry_run(FLAGS.checkpoint or FLAGS.config, FLAGS.mesh, batch=FLAGS.batch,
                          max_seq_len=FLAGS.max_seq_len, prompt_len=FLAGS.prompt_len, dtype=FLAGS.dtype or "bfloat16",
                          device_memory_gb=FLAGS.device_memory_gb, capacity_factor=FLAGS.capacity_factor,
                          topology=FLAGS.topology)
    print(json.dumps(result) if FLAGS.json else plan.summary(result))
    return 2 if result["fits"] is False else 0


def run() -> int:
    """The CLI body; returns the exit status."""
    if FLAGS.max_new_tokens < 0:
        raise UsageError(f"--max_new_tokens must be >= 0, got {FLAGS.max_new_tokens}.")
    if FLAGS.checkpoint is not None and not os.path.isdir(FLAGS.checkpoint):
        raise UsageError(f"--checkpoint {FLAGS.checkpoint} is not a directory; convert HF weights with "
                         "`python -m mixtral_jax.convert --hf_dir DIR --out DIR` first.")
    if FLAGS.dry_run:
        return dry_run()

    from mixtral_jax import plan, sharding

    multi_process = sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                                    FLAGS.process_id)
    if FLAGS.mesh and not multi_process:
        # On a CPU host, a mesh larger than one device runs on virtual devices (a no-op on TPU/GPU).
        plan.ensure_virtual_devices(plan.mesh_size(FLAGS.mesh))

    import jax
    import numpy as np

    import mixtral_jax as mj
    from mixtral_jax import cpu_kernel

    for name in ("dtype", "expert_dtype"):
        if FLAGS[name].value is not None:
            try:
                np.dtype(FLAGS[name].value)
            except TypeError:
                raise UsageError(f"--{name} {FLAGS[name].value!r} is not a dtype; use float32 or bfloat16.") from None
    cfg = mj.load_config(FLAGS.checkpoint or FLAGS.config)
    on_cpu = jax.default_backend() == "cpu"
    dtype = FLAGS.dtype or ("float32" if on_cpu else "bfloat16")
    mesh = mj.make_mesh(FLAGS.mesh) if FLAGS.mesh else None
    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)

    expert_dtype = FLAGS.expert_dtype
    if (expert_dtype is None and FLAGS.checkpoint and on_cpu and mesh is None and dtype == "float32"
            and cfg.dtype == "bfloat16" and cpu_kernel.available()):
        # The stored values are bfloat16 already: keeping the experts so loses nothing, and the
        # kernel reads half the bytes (without it XLA would widen them at every step, slowly).
        expert_dtype = "bfloat16"
    _check_fits(cfg, dtype, 1 if mesh is None else mesh.size, mesh is not None, expert_dtype)
    if FLAGS.checkpoint:
        model = mj.load(FLAGS.checkpoint, dtype=dtype, mesh=mesh, expert_dtype=expert_dtype)
        source = f"weights from {FLAGS.checkpoint}"
    else:
        model = mj.init_random(cfg, seed=FLAGS.seed, dtype=dtype, mesh=mesh, expert_dtype=expert_dtype)
        source = "RANDOM weights (no --checkpoint): the text below is noise, not a real model's output"
    tok = _tokenizer_for(cfg.vocab_size)
    prompts = _prompts(tok, cfg)
    if on_cpu and mesh is None:
        cpu_kernel.available()  # builds the CPU kernel now (once), or says here why it cannot
    experts_note = "" if model.expert_dtype == model.dtype else f" (experts kept in {np.dtype(model.expert_dtype).name})"
    say(f"[mixtral_jax] {cfg.name}: {source}; {dtype}{experts_note} on {jax.device_count()} {jax.default_backend()} "
        f"device(s){' mesh ' + FLAGS.mesh if FLAGS.mesh else ''}.", flush=True)

    outs = [[] for _ in prompts]
    stream = len(prompts) == 1 and not FLAGS.json
    # Text is decoded with its prompt so word boundaries come out right, then the prompt is cut off.
    prompt_texts = [tok.decode(p) for p in prompts]
    new_text = lambda row: tok.decode(prompts[row] + outs[row])[len(prompt_texts[row]):]
    if stream:
        say(prompt_texts[0], end="", flush=True)
    shown = ""
    t0 = time.perf_counter()
    stamps, counts = [], []
    for step_tokens in mj.generate_stream(model, prompts, FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_p,
                                          FLAGS.top_k, FLAGS.seed, capacity_factor=FLAGS.capacity_factor):
        stamps.append(time.perf_counter())
        counts.append(int((step_tokens >= 0).sum()))
        for row, t in enumerate(step_tokens):
            if t >= 0:
                outs[row].append(int(t))
        if stream:
            text = new_text(0)
            say(text[len(shown):], end="", flush=True)
            shown = text
    texts = [new_text(row) for row in range(len(prompts))]
    if stream:
        say()
    else:
        for prompt_text, text in zip(prompt_texts, texts):
            say(f"--- {prompt_text!r}\n{text}")

    ttft = stamps[0] - t0 if stamps else None
    # Step 0 is the prefill and step 1 compiles the decode step: the rate counts the steps after.
    rate = sum(counts[2:]) / (stamps[-1] - stamps[1]) if len(stamps) > 2 else None
    new_tokens = sum(len(o) for o in outs)
    say(f"[summary] prompt tokens {sum(len(p) for p in prompts)}, new tokens {new_tokens}, "
        f"time to first token {ttft if ttft is None else round(ttft, 3)} s (includes compilation), "
        f"decode {'n/a' if rate is None else f'{rate:.1f}'} tokens/s")
    if FLAGS.json:
        say(json.dumps({"tokens": outs, "text": texts, "prompt_tokens": [len(p) for p in prompts],
                        "new_tokens": new_tokens, "time_to_first_token_s": ttft, "decode_tokens_per_s": rate,
                        "random_weights": FLAGS.checkpoint is None}))
    return 0


def main(argv):
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # no "no TPU found" noise on CPU
    from mixtral_jax import topology

    topology.quiet_libtpu_without_tpu()  # the tpu extra on a host without TPUs: no libtpu start-up warnings
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; flags look like --prompt 'text'.", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(run())
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
