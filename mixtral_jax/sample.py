"""`python -m mixtral_jax.sample`: generate text from the command line.

With no flags: the tiny preset with random weights and the real 8x7B
tokenizer on CPU, streaming the text and ending with a timing summary.
This module only turns flags into library calls.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging

from mixtral_jax import cli
from mixtral_jax.tokenizer import load_tokenizer, preset_for

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "Preset (tiny, 8x7b, 8x22b) or a config.json path; ignored with --checkpoint.")
flags.DEFINE_string("checkpoint", None, "Converted checkpoint directory (from mixtral_jax.convert).")
flags.DEFINE_boolean("verify_checkpoint", True, "Check every checkpoint file against its digest before loading "
                     "(one extra read of the files); --noverify_checkpoint skips it.")
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
flags.DEFINE_string("quantize", None, "Quantize the weights while loading (or as a checkpoint written with convert "
                    "--quantize stores them): int8 (experts and lm_head per output channel, attention in groups of "
                    "32 inputs) or int4 (experts in groups of 32, attention and lm_head int8); int8-experts / "
                    "int4-experts: the experts only.")
flags.DEFINE_string("mesh", "", "Device mesh, e.g. expert=4,tensor=2 (axes data, expert, tensor).")
flags.DEFINE_boolean("dry_run", False, "Plan memory (and, with --topology, speed) per device for --config on --mesh; "
                     "allocate nothing. Exit status 2 when the plan does not fit.")
flags.DEFINE_string("topology", None, "Dry run: compile for this TPU slice with the TPU compiler (libtpu, no TPU "
                    "needed), e.g. v5e:1x1, v5e:2x4, v5e:8x8, v6e:4x4, v4:2x2x1, v5p:4x4x4; unset: virtual CPU "
                    "devices, float32 (an upper bound).")
flags.DEFINE_integer("batch", 1, "Dry run: batch size.")
flags.DEFINE_integer("max_seq_len", None, "Dry run: KV-cache length (default: the model's positions).")
flags.DEFINE_integer("prompt_len", None, "Dry run: prefill length (default: min(max_seq_len, 2048)).")
flags.DEFINE_integer("prefill_chunk", None, "Prefill prompts longer than this in chunks of it (bounds the prefill's "
                     "memory; the dry run plans one chunk); default: the whole prompt at once.")
flags.DEFINE_float("device_memory_gb", None, "Dry run: GiB per device to check the plan against (exit 2 if it does "
                   "not fit); default: with --topology the chip's HBM, else this host's devices (on CPU, the "
                   "available memory over the mesh's devices).")
flags.DEFINE_boolean("json", False, "Print one JSON line of tokens, text and timings, and nothing else on stdout.")
flags.DEFINE_float("capacity_factor", None, "Expert-parallel capacity per expert (tokens x k / E x factor); "
                   "unset is dropless. Only on a --mesh of more than one device.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")

QUANTIZE_MODES = ("int8", "int4", "int8-experts", "int4-experts")  # quant.MODES, without importing jax before the flags are checked
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


# Host memory each virtual CPU device takes beyond the model (XLA:CPU's per-device runtime state, rounded up
# from a measurement on the tiny preset); a one-process mesh may use half of the available memory for them.
VIRTUAL_DEVICE_BYTES = 64 * 2**20


def _check_flags() -> None:
    """Checks every flag that needs no config, device or model; raises UsageError."""
    from mixtral_jax import distributed, sharding

    if FLAGS.max_new_tokens < 0:
        raise UsageError(f"--max_new_tokens must be >= 0, got {FLAGS.max_new_tokens}.")
    if not (math.isfinite(FLAGS.temperature) and FLAGS.temperature >= 0):
        raise UsageError(f"--temperature must be a number >= 0 (0 is greedy), got {FLAGS.temperature}.")
    if not 0 < FLAGS.top_p <= 1:
        raise UsageError(f"--top_p must be in (0, 1] (1 disables it), got {FLAGS.top_p}.")
    if FLAGS.top_k < 0:
        raise UsageError(f"--top_k must be >= 0 (0 disables it), got {FLAGS.top_k}.")
    if FLAGS.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {FLAGS.batch}.")
    if FLAGS.prefill_chunk is not None and FLAGS.prefill_chunk < 1:
        raise UsageError(f"--prefill_chunk must be >= 1, got {FLAGS.prefill_chunk}.")
    if FLAGS.max_seq_len is not None and FLAGS.max_seq_len < 1:
        raise UsageError(f"--max_seq_len must be >= 1, got {FLAGS.max_seq_len}.")
    for name in ("device_memory_gb", "capacity_factor"):
        value = FLAGS[name].value
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name} must be a number > 0, got {value}.")
    for name in ("dtype", "expert_dtype"):
        if FLAGS[name].value is not None:
            _float_dtype(name)
    if FLAGS.quantize is not None and FLAGS.quantize not in QUANTIZE_MODES:
        raise UsageError(f"--quantize {FLAGS.quantize!r} is not a quantization; use one of {', '.join(QUANTIZE_MODES)}.")
    if FLAGS.quantize and FLAGS.expert_dtype:
        raise UsageError("--quantize and --expert_dtype both set the experts' storage; pass one of them.")
    if FLAGS.checkpoint is not None and not os.path.isdir(FLAGS.checkpoint):
        raise UsageError(f"--checkpoint {FLAGS.checkpoint} is not a directory; convert HF weights with "
                         "`python -m mixtral_jax.convert --hf_dir DIR --out DIR` first.")
    try:
        sizes = sharding.parse_mesh_spec(FLAGS.mesh)
        distributed.requested(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if FLAGS.dry_run and not FLAGS.mesh:
        raise UsageError("--dry_run needs --mesh, e.g. --mesh expert=8,tensor=8.")
    if FLAGS.capacity_factor is not None and math.prod(sizes.values()) == 1:
        raise UsageError("--capacity_factor applies to expert-parallel dispatch; give a --mesh of more than one "
                         "device, e.g. --mesh expert=4.")


def _float_dtype(name: str) -> None:
    import jax.numpy as jnp

    value = FLAGS[name].value
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        raise UsageError(f"--{name} {value!r} is not a dtype; use float32 or bfloat16.") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise UsageError(f"--{name} must be a floating-point dtype (float32 or bfloat16), got {value!r}.")


def _check_mesh(cfg) -> None:
    """The mesh must divide the config's experts, heads and expert hidden size."""
    import jax

    from mixtral_jax import sharding

    sizes = sharding.parse_mesh_spec(FLAGS.mesh)
    try:
        sharding.check_mesh(cfg, jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes)))
    except ValueError as e:
        raise UsageError(f"--mesh {FLAGS.mesh}: {e}") from None


