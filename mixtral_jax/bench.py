"""`python -m mixtral_jax.bench`: mixtral_jax against transformers on the same Mixtral weights.

Writes a random-weight Hugging Face `MixtralForCausalLM` of the stated size,
converts it with `convert_hf_checkpoint`, loads it both ways and measures, in
one run with the two sides alternating: prefill tokens/s, decode tokens/s at
several batch sizes, and (ours only) decode with every expert computed. It
also measures this host's float32 streaming-read bandwidth (an XLA matvec and
the CPU MoE kernel, the faster counts) and XLA matmul rate, and
derives the decode roofline fraction and prefill efficiency from them. The
table is printed and, unless `--out_dir ''`, written to
`OUT_DIR/benchmarks.md` with a plot in `OUT_DIR/benchmarks.png`.

This module only calls the library (and transformers); it holds no model logic.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app, flags

FLAGS = flags.FLAGS

# --quick: every flag here that is not given explicitly takes this value.
QUICK = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=8,
             top_k=2, vocab_size=512, prompt_len=32, decode_prompt_len=8, new_tokens=8, batch_sizes=["1", "4"],
             repeats=1)

# Issue 5's targets for the default model, float32, on a 2-core CPU (informative for other sizes).
TARGETS = {"decode_ratio": 1.5, "roofline_fraction": 0.75, "prefill_ratio": 1.2, "prefill_matmul_fraction": 0.70,
           "sparse_gain": 3.0}

# Host probe: x[1, D] @ W[D, N] with W larger than this machine's 260 MiB L3, so it streams from DRAM.
BANDWIDTH_BYTES = 470_000_000
QUICK_BANDWIDTH_BYTES = 64_000_000
MATMUL_SHAPE = (512, 1024, 3584)  # [M, K] x [K, N], the shape of a 512-token expert matmul
PROBE_CALLS = 5  # calls per host-probe sample; the sample is their median
QUIET_WAIT_S = 20.0  # longest wait for a quiet machine before each timed measurement (not with --quick)
DENSE_MAX_NEW_TOKENS = 16  # computing all experts is slow; its rate needs few steps
MIN_DECODE_TOKENS = 8  # bounded decode runs still time at least 7 steps

EXIT_USAGE = 2


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


# ---------------------------------------------------------------------------------------------
# Pure helpers (unit-tested).


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


def active_bytes_per_token(cfg, dtype, expert_dtype=None) -> int:
    """Weight bytes one decode token reads: the active parameters minus the embedding table.

    The embedding is a gather of one row per token; every other active weight
    (attention, router, the top-k experts, norms, the whole lm_head) is read in full.

    Args:
      cfg: a `MixtralConfig`.
      dtype: the parameters' dtype ("float32").
      expert_dtype: the experts' dtype, if not `dtype` ("bfloat16" with load(expert_dtype=...)).

    Returns:
      Bytes per token at batch 1.
    """
    import numpy as np

    from mixtral_jax import model

    embed = cfg.vocab_size * cfg.hidden_size * np.dtype(dtype).itemsize
    return model.param_bytes(cfg, dtype, expert_dtype)["active"] - embed


def prefill_useful_flops(cfg, tokens: int) -> int:
    """FLOPs a prefill of `tokens` (batch 1) must do to produce the next token.

    2 × active weights per token for every layer weight (embedding excluded),
    and causal attention: scores and values, 2 × 2 × H × Dh per (query,
    visible key) pair. Only the last token's logits are needed, so the lm_head
    runs for it alone, and so does the last layer, except for its attention
    norm and key/value projections (the cache needs every position's keys and
    values).

    Args:
      cfg: a `MixtralConfig`.
      tokens: prompt length.

    Returns:
      The FLOP count.
    """
    import mixtral_jax as mj

    lm_head = cfg.vocab_size * cfg.hidden_size
    layers = cfg.num_hidden_layers
    final_norm = cfg.hidden_size
    per_layer = (mj.param_count(cfg)["active"] - cfg.vocab_size * cfg.hidden_size - lm_head - final_norm) // layers
    kv = cfg.hidden_size + 2 * cfg.hidden_size * cfg.num_key_value_heads * cfg.head_dim  # norm + wk, wv
    visible = [t + 1 if cfg.sliding_window is None else min(t + 1, cfg.sliding_window) for t in range(tokens)]
    pair_flops = 4 * cfg.num_attention_heads * cfg.head_dim
    weights = (2 * per_layer * tokens * (layers - 1) + 2 * kv * tokens + 2 * (per_layer - kv)
               + 2 * final_norm + 2 * lm_head)
    return weights + pair_flops * (sum(visible) * (layers - 1) + visible[-1])


def experts_touched(experts, start: int, steps: int) -> float:
    """Mean number of distinct experts a decode step's tokens choose, over layers and steps.

    Args:
      experts: int [L, B, T, k] router choices (from `mj.expert_routing`) of the decoded sequences.
      start: position of the first decode step's input token (the prompt length).
      steps: decode steps (new tokens - 1: the last new token is never fed back).

    Returns:
      The mean over the L × steps (layer, step) pairs of the number of distinct
      ids among that step's B × k choices.
    """
    import numpy as np

    chosen = np.asarray(experts)[:, :, start:start + steps, :]  # [L, B, S, k]
    num_layers, batch, num_steps, k = chosen.shape
    per_step = chosen.transpose(0, 2, 1, 3).reshape(num_layers * num_steps, batch * k)
    return float(np.mean([len(np.unique(row)) for row in per_step]))


def tokens_agree(ours, theirs, eos: int) -> tuple[bool, int]:
    """Whether greedy tokens agree, compared up to each row's first EOS in ours.

    transformers' `min_new_tokens` masks EOS until the end, which changes its
    argmax only at a step where EOS wins; ours (stop_tokens=[]) keeps EOS. So the
    rows are compared up to (excluding) our first EOS.

    Args:
      ours, theirs: int [B, N] new tokens.
      eos: the EOS id.

    Returns:
      (all compared tokens equal, number of tokens compared).
    """
    import numpy as np

    ours, theirs = np.asarray(ours), np.asarray(theirs)
    equal, compared = True, 0
    for row_ours, row_theirs in zip(ours, theirs):
        stop = int(np.argmax(row_ours == eos)) if (row_ours == eos).any() else len(row_ours)
        equal &= bool((row_ours[:stop] == row_theirs[:stop]).all())
        compared += stop
    return equal, compared


def _median(values):
    return statistics.median(values) if values else None


def _ratio(a, b):
    return a / b if a is not None and b else None


# ---------------------------------------------------------------------------------------------
# Machine facts and load.


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _l3_cache() -> str | None:
    """The L3 cache size as the kernel states it (e.g. "266240K"), or None."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            return f.read().strip()
    except OSError:
        return None


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _busy_cpu_seconds() -> float | None:
    """Whole-machine non-idle CPU seconds since boot (steal included), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """CPU cores kept busy by everything except this process over a window (noise indicator)."""

    def __init__(self):
        self.start = (time.perf_counter(), _busy_cpu_seconds(), self._own())

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def cores(self) -> float | None:
        wall0, busy0, own0 = self.start
        busy1 = _busy_cpu_seconds()
        if busy0 is None or busy1 is None:
            return None
        return max(0.0, (busy1 - busy0) - (self._own() - own0)) / (time.perf_counter() - wall0)


def machine_facts() -> dict[str, Any]:
    """nproc, CPU model, L3 size, memory and the versions that matter."""
    import jax
    import torch
    import transformers

    mem = _meminfo_bytes("MemTotal")
    return {"nproc": os.cpu_count(), "cpu": _cpu_model(), "l3_cache": _l3_cache(),
            "memory_gib": None if mem is None else round(mem / 2**30, 1), "python": platform.python_version(),
            "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


# ---------------------------------------------------------------------------------------------
# Host reference rates.


class HostProbe:
    """This host's float32 streaming-read bandwidth and XLA matmul rate.

    Bandwidth is measured two ways on a weight bigger than the L3 cache: an XLA
    matvec, and (where it is built) the CPU MoE kernel on one row, one expert
    of the same total size. The roofline uses the faster of the two.
    """

    def __init__(self, weight_bytes: int):
        import jax
        import jax.numpy as jnp

        from mixtral_jax import cpu_kernel

        self.weight_bytes = weight_bytes // (4 * 1024) * 4 * 1024
        n = self.weight_bytes // (4 * 1024)
        k_w, k_x, k_a, k_b = jax.random.split(jax.random.key(0), 4)
        self.w = jax.random.normal(k_w, (1024, n), jnp.float32)
        self.x = jax.random.normal(k_x, (1, 1024), jnp.float32)
        m, k, n_mm = MATMUL_SHAPE
        self.a = jax.random.normal(k_a, (m, k), jnp.float32)
        self.b = jax.random.normal(k_b, (k, n_mm), jnp.float32)
        self.matmul_flops = 2 * m * k * n_mm
        self.product = jax.jit(lambda x, w: x @ w)
        self.kernel = None
        if cpu_kernel.usable(self.x):
            f = self.weight_bytes // (3 * 4 * 1024)  # w1, w3 [F, 1024] and w2 [1024, F]
            expert = {name: jax.random.normal(jax.random.fold_in(k_w, i), shape, jnp.float32)
                      for i, (name, shape) in enumerate((("w1", (f, 1024)), ("w3", (f, 1024)), ("w2", (1024, f))))}
            self.kernel_bytes = 3 * f * 1024 * 4
            self.kernel = jax.jit(lambda x, g, e: cpu_kernel.moe_cpu(x, g, [e]))
            self.kernel_args = (self.x, jnp.ones((1,), jnp.int32), expert)  # one group: the one row
        self.sample()  # compiles every shape

    def _time(self, fn, *args) -> float:
        import jax

        times = []
        for _ in range(PROBE_CALLS):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def sample(self) -> tuple[float, float | None, float]:
        """One sample: (XLA matvec GB/s, kernel GB/s or None, matmul GFLOP/s), each a median of PROBE_CALLS."""
        gb_s = self.weight_bytes / self._time(self.product, self.x, self.w) / 1e9
        kernel_gb_s = None if self.kernel is None else self.kernel_bytes / self._time(self.kernel, *self.kernel_args) / 1e9
        return gb_s, kernel_gb_s, self.matmul_flops / self._time(self.product, self.a, self.b) / 1e9


# ---------------------------------------------------------------------------------------------
# The two sides.


def _ours_run(model, prompts, n: int, strategy: str | None = None) -> tuple[float, float, Any]:
    """One mixtral_jax generation, all rows to the end.

    Returns:
      (seconds to the first token, seconds from the first to the last token, new tokens int [B, n]).
    """
    import numpy as np

    import mixtral_jax as mj

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
    import importlib

    gen = importlib.import_module("mixtral_jax.generate")
    return {name: fn._cache_size() for name, fn in sorted(vars(gen).items()) if hasattr(fn, "_cache_size")}


# ---------------------------------------------------------------------------------------------
# Set-up: checkpoints and models.


def _say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _check_resources(cfg, dtype: str, workdir: str) -> None:
    """Refuses, in one sentence, a model whose weights do not fit this host's memory or the workdir's disk."""
    import mixtral_jax as mj

    weights = mj.param_bytes(cfg, dtype)["total"]
    # Peak: our weights + transformers' weights, plus one more copy while the HF model is created and saved.
    need, have = 3 * weights, _meminfo_bytes("MemAvailable")
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

    import mixtral_jax as mj

    hf_dir, ckpt_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "converted")
    marker = os.path.join(workdir, "bench_spec.json")
    spec = {"hf_fields": settings.hf_fields, "dtype": settings.stored_dtype, "seed": settings.seed}
    times = {}
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == spec:
                _say(f"reusing the checkpoints in {workdir}")
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
    _say(f"wrote the HF checkpoint in {times['write_hf_s']:.1f} s")
    t0 = time.perf_counter()
    mj.convert_hf_checkpoint(hf_dir, ckpt_dir, dtype=settings.stored_dtype)
    times["convert_s"] = time.perf_counter() - t0
    _say(f"converted it in {times['convert_s']:.1f} s")
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
        return _median(self.values.get(name, []))


class CompileClock:
    """Seconds jax spends tracing, lowering and compiling, from its jax.monitoring compile events."""

    def __init__(self):
        import jax

        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            self.seconds += duration

    def close(self) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._record)


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.1) -> None:
    """Waits (up to max_wait_s) until other processes use under threshold_cores of CPU."""
    deadline = time.perf_counter() + max_wait_s
    while time.perf_counter() < deadline:
        window = OtherLoad()
        time.sleep(0.5)
        cores = window.cores()
        if cores is None or cores < threshold_cores:
            return


class Sides:
    """Both sides loaded on the same weights, the prompts, and one method per timed call.

    Every method records its samples and returns its new tokens, so the
    warm-up call also yields the tokens that the correctness and routing
    statistics use (greedy: every later call produces the same).
    """

    def __init__(self, settings: Settings, model, hf, vocab_size: int):
        import numpy as np

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

    import mixtral_jax as mj

    hf_dir, ckpt_dir, setup = _prepare_checkpoints(settings, workdir)
    t0 = time.perf_counter()
    model = mj.load(ckpt_dir, dtype=settings.dtype, expert_dtype=settings.expert_dtype)
    setup["load_ours_s"] = time.perf_counter() - t0
    hf = None
    if not settings.skip_transformers:
        t0 = time.perf_counter()
        hf = transformers.MixtralForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, settings.dtype)).eval()
        setup["load_transformers_s"] = time.perf_counter() - t0
    _say("loaded both sides" if hf is not None else "loaded mixtral_jax")
    return model, hf, setup


def run_benchmark(settings: Settings, workdir: str) -> dict[str, Any]:
    """Sets up both sides, warms up, runs the alternating timed rounds and derives the results."""
    import jax
    import numpy as np
    import torch
    import transformers

    import mixtral_jax as mj
    from mixtral_jax.config import from_hf_dict

    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    load_start = os.getloadavg()
    cfg = from_hf_dict(settings.hf_fields, name="bench")
    _check_resources(cfg, settings.dtype, workdir)
    model, hf, setup = _load_sides(settings, workdir)
    sides = Sides(settings, model, hf, cfg.vocab_size)
    measurements = sides.measurements()
    probe = HostProbe(settings.bandwidth_bytes)

    clock = CompileClock()
    counts = {"start": _compile_counts()}
    _say("warm-up (compiles every shape once)")
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
    other = OtherLoad()
    for rep in range(settings.repeats):
        _say(f"timed round {rep + 1}/{settings.repeats} (load average {os.getloadavg()[0]:.2f})")
        for _, ours, theirs in measurements:
            wait_quiet(settings.quiet_wait_s)
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
        touched[b] = experts_touched(mj.expert_routing(model, tokens).experts, settings.decode_prompt_len,
                                     sides.new[b] - 1)

    med = sides.samples.median
    matvec, kernel, matmul = med("host/matvec_gb_s"), med("host/kernel_gb_s"), med("host/matmul_gflop_s")
    bandwidth = max(matvec, kernel or 0.0)  # the host's streaming-read rate: the faster way of reading
    active_bytes = active_bytes_per_token(cfg, settings.dtype, model.expert_dtype)
    roofline = bandwidth * 1e9 / active_bytes
    theirs_roofline = bandwidth * 1e9 / active_bytes_per_token(cfg, settings.dtype)  # transformers holds `dtype` weights
    prefill_ours = settings.prompt_len / med("prefill/ours")
    prefill_theirs = settings.prompt_len / med("prefill/theirs") if hf is not None else None
    useful = prefill_useful_flops(cfg, settings.prompt_len)

    decode = []
    for b, n in sides.new.items():
        ours_rate = (n - 1) * b / med(f"decode{b}/ours")
        theirs_rate, match = None, (None, None)
        if hf is not None:
            step_s = med(f"decode{b}/theirs_n") - med(f"decode{b}/theirs_1")
            theirs_rate = (n - 1) * b / step_s if step_s > 0 else None  # None: noise swamped the difference
            match = tokens_agree(warm[f"decode{b}", "ours"], warm[f"decode{b}", "theirs"], cfg.eos_token_id)
        decode.append({"batch": b, "new_tokens": n, "ours_tok_s": ours_rate, "theirs_tok_s": theirs_rate,
                       "ratio": _ratio(ours_rate, theirs_rate), "experts_touched": touched[b],
                       "tokens_match": match[0], "tokens_compared": match[1], "compile_s": compile_s[f"decode{b}"]})
    sparse_rate = decode[0]["ours_tok_s"]  # batch sizes are sorted and include 1
    dense_rate = (sides.dense_new - 1) / med("dense/ours")

    return {
        "model": {"hf_config": settings.hf_fields, "dtype": settings.dtype, "layout": model.layout,
                  "checkpoint_dtype": settings.stored_dtype, "expert_dtype": str(np.dtype(model.expert_dtype)),
                  **mj.param_count(cfg), "active_bytes_per_token": active_bytes},
        "host": {"read_gb_s": bandwidth, "matvec_gb_s": matvec, "kernel_gb_s": kernel,
                 "matvec_weight_mb": probe.weight_bytes / 1e6, "matmul_gflop_s": matmul,
                 "matmul_shape": list(MATMUL_SHAPE), "loadavg_start": list(load_start),
                 "loadavg_end": list(os.getloadavg()), "other_processes_cores": other_cores},
        "prefill": {"prompt_len": settings.prompt_len, "ours_tok_s": prefill_ours, "theirs_tok_s": prefill_theirs,
                    "ratio": _ratio(prefill_ours, prefill_theirs), "useful_gflop": useful / 1e9,
                    "ours_useful_gflop_s": useful / med("prefill/ours") / 1e9,
                    "matmul_fraction": useful / med("prefill/ours") / 1e9 / matmul, "compile_s": compile_s["prefill"]},
        "decode": decode,
        "decode_prompt_len": settings.decode_prompt_len,
        "roofline": {"tok_s": roofline, "fraction": _ratio(sparse_rate, roofline),
                     "theirs_tok_s": theirs_roofline,
                     "theirs_fraction": _ratio(decode[0]["theirs_tok_s"], theirs_roofline)},
        "sparse_gain": {"sparse_tok_s": sparse_rate, "dense_tok_s": dense_rate, "dense_new_tokens": sides.dense_new,
                        "gain": _ratio(sparse_rate, dense_rate), "dense_compile_s": compile_s["dense"]},
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
        "targets": TARGETS,
    }


# ---------------------------------------------------------------------------------------------
# Report.


def _fmt(value, spec: str = ".1f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def _times(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _verdict(value, target) -> str:
    return "" if value is None else (" ✓" if value >= target else " ✗")


def render_table(r: dict[str, Any]) -> str:
    """The results as markdown: the speed table, then the derived numbers."""
    t, p, host = r["targets"], r["prefill"], r["host"]
    lines = ["| measurement | mixtral_jax | transformers | ratio | target |", "|---|---:|---:|---:|---|",
             f"| prefill tok/s ({p['prompt_len']}-token prompt, batch 1) | {_fmt(p['ours_tok_s'])} | "
             f"{_fmt(p['theirs_tok_s'])} | {_times(p['ratio'])}{_verdict(p['ratio'], t['prefill_ratio'])} | "
             f"≥ {t['prefill_ratio']}× |"]
    for d in r["decode"]:
        target = f"≥ {t['decode_ratio']}×" if d["batch"] == 1 else ""
        verdict = _verdict(d["ratio"], t["decode_ratio"]) if d["batch"] == 1 else ""
        lines.append(f"| decode tok/s, batch {d['batch']} ({r['decode_prompt_len']}-token prompts, "
                     f"{d['new_tokens']} new) | {_fmt(d['ours_tok_s'])} | {_fmt(d['theirs_tok_s'])} | "
                     f"{_times(d['ratio'])}{verdict} | {target} |")
    roof, sg = r["roofline"], r["sparse_gain"]
    match = {True: "yes", False: "NO", None: "not checked"}
    per_batch = ", ".join(f"batch {d['batch']}: {match[d['tokens_match']]}" for d in r["decode"])
    counts = r["compile_counts"]
    count_text = ", ".join(
        f"`{name}` {counts['start'][name]} → {counts['after_warmup'][name]} → {counts['end'][name]}"
        for name in counts["end"])
    compile_s = ", ".join([f"prefill {p['compile_s']:.1f} s"]
                          + [f"batch {d['batch']} {d['compile_s']:.1f} s" for d in r["decode"]]
                          + [f"dense {sg['dense_compile_s']:.1f} s"])
    load = host["loadavg_start"], host["loadavg_end"]
    hf = r["transformers"]
    lines += [
        "", "| derived | value | target |", "|---|---|---|",
        f"| decode roofline fraction, batch 1 | {_fmt(roof['fraction'], '.0%')}"
        f"{_verdict(roof['fraction'], t['roofline_fraction'])} of {_fmt(roof['tok_s'])} tok/s = "
        f"{_fmt(host['read_gb_s'])} GB/s ÷ "
        f"{r['model']['active_bytes_per_token'] / 1e6:.0f} MB active weights per token "
        + (f"(transformers: {_fmt(roof['theirs_fraction'], '.0%')}, so {t['decode_ratio']}× transformers would be "
           f"{_fmt(None if roof['theirs_fraction'] is None else t['decode_ratio'] * roof['theirs_fraction'], '.0%')} "
           f"of the roofline)" if r["model"].get("expert_dtype", r["model"]["dtype"]) == r["model"]["dtype"] else
           f"(transformers, whose weights are all {r['model']['dtype']}: {_fmt(roof['theirs_fraction'], '.0%')} "
           f"of its own roofline, {_fmt(roof['theirs_tok_s'])} tok/s)")
        + f" | ≥ {t['roofline_fraction']:.0%} |",
        f"| sparse gain, batch 1 | {_times(sg['gain'])}{_verdict(sg['gain'], t['sparse_gain'])}: "
        f"{_fmt(sg['sparse_tok_s'])} tok/s vs {_fmt(sg['dense_tok_s'])} tok/s computing all "
        f"{r['model']['hf_config']['num_local_experts']} experts ({sg['dense_new_tokens']} new) | "
        f"≥ {t['sparse_gain']}× |",
        f"| prefill efficiency | {_fmt(p['matmul_fraction'], '.0%')}"
        f"{_verdict(p['matmul_fraction'], t['prefill_matmul_fraction'])} of XLA's matmul rate: "
        f"{p['useful_gflop']:.1f} useful GFLOP at {_fmt(p['ours_useful_gflop_s'])} GFLOP/s | "
        f"≥ {t['prefill_matmul_fraction']:.0%} |",
        "| experts touched per decode step (of "
        f"{r['model']['hf_config']['num_local_experts']}) | "
        + ", ".join(f"batch {d['batch']}: {d['experts_touched']:.2f}" for d in r["decode"]) + " | |",
        f"| greedy tokens match transformers | {per_batch} | batch 1: yes |",
        f"| compiled shapes (start → after warm-up → end) | {count_text}; "
        f"{r['recompiles_during_timed_runs']} during timed runs | 0 during timed runs |",
        f"| compile time of our first calls (jax compile events) | {compile_s}; "
        f"{r['compile_s_during_timed_runs']:.2f} s during timed runs | |",
        f"| host: f32 streaming read, {host['matvec_weight_mb']:.0f} MB weight | XLA matvec "
        f"{_fmt(host['matvec_gb_s'])} GB/s, CPU kernel {_fmt(host['kernel_gb_s'])} GB/s | the faster: roofline |",
        f"| host: XLA f32 matmul {'×'.join(map(str, host['matmul_shape']))} | {_fmt(host['matmul_gflop_s'], '.0f')} "
        "GFLOP/s | |",
        "| load average (1/5/15 min) before the run; after it (includes the bench) | "
        + "; ".join(" / ".join(f"{v:.2f}" for v in three) for three in load) + " | |",
        f"| other processes' CPU during timed runs | {_fmt(host['other_processes_cores'], '.2f')} cores | |",
    ]
    if hf is not None:
        lines.append(f"| transformers set-up | attention `{hf['attn_implementation']}`, experts "
                     f"`{hf['experts_implementation']}`, {hf['torch_threads']} torch threads | |")
    return "\n".join(lines)


def write_plot(r: dict[str, Any], path: str) -> None:
    """Decode tok/s vs batch (log x) for both sides, and prefill tok/s bars, into a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_decode, ax_prefill = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    batches = [d["batch"] for d in r["decode"]]
    ax_decode.plot(batches, [d["ours_tok_s"] for d in r["decode"]], "o-", label="mixtral_jax")
    if r["transformers"] is not None:
        ax_decode.plot(batches, [d["theirs_tok_s"] for d in r["decode"]], "s--", label="transformers")
    ax_decode.axhline(r["roofline"]["tok_s"], color="gray", linestyle=":", label="batch-1 roofline")
    ax_decode.set_xscale("log", base=2)
    ax_decode.set_xticks(batches, [str(b) for b in batches])
    ax_decode.set_xlabel("batch")
    ax_decode.set_ylabel("decode tokens/s")
    ax_decode.set_title("decode")
    ax_decode.grid(alpha=0.3)
    ax_decode.legend()
    names, values = ["mixtral_jax"], [r["prefill"]["ours_tok_s"]]
    if r["prefill"]["theirs_tok_s"] is not None:
        names.append("transformers")
        values.append(r["prefill"]["theirs_tok_s"])
    ax_prefill.bar(names, values, color=["C0", "C1"][:len(names)])
    ax_prefill.set_ylabel("prefill tokens/s")
    ax_prefill.set_title(f"prefill, {r['prefill']['prompt_len']}-token prompt")
    cfg = r["model"]["hf_config"]
    fig.suptitle(f"Mixtral D={cfg['hidden_size']} F={cfg['intermediate_size']} L={cfg['num_hidden_layers']} "
                 f"E={cfg['num_local_experts']} top-{cfg['num_experts_per_tok']}, {r['model']['dtype']}, "
                 f"{r['machine']['nproc']}-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


METHOD = """\
How each number is measured (all in one process, the two sides alternating
within every timed round, the side that goes first swapping each round;
medians over the rounds):

- Both sides load the same random-weight checkpoint: transformers
  `from_pretrained` of the HF directory, mixtral_jax `load` of its
  `convert_hf_checkpoint` conversion. torch runs on 2 threads.
- Prefill: one prompt, one new token; wall time of `mj.generate` vs
  transformers' `generate(max_new_tokens=1)`. tok/s = prompt tokens ÷ time.
- Decode at batch B: B random prompts, greedy, every row to the end
  (`stop_tokens=[]`; transformers `min_new_tokens`). Ours: time from the first
  to the last token of `mj.generate_stream`. transformers: t(N new) − t(1 new).
  tok/s = (N − 1) × B ÷ that time. Fewer new tokens at big batches bound the work.
- Every shape runs once before timing (compilation, allocator warm-up). Compile
  time is what jax reports (its jax.monitoring compile events) during those first
  calls; compiled-shape counts come from the jitted `prefill` / `decode_step`.
- Roofline: active weight bytes per token (active parameters minus the
  embedding table, which is a one-row gather) ÷ this host's streaming-read
  bandwidth: the faster of an XLA f32 matvec and the CPU MoE kernel on one row
  (`mixtral_jax.cpu_kernel`, where it is built), each on a weight that exceeds
  the L3 cache, sampled next to every measurement.
- Prefill efficiency: useful FLOPs (2 × active layer weights × tokens, causal
  attention; the lm_head and the last layer, but for its keys and values, for the
  last token only, as only its logits are needed) ÷ time, against an XLA f32
  matmul of the same round.
- Sparse gain: our batch-1 decode against `strategy="dense"` (all experts computed).
- Experts touched: `mj.expert_routing` on the decoded sequences; per layer and
  decode step, the distinct experts chosen by that step's B tokens; mean.
- Load: before each timed measurement the bench waits (up to 20 s) for other
  processes to go idle; the load average, and the CPU time other processes used
  during the timed rounds (from /proc/stat), say how noisy the machine still was.
"""


def write_markdown(r: dict[str, Any], path: str, png_name: str) -> None:
    """docs/benchmarks.md: command, date, machine, model, the tables, the plot and the method."""
    m, cfg = r["machine"], r["model"]["hf_config"]
    model_line = (f"hidden {cfg['hidden_size']}, ffn {cfg['intermediate_size']}, {cfg['num_hidden_layers']} layers, "
                  f"{cfg['num_attention_heads']} heads, {cfg['num_key_value_heads']} kv heads, "
                  f"{cfg['num_local_experts']} experts top-{cfg['num_experts_per_tok']}, vocab {cfg['vocab_size']}: "
                  f"{r['model']['total'] / 1e6:.0f}M parameters, {r['model']['active'] / 1e6:.0f}M active per token, "
                  f"{r['model']['dtype']}; mixtral_jax layout `{r['model']['layout']}`")
    stored, experts = r["model"].get("checkpoint_dtype"), r["model"].get("expert_dtype")
    if stored and stored != r["model"]["dtype"]:
        model_line += (f"; checkpoint written in {stored}, both sides compute in {r['model']['dtype']}, "
                       f"mixtral_jax keeps the experts in {experts}")
    setup = ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {seconds:.1f} s"
                      for name, seconds in r["setup_s"].items())
    text = f"""# Benchmarks

`{r['command']}` on {r['date']}.

- Machine: {m['nproc']} CPU cores ({m['cpu']}, L3 {m['l3_cache'] or 'unknown'}), {m['memory_gib']} GiB memory,
  jax backend `{r['jax_backend']}`.
- Versions: python {m['python']}, jax {m['jax']}, torch {m['torch']}, transformers {m['transformers']}.
- Model (random weights): {model_line}.
- {r['repeats']} timed rounds; set-up: {setup}.

{render_table(r)}

![decode and prefill tokens/s]({png_name})

{METHOD}"""
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------
# CLI.


