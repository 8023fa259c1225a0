"""Whole decode steps with two builds of the CPU kernel source, in ONE process, alternating.

  python benchmarks/ab_kernel_steps.py A.cc B.cc [--model bench|small] [--quantize int4,int8,float32] [--rounds 6]

`ab_kernels.py` times the MoE kernel alone; this times what a user waits for: `generate_stream` on a random
model, batch 1, whose steps make ~50 kernel calls (attention projections, cache writes, attention, MoE,
lm_head). Both sources are built and registered under their own names (`cpu_kernel.available` keys the
names by the source); each round switches the model's kernel calls to one build (clearing JAX's caches, so
the step recompiles), warms up, and takes the median ms per token of 3 runs of 64 steps. The order flips
every round. Prints, per weight format, both medians and the median of the rounds' A / B ratios with each
round's. `--model bench` is the benchmark model (D 1024, 8 layers, 8 experts, vocab 32000), `small` the
same with D 128, F 256 and vocab 512, where a step is mostly fixed cost.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
import jax  # noqa: E402

import _alternate  # noqa: E402
import mixtral_jax as mj  # noqa: E402
from mixtral_jax import cpu_kernel  # noqa: E402
from mixtral_jax.bench.settings import MODEL, hf_config_fields  # noqa: E402
from mixtral_jax.config import from_hf_dict  # noqa: E402

NAMES = ("TARGET", "LINEAR_TARGET", "WRITE_CACHE_TARGET", "ATTEND_TARGET")


def register(source: str) -> tuple:
    """Builds and registers `source`; returns its FFI target names."""
    cpu_kernel.available.cache_clear()
    cpu_kernel.SOURCE = Path(source).resolve()
    if not cpu_kernel.available():
        sys.exit(f"{source} did not build (its compiler message is above).")
    return tuple(getattr(cpu_kernel, n) for n in NAMES)


def use(names: tuple) -> None:
    for n, v in zip(NAMES, names):
        setattr(cpu_kernel, n, v)
    jax.clear_caches()  # the kernel's name is fixed when a step is traced


def ms_per_token(model, prompt, steps: int = 64) -> float:
    return 1e3 / _alternate.decode_rate(model, prompt, steps + 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs=2)
    parser.add_argument("--model", choices=["bench", "small"], default="bench")
    parser.add_argument("--quantize", default="int4,int8,float32", help="weight formats, comma-separated")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    builds = [register(s) for s in args.sources]
    shape = dict(MODEL) if args.model == "bench" else dict(MODEL, hidden_size=128, intermediate_size=256,
                                                           vocab_size=512)
    cfg = from_hf_dict(hf_config_fields(**shape, max_positions=4096), name=args.model)
    models = {q: mj.init_random(cfg, seed=0, dtype="float32", quantize=None if q == "float32" else q)
              for q in args.quantize.split(",")}
    prompt = np.random.default_rng(0).integers(3, shape["vocab_size"], 16).tolist()
    times = {q: ([], []) for q in models}
    for r in range(args.rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            use(builds[i])
            for q, model in models.items():
                ms_per_token(model, prompt, 8)  # compiles and warms up
                times[q][i].append(float(np.median([ms_per_token(model, prompt) for _ in range(3)])))
    for q, (a, b) in times.items():
        ratios = [x / y for x, y in zip(a, b)]
        print(f"{q}: A {np.median(a):.3f} ms  B {np.median(b):.3f} ms a token  A/B {np.median(ratios):.3f} "
              f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")


if __name__ == "__main__":
    main()
