"""The measurement: both sides on the same weights, warmed up, then timed in alternating rounds."""

from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

import mixtral_jax as mj
from mixtral_jax.bench import host, metrics
from mixtral_jax.bench.settings import DENSE_MAX_NEW_TOKENS, Settings, UsageError, decode_new_tokens
from mixtral_jax.config import from_hf_dict


def _ours_run(model, prompts, n: int, strategy: str | None = None) -> tuple[float, float, Any]:
    """One mixtral_jax generation, all rows to the end.

    Returns:
      (seconds to the first token, seconds from the first to the last token, new tokens int [B, n]).
    """
    kwargs = {} if strategy is None else {"strategy": strategy}
    t0 = time.perf_counter()
    stamps, steps = [], []
    for step_tokens in mj.generate_stream(model, prompts, max_new_tokens=n, stop_tokens=[], **kwargs):
        stamps.append(time.perf_counter())
        steps.append(step_tokens)
    return stamps[0] - t0, stamps[-1] - stamps[0], np.stack(steps, axis=1)


def _theirs_run(hf, prompts, n: int) -> tuple[float, Any]:
    """One transformers greedy generation of exactly n tokens: (seconds, new tokens int [B, n])."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          min_new_tokens=n, pad_token_id=0)
    return time.perf_counter() - t0, out[:, ids.shape[1]:].numpy()


def _random_prompts(rng, batch: int, length: int, vocab: int) -> list[list[int]]:
    # Ids from 3 up: 0-2 are the special tokens of Mistral's vocabulary.
    return rng.integers(3, vocab, size=(batch, length)).tolist()


def _compile_counts() -> dict[str, int]:
    """Compiled shapes held by each jitted function of mixtral_jax.generate (private jax counter)."""
    gen = importlib.import_module("mixtral_jax.generate")
    return {name: fn._cache_size() for name, fn in sorted(vars(gen).items()) if hasattr(fn, "_cache_size")}


# ---------------------------------------------------------------------------------------------
# Set-up: checkpoints and models.


def say(message: str) -> None:
    """One progress line on stderr."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _check_resources(cfg, dtype: str, workdir: str) -> None:
    """Refuses, in one sentence, a model whose weights do not fit this host's memory or the workdir's disk."""
    weights = mj.param_bytes(cfg, dtype)["total"]
    # Peak: our weights + transformers' weights, plus one more copy while the HF model is created and saved.
    need, have = 3 * weights, host.meminfo_bytes("MemAvailable")
    if have is not None and need > 0.9 * have:
        raise UsageError(f"this model needs about {need / 1e9:.1f} GB of host memory but {have / 1e9:.1f} GB is "
                         "available; choose a smaller model (e.g. fewer --num_layers or a smaller --hidden_size).")
    free = shutil.disk_usage(workdir).free
    if 2 * weights > free:  # the HF checkpoint and its conversion
        raise UsageError(f"the two checkpoints need {2 * weights / 1e9:.1f} GB of disk but {workdir} has "
                         f"{free / 1e9:.1f} GB free; pass --workdir on a larger disk.")


def _prepare_checkpoints(settings: Settings, workdir: str) -> tuple[str, str, dict[str, float]]:
    """Writes (or reuses) the HF checkpoint and its conversion in `workdir`: (hf_dir, ckpt_dir, seconds)."""
    import torch
    import transformers

    hf_dir, ckpt_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "converted")
    marker = os.path.join(workdir, "bench_spec.json")
    spec = {"hf_fields": settings.hf_fields, "dtype": settings.stored_dtype, "seed": settings.seed}
    times = {}
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                say(f"reusing the checkpoints in {workdir}")
                return hf_dir, ckpt_dir, times
    for path in (hf_dir, ckpt_dir, marker):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    t0 = time.perf_counter()
    torch.manual_seed(settings.seed)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**settings.hf_fields))
    hf.to(getattr(torch, settings.stored_dtype)).save_pretrained(hf_dir)
    del hf
    times["write_hf_s"] = time.perf_counter() - t0
    say(f"wrote the HF checkpoint in {times['write_hf_s']:.1f} s")
    t0 = time.perf_counter()
    mj.convert_hf_checkpoint(hf_dir, ckpt_dir, dtype=settings.stored_dtype)
    times["convert_s"] = time.perf_counter() - t0
    say(f"converted it in {times['convert_s']:.1f} s")
    with open(marker, "w") as f:
        json.dump(spec, f)
    return hf_dir, ckpt_dir, times


# ---------------------------------------------------------------------------------------------
# The measurement.