def _define_flags() -> None:
    # Only when run as a program: importing the helpers (tests) must register no flags.
    flags.DEFINE_integer("hidden_size", 1024, "Model width D.")
    flags.DEFINE_integer("intermediate_size", 3584, "Expert hidden width F.")
    flags.DEFINE_integer("num_layers", 8, "Decoder layers.")
    flags.DEFINE_integer("num_heads", 16, "Attention heads.")
    flags.DEFINE_integer("num_kv_heads", 4, "Key/value heads.")
    flags.DEFINE_integer("num_experts", 8, "Experts per layer.")
    flags.DEFINE_integer("top_k", 2, "Experts per token.")
    flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size.")
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
    flags.DEFINE_string("out_dir", "docs", "Where benchmarks.md and benchmarks.png go; '' writes nothing.")
    flags.DEFINE_string("workdir", None, "Directory for the HF and converted checkpoints, kept and reused by later "
                        "runs of the same model; default: a temporary directory, deleted at the end.")
    flags.DEFINE_boolean("keep", False, "Keep the temporary checkpoint directory (prints its path).")
    flags.DEFINE_boolean("skip_transformers", False, "Measure mixtral_jax only.")
    flags.DEFINE_boolean("json", False, "End the output with one JSON line of every number.")
    flags.DEFINE_integer("seed", 0, "Seed of the random weights and prompts.")
    flags.DEFINE_boolean("quick", False, "Tiny model, few tokens, one repeat: runs every code path in under a minute. "
                         "Flags given explicitly still apply.")


