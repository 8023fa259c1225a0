"""Decode (batch 1) and prefill (512 tokens) tok/s of several models in one process, alternating (shared by the ab_* scripts)."""

import time

import numpy as np

import mixtral_jax as mj


def decode_rate(model, prompt: list[int], n: int = 32) -> float:
    """Batch-1 decode tok/s: n tokens after `prompt` with `generate_stream`, timed from the first to the last."""
    stamps = [time.perf_counter() for _ in mj.generate_stream(model, [prompt], max_new_tokens=n, stop_tokens=[])]
    return (n - 1) / (stamps[-1] - stamps[0])


def medians(models: dict, rounds: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """{"decode b1": {name: tok/s}, "prefill 512": {...}}: medians over `rounds`, the order reversed every
    other round. Each timing directly follows an untimed run of the same model,
    as each of llama-bench's follows its own warm-up run (docs/benchmarks.md#against-llamacpp)."""
    rng = np.random.default_rng(seed)
    prompt16, prompt512 = rng.integers(3, 32000, 16).tolist(), rng.integers(3, 32000, 512).tolist()

    def decode(m):
        return decode_rate(m, prompt16)

    def prefill(m):
        t0 = time.perf_counter()
        for _ in mj.generate_stream(m, [prompt512], max_new_tokens=1, stop_tokens=[]):
            return 512 / (time.perf_counter() - t0)

    out = {}
    for what, fn in (("decode b1", decode), ("prefill 512", prefill)):
        rates = {name: [] for name in models}
        for r in range(rounds):
            for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
                fn(models[name])  # warm-up (the first compiles)
                rates[name].append(fn(models[name]))
        out[what] = {name: float(np.median(v)) for name, v in rates.items()}
    return out