class Samples:
    """Named lists of timing samples."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def median(self, name: str) -> float | None:
        return metrics.median(self.values.get(name, []))


class CompileClock:
    """Seconds jax spends tracing, lowering and compiling, from its jax.monitoring compile events."""

    def __init__(self):
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration

    def close(self) -> None:
        jax.monitoring.unregister_event_duration_listener(self._record)


class Sides:
    """Both sides loaded on the same weights, the prompts, and one method per timed call.

    Every method records its samples and returns its new tokens, so the
    warm-up call also yields the tokens that the correctness and routing
    statistics use (greedy: every later call produces the same).
    """

    def __init__(self, settings: Settings, model, hf, vocab_size: int):
        self.model, self.hf = model, hf
        rng = np.random.default_rng(settings.seed)
        self.prefill_prompt = _random_prompts(rng, 1, settings.prompt_len, vocab_size)
        self.decode_prompts = {b: _random_prompts(rng, b, settings.decode_prompt_len, vocab_size)
                               for b in settings.batch_sizes}
        self.new = {b: decode_new_tokens(b, settings.new_tokens) for b in settings.batch_sizes}
        self.dense_new = min(settings.new_tokens, DENSE_MAX_NEW_TOKENS)
        self.samples = Samples()

    def ours_prefill(self):
        ttft, _, tokens = _ours_run(self.model, self.prefill_prompt, 1)
        self.samples.add("prefill/ours", ttft)
        return tokens

    def theirs_prefill(self):
        seconds, tokens = _theirs_run(self.hf, self.prefill_prompt, 1)
        self.samples.add("prefill/theirs", seconds)
        return tokens

    def ours_decode(self, b: int):
        _, span, tokens = _ours_run(self.model, self.decode_prompts[b], self.new[b])
        self.samples.add(f"decode{b}/ours", span)
        return tokens

    def ours_dense(self):
        _, span, tokens = _ours_run(self.model, self.decode_prompts[1], self.dense_new, strategy="dense")
        self.samples.add("dense/ours", span)
        return tokens

    def theirs_decode(self, b: int):
        t_n, tokens = _theirs_run(self.hf, self.decode_prompts[b], self.new[b])
        self.samples.add(f"decode{b}/theirs_n", t_n)
        self.samples.add(f"decode{b}/theirs_1", _theirs_run(self.hf, self.decode_prompts[b], 1)[0])
        return tokens

    def measurements(self) -> list[tuple[str, Callable, Callable | None]]:
        """(name, ours, theirs or None) for every measurement, in run order."""
        theirs = (lambda fn: fn) if self.hf is not None else (lambda fn: None)
        out = [("prefill", self.ours_prefill, theirs(self.theirs_prefill))]
        out += [(f"decode{b}", functools.partial(self.ours_decode, b), theirs(functools.partial(self.theirs_decode, b)))
                for b in self.new]
        return out + [("dense", self.ours_dense, None)]


def _load_sides(settings: Settings, workdir: str) -> tuple[Any, Any, dict[str, float]]:
    """(our model, the transformers model or None, set-up seconds)."""
    import torch
    import transformers

    hf_dir, ckpt_dir, setup = _prepare_checkpoints(settings, workdir)
    t0 = time.perf_counter()
    model = mj.load(ckpt_dir, dtype=settings.dtype, expert_dtype=settings.expert_dtype)
    setup["load_ours_s"] = time.perf_counter() - t0
    hf = None
    if not settings.skip_transformers:
        t0 = time.perf_counter()
        hf = transformers.MixtralForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, settings.dtype)).eval()
        setup["load_transformers_s"] = time.perf_counter() - t0
    say("loaded both sides" if hf is not None else "loaded mixtral_jax")
    return model, hf, setup


def run_benchmark(settings: Settings, workdir: str) -> dict[str, Any]:
    """Sets up both sides, warms up, runs the alternating timed rounds and derives the results."""
    import torch
    import transformers

    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    load_start = os.getloadavg()
    cfg = from_hf_dict(settings.hf_fields, name="bench")
    _check_resources(cfg, settings.dtype, workdir)
    model, hf, setup = _load_sides(settings, workdir)
    sides = Sides(settings, model, hf, cfg.vocab_size)
    measurements = sides.measurements()
    probe = host.HostProbe(settings.bandwidth_bytes)

    clock = CompileClock()
    counts = {"start": _compile_counts()}
    say("warm-up (compiles every shape once)")
    warm, compile_s = {}, {}
    for name, ours, theirs in measurements:
        before = clock.seconds
        warm[name, "ours"] = ours()
        compile_s[name] = clock.seconds - before
        if theirs is not None:
            warm[name, "theirs"] = theirs()
    counts["after_warmup"] = _compile_counts()
    sides.samples.values.clear()  # warm-up samples include compilation

    timed_compile_start = clock.seconds
    other = host.OtherLoad()
    for rep in range(settings.repeats):
        say(f"timed round {rep + 1}/{settings.repeats} (load average {os.getloadavg()[0]:.2f})")
        for _, ours, theirs in measurements:
            host.wait_quiet(settings.quiet_wait_s)
            # The host reference is sampled next to every measurement: its median sees the same load.
            bandwidth, kernel_bandwidth, gflops = probe.sample()
            sides.samples.add("host/matvec_gb_s", bandwidth)
            if kernel_bandwidth is not None:
                sides.samples.add("host/kernel_gb_s", kernel_bandwidth)
            sides.samples.add("host/matmul_gflop_s", gflops)
            # Alternate which side goes first, so drift in the machine's load favours neither.
            for call in ((ours, theirs) if rep % 2 == 0 else (theirs, ours)):
                if call is not None:
                    call()
    counts["end"] = _compile_counts()
    other_cores = other.cores()
    timed_compile_s = clock.seconds - timed_compile_start
    clock.close()

    # Experts touched: router choices over the warm-up's decoded sequences (greedy, so every run's).
    touched = {}
    for b in settings.batch_sizes:
        tokens = np.concatenate([np.asarray(sides.decode_prompts[b]), warm[f"decode{b}", "ours"]], axis=1)
        touched[b] = metrics.experts_touched(mj.expert_routing(model, tokens).experts, settings.decode_prompt_len,
                                             sides.new[b] - 1)

    med = sides.samples.median
    matvec, kernel, matmul = med("host/matvec_gb_s"), med("host/kernel_gb_s"), med("host/matmul_gflop_s")
    bandwidth = max(matvec, kernel or 0.0)  # the host's streaming-read rate: the faster way of reading
    active_bytes = metrics.active_bytes_per_token(cfg, settings.dtype, model.expert_dtype)
    roofline = bandwidth * 1e9 / active_bytes
    # transformers holds every weight in `dtype`.
    theirs_roofline = bandwidth * 1e9 / metrics.active_bytes_per_token(cfg, settings.dtype)
    prefill_ours = settings.prompt_len / med("prefill/ours")
    prefill_theirs = settings.prompt_len / med("prefill/theirs") if hf is not None else None
    useful = metrics.prefill_useful_flops(cfg, settings.prompt_len)

    decode = []
    for b, n in sides.new.items():
        ours_rate = (n - 1) * b / med(f"decode{b}/ours")
        theirs_rate, match = None, (None, None)
        if hf is not None:
            step_s = med(f"decode{b}/theirs_n") - med(f"decode{b}/theirs_1")
            theirs_rate = (n - 1) * b / step_s if step_s > 0 else None  # None: noise swamped the difference
            match = metrics.tokens_agree(warm[f"decode{b}", "ours"], warm[f"decode{b}", "theirs"], cfg.eos_token_id)
        decode.append({"batch": b, "new_tokens": n, "ours_tok_s": ours_rate, "theirs_tok_s": theirs_rate,
                       "ratio": metrics.ratio(ours_rate, theirs_rate), "experts_touched": touched[b],
                       "tokens_match": match[0], "tokens_compared": match[1], "compile_s": compile_s[f"decode{b}"]})
    sparse_rate = decode[0]["ours_tok_s"]  # batch sizes are sorted and include 1
    dense_rate = (sides.dense_new - 1) / med("dense/ours")

    return {
        "model": {"hf_config": settings.hf_fields, "dtype": settings.dtype, "layout": model.layout,
                  "checkpoint_dtype": settings.stored_dtype, "expert_dtype": str(np.dtype(model.expert_dtype)),
                  **mj.param_count(cfg), "active_bytes_per_token": active_bytes},
        "host": {"read_gb_s": bandwidth, "matvec_gb_s": matvec, "kernel_gb_s": kernel,
                 "matvec_weight_mb": probe.weight_bytes / 1e6, "matmul_gflop_s": matmul,
                 "matmul_shape": list(host.MATMUL_SHAPE), "loadavg_start": list(load_start),
                 "loadavg_end": list(os.getloadavg()), "other_processes_cores": other_cores},
        "prefill": {"prompt_len": settings.prompt_len, "ours_tok_s": prefill_ours, "theirs_tok_s": prefill_theirs,
                    "ratio": metrics.ratio(prefill_ours, prefill_theirs), "useful_gflop": useful / 1e9,
                    "ours_useful_gflop_s": useful / med("prefill/ours") / 1e9,
                    "matmul_fraction": useful / med("prefill/ours") / 1e9 / matmul, "compile_s": compile_s["prefill"]},
        "decode": decode,
        "decode_prompt_len": settings.decode_prompt_len,
        "roofline": {"tok_s": roofline, "fraction": metrics.ratio(sparse_rate, roofline),
                     "theirs_tok_s": theirs_roofline,
                     "theirs_fraction": metrics.ratio(decode[0]["theirs_tok_s"], theirs_roofline)},
        "sparse_gain": {"sparse_tok_s": sparse_rate, "dense_tok_s": dense_rate, "dense_new_tokens": sides.dense_new,
                        "gain": metrics.ratio(sparse_rate, dense_rate), "dense_compile_s": compile_s["dense"]},
        "tokens_match": decode[0]["tokens_match"],
        "compile_counts": counts,
        "recompiles_during_timed_runs": sum(counts["end"].values()) - sum(counts["after_warmup"].values()),
        "compile_s_during_timed_runs": timed_compile_s,
        "transformers": None if hf is None else {
            "attn_implementation": hf.config._attn_implementation,
            "experts_implementation": getattr(hf.config, "_experts_implementation", None),
            "torch_threads": torch.get_num_threads()},
        "repeats": settings.repeats,
        "samples": sides.samples.values,  # every timed sample: seconds, but host/* in the unit its name says
        "setup_s": setup,
        "jax_backend": jax.default_backend(),
    }