def resolve_settings() -> Settings:
    """The flags (with --quick defaults for flags not given) as checked Settings."""
    values = {name: FLAGS[name].value for name in QUICK}
    if FLAGS.quick:
        values.update({name: v for name, v in QUICK.items() if not FLAGS[name].present})
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
    stored = FLAGS.checkpoint_dtype or FLAGS.dtype
    if FLAGS.expert_dtype == "bfloat16" and stored == "float32":  # the only narrower pair of the two choices
        raise UsageError(f"--expert_dtype {FLAGS.expert_dtype} would round mixtral_jax's experts but not transformers' "
                         f"{stored} weights; pass --checkpoint_dtype {FLAGS.expert_dtype} so both read the same weights.")
    from mixtral_jax.config import from_hf_dict

    try:
        from_hf_dict(fields)  # an impossible shape (heads vs kv heads, top-k vs experts) fails here, in one sentence
    except ValueError as e:
        raise UsageError(str(e)) from None
    return Settings(fields, values["prompt_len"], values["decode_prompt_len"], values["new_tokens"], sizes,
                    values["repeats"], FLAGS.dtype, FLAGS.seed,
                    QUICK_BANDWIDTH_BYTES if FLAGS.quick else BANDWIDTH_BYTES, 0.0 if FLAGS.quick else QUIET_WAIT_S,
                    FLAGS.skip_transformers, FLAGS.checkpoint_dtype, FLAGS.expert_dtype)


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
        result = run_benchmark(settings, workdir)
    finally:
        if FLAGS.workdir or FLAGS.keep:
            _say(f"checkpoints kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result.update(command=command.strip(), date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                  machine=machine_facts())
    print(render_table(result))
    if FLAGS.out_dir:
        os.makedirs(FLAGS.out_dir, exist_ok=True)
        write_plot(result, os.path.join(FLAGS.out_dir, "benchmarks.png"))
        write_markdown(result, os.path.join(FLAGS.out_dir, "benchmarks.md"), "benchmarks.png")
        _say(f"wrote {os.path.join(FLAGS.out_dir, 'benchmarks.md')} and benchmarks.png")
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
