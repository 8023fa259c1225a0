"""A prefill or a decode run in a loop, for `perf record` (where the CPU time goes).

  python benchmarks/profile_loop.py CKPT_DIR [prefill|decode] [T_or_B] &
  sleep 60; perf record -F 499 -e cpu-clock -p $! -o /tmp/loop.perf -- sleep 8
  perf report -i /tmp/loop.perf --sort dso,sym --stdio | head -40

prefill T (default 512): a T-token prompt, one new token. decode B (default 1):
B 16-token prompts, 32 new tokens. It runs once (compiling), prints "looping",
then runs LOOPS times (env, default 40) and prints the median. Start `perf
record` after "looping". CKPT_DIR: e.g. W/converted after
`python -m mixtral_jax.bench --workdir W`.
"""

import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
import mixtral_jax as mj  # noqa: E402


def main(argv):
    if len(argv) < 2 or not os.path.isdir(argv[1]) or (len(argv) > 2 and argv[2] not in ("prefill", "decode")):
        print("usage: python benchmarks/profile_loop.py CKPT_DIR [prefill|decode] [T_or_B]", file=sys.stderr)
        sys.exit(2)
    model = mj.load(argv[1], dtype="float32")
    kind = argv[2] if len(argv) > 2 else "prefill"
    size = int(argv[3]) if len(argv) > 3 else (512 if kind == "prefill" else 1)
    rng = np.random.default_rng(0)
    shape, new = ((1, size), 1) if kind == "prefill" else ((size, 16), 32)
    prompts = rng.integers(3, model.cfg.vocab_size, shape).tolist()

    def once():
        t0 = time.perf_counter()
        mj.generate(model, prompts, max_new_tokens=new, stop_tokens=[])
        return time.perf_counter() - t0

    once()
    print("looping", flush=True)
    times = [once() for _ in range(int(os.environ.get("LOOPS", "40")))]
    print(f"{kind} {size}: median {statistics.median(times) * 1e3:.1f} ms over {len(times)}")


if __name__ == "__main__":
    main(sys.argv)