def _check_virtual_devices(n: int) -> None:
    """Refuses a one-process mesh larger than this host can emulate with virtual CPU devices."""
    have = _host_bytes_available()
    limit = max(int(0.5 * have // VIRTUAL_DEVICE_BYTES), 8)
    if n > limit:
        raise UsageError(
            f"--mesh {FLAGS.mesh} needs {n} devices, more than one process here can emulate: each virtual CPU device "
            f"takes about {VIRTUAL_DEVICE_BYTES >> 20} MiB of host memory, so this host ({have / 1e9:.1f} GB "
            f"available) runs at most {limit}; use a smaller mesh, plan this one with --dry_run, or run it on a "
            "TPU/GPU slice with one process per host.")


def _check_fits(cfg, dtype, n_devices: int, mesh_given: bool, expert_dtype=None, quantize=None) -> None:
    """Refuses, in one sentence, a model whose weights cannot fit where they would live."""
    import jax
    import numpy as np

    import mixtral_jax as mj

    need = mj.param_bytes(cfg, dtype, expert_dtype, quantize)["total"]
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
            f"{'' if expert_dtype in (None, dtype) else ' (experts in ' + np.dtype(expert_dtype).name + ')'}"
            f"{' (quantized ' + quantize + ')' if quantize else ''} but {where} "
            f"{have / 1e9:.1f} GB; {hint}, or check a plan first with --dry_run --mesh SPEC.")


def _prompts(tok, cfg) -> list[list[int]]:
    prompts = []
    outside = lambda ids: [t for t in ids if not 0 <= t < cfg.vocab_size][:5]
    vocab = f"{cfg.name}'s vocabulary [0, {cfg.vocab_size})"
    for spec in FLAGS.prompt_ids or []:
        try:
            ids = [int(x) for x in spec.replace(" ", "").split(",") if x]
        except ValueError:
            raise UsageError(f"--prompt_ids {spec!r} is not a comma-separated list of integers.") from None
        if not ids:
            raise UsageError("--prompt_ids is empty; give at least one token id.")
        if outside(ids):
            raise UsageError(f"--prompt_ids {spec!r} has token ids {outside(ids)} outside {vocab}.")
        prompts.append(ids)
    texts = FLAGS.prompt if FLAGS.prompt is not None else ([] if prompts else [DEFAULT_PROMPT])
    for text in texts:
        if not text.strip():
            raise UsageError("--prompt is empty; give some text (or --prompt_ids).")
        ids = tok.encode_chat([{"role": "user", "content": text}]) if FLAGS.chat else tok.encode(text, bos=True)
        if outside(ids):  # a checkpoint whose vocabulary is not a Mixtral tokenizer's: say so before loading it
            raise UsageError(f"the text prompt encodes to token ids {outside(ids)} outside {vocab}, which is not a "
                             "Mixtral tokenizer's (32000 or 32768 pieces); give the prompt as --prompt_ids.")
        prompts.append(ids)
    longest = max(len(p) for p in prompts)
    if longest + FLAGS.max_new_tokens > cfg.max_position_embeddings:
        raise UsageError(f"the prompt ({longest} tokens) + --max_new_tokens {FLAGS.max_new_tokens} exceeds {cfg.name}'s "
                         f"{cfg.max_position_embeddings} positions; shorten the prompt or ask for fewer tokens.")
    return prompts


def _device_memory_gb(n: int) -> tuple[float, str]:
    """Memory per device of this host's default platform, for a dry run without --device_memory_gb."""
    import jax

    dev = jax.devices()[0]
    limit = (dev.memory_stats() or {}).get("bytes_limit") if dev.platform != "cpu" else None
    if limit:
        return limit / 2**30, f"checked against this host's {dev.platform.upper()} memory ({limit / 2**30:.1f} GiB)"
    have = _host_bytes_available()
    return (have / n / 2**30, f"checked against this host's {have / 2**30:.1f} GiB of available memory over {n} "
            "virtual CPU devices; pass --device_memory_gb for your TPU/GPU (e.g. 16 for v5e, 95 for v5p, 80 for H100)")


def dry_run() -> int:
    """--dry_run: the plan of --config on --mesh, from an AOT compile on abstract arrays.

    Returns 2 (after printing the plan) when the plan does not fit the device memory.
    """
    from mixtral_jax import plan

    memory_gb, memory_note = FLAGS.device_memory_gb, None
    if FLAGS.topology is None:
        n = plan.mesh_size(FLAGS.mesh)
        plan.ensure_virtual_devices(n)
        if memory_gb is None:
            memory_gb, memory_note = _device_memory_gb(n)
    result = plan.dry_run(FLAGS.checkpoint or FLAGS.config, FLAGS.mesh, batch=FLAGS.batch,
                          max_seq_len=FLAGS.max_seq_len, prompt_len=FLAGS.prompt_len, dtype=FLAGS.dtype or "bfloat16",
                          device_memory_gb=memory_gb, capacity_factor=FLAGS.capacity_factor,
                          topology=FLAGS.topology, quantize=FLAGS.quantize, prefill_chunk=FLAGS.prefill_chunk)
    print(json.dumps(result) if FLAGS.json else plan.summary(result), flush=True)
    if memory_note:
        print(f"[dry run] {memory_note}.", file=sys.stderr)
    if result["fits"] is False:
        print(f"error: {result['config']} on --mesh {FLAGS.mesh} needs {result['peak_bytes_per_device'] / 2**30:.4g} "
              f"GiB per device, more than {result['device_memory_gb']:.4g} GiB; use a mesh of more devices or a "
              "smaller --batch or --max_seq_len.", file=sys.stderr)
        return 2
    return 0


# Multi-process runs: set once this process joined the others, and once they compute together (an
# error from then on may be a lost peer's doing).
_joined = _computing = False


def run() -> int:
    """The CLI body; returns the exit status. Every flag is checked before any device or model exists."""
    global _joined, _computing
    from mixtral_jax import distributed, plan

    _check_flags()
    try:
        from mixtral_jax.config import load_config

        cfg = load_config(FLAGS.checkpoint or FLAGS.config)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    if FLAGS.mesh:
        _check_mesh(cfg)
    if FLAGS.dry_run:
        return dry_run()
    tok = load_tokenizer(preset_for(cfg.vocab_size))
    prompts = _prompts(tok, cfg)
    n = plan.mesh_size(FLAGS.mesh)
    multi_process = distributed.requested(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if multi_process:
        distributed.supervise(FLAGS.process_id, FLAGS.num_processes)  # returns in the supervised child only
        _joined = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif n > 1:
        _check_virtual_devices(n)
        # On a CPU host, a mesh larger than one device runs on virtual devices (a no-op on TPU/GPU).
        plan.ensure_virtual_devices(n)

    import jax
    import numpy as np

    import mixtral_jax as mj
    from mixtral_jax import cpu_kernel

    if FLAGS.mesh and n != jax.device_count():
        raise UsageError(f"--mesh {FLAGS.mesh} needs {n} devices but this run has {jax.device_count()} "
                         f"({jax.process_count()} process(es) x {jax.local_device_count()} "
                         f"{jax.default_backend()} devices); make the axis sizes multiply to {jax.device_count()}.")
    on_cpu = jax.default_backend() == "cpu"
    dtype = FLAGS.dtype or ("float32" if on_cpu else "bfloat16")
    mesh = mj.make_mesh(FLAGS.mesh) if FLAGS.mesh else None
    is_main = jax.process_index() == 0
    # --json: stdout carries the one JSON line only; the header goes to stderr and progress is quiet.
    say = print if is_main and not FLAGS.json else (lambda *a, **k: None)
    progress = ((lambda msg: print(f"[mixtral_jax] {msg}", file=sys.stderr, flush=True))
                if is_main and not FLAGS.json else (lambda msg: None))

    expert_dtype = FLAGS.expert_dtype
    if (expert_dtype is None and not FLAGS.quantize and FLAGS.checkpoint and on_cpu and mesh is None
            and dtype == "float32" and cfg.dtype == "bfloat16" and cpu_kernel.available()):
        # The stored values are bfloat16 already: keeping the experts so loses nothing, and the
        # kernel reads half the bytes (without it XLA would widen them at every step, slowly).
        expert_dtype = "bfloat16"
    _check_fits(cfg, dtype, 1 if mesh is None else mesh.size, mesh is not None, expert_dtype, FLAGS.quantize)
    _computing = multi_process
    t_build = time.perf_counter()
    if FLAGS.checkpoint:
        model = mj.load(FLAGS.checkpoint, dtype=dtype, mesh=mesh, expert_dtype=expert_dtype,
                        verify=FLAGS.verify_checkpoint, quantize=FLAGS.quantize)
        source = f"weights from {FLAGS.checkpoint}"
    else:
        progress(f"initialising random {cfg.name} weights ...")
        model = mj.init_random(cfg, seed=FLAGS.seed, dtype=dtype, mesh=mesh, expert_dtype=expert_dtype,
                               quantize=FLAGS.quantize)
        source = "RANDOM weights (no --checkpoint): the text below is noise, not a real model's output"
    if on_cpu and mesh is None:
        cpu_kernel.available()  # builds the CPU kernel now (once), or says here why it cannot
    experts_note = ("" if model.expert_dtype == model.dtype
                    else f" (quantized {model.quantization})" if model.quantization
                    else f" (experts kept in {np.dtype(model.expert_dtype).name})")
    header = (f"[mixtral_jax] {cfg.name}: {source}; {dtype}{experts_note} on {jax.device_count()} "
              f"{jax.default_backend()} device(s){' mesh ' + FLAGS.mesh if FLAGS.mesh else ''}.")
    if is_main:
        print(header, file=sys.stderr if FLAGS.json else sys.stdout, flush=True)
    progress(f"weights ready in {time.perf_counter() - t_build:.1f} s; compiling and generating ...")

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
                                          FLAGS.top_k, FLAGS.seed, capacity_factor=FLAGS.capacity_factor,
                                          prefill_chunk=FLAGS.prefill_chunk):
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
    if FLAGS.json and is_main:
        print(json.dumps({"tokens": outs, "text": texts, "prompt_tokens": [len(p) for p in prompts],
                          "new_tokens": new_tokens, "time_to_first_token_s": ttft, "decode_tokens_per_s": rate,
                          "random_weights": FLAGS.checkpoint is None}), flush=True)
    return 0


def main(argv):
    from mixtral_jax import distributed

    # No "no TPU found" or distributed start-up chatter on stderr.
    for name in ("jax._src.xla_bridge", "jax._src.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}; flags look like --prompt 'text'.", file=sys.stderr)
        sys.exit(2)
    if FLAGS.json:
        absl_logging.set_verbosity(absl_logging.WARNING)  # progress lines stay out of machine-read runs
    try:
        status = run()
    except (UsageError, ValueError, FileNotFoundError) as e:
        from mixtral_jax import CheckpointError

        maybe_lost = _computing and not isinstance(e, (UsageError, CheckpointError, FileNotFoundError))
        message, status = f"error: {e}", 1 if maybe_lost else 2
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        os._exit(130)
    except Exception:
        if not _joined:
            raise
        import traceback

        message, status, maybe_lost = traceback.format_exc().rstrip(), 1, _computing
    else:
        sys.exit(status)
    if _joined:  # a multi-process run: skip JAX's shutdown, which would wait for the other processes
        distributed.exit_after_error(message, status, maybe_lost)
    print(message, file=sys.stderr)
    sys.exit(status)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
