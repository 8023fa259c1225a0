"""The serving engine with its decode steps in one call against several parts, in ONE process, alternating.

  python benchmarks/ab_decode_parts.py [--parts 1,2] [--rounds 4]

Each round, for each setting: 16 requests of 32 tokens at once (output tok/s), then one request alone (ms per
token after its first), then a 16-token request sent 5 times at random moments while 15 requests of 96 tokens
decode (median and worst first-token time against the same request alone). The bench model of
python -m mixtral_jax.bench (random weights), one CPU device, 16 slots, 160 positions, chunks of 64.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mixtral_jax as mj  # noqa: E402
from mixtral_jax.bench.settings import MODEL, hf_config_fields  # noqa: E402
from mixtral_jax.config import from_hf_dict  # noqa: E402
from mixtral_jax.engine import Engine, Request  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--parts", default="1,2")
parser.add_argument("--rounds", type=int, default=4)
args = parser.parse_args()

cfg = from_hf_dict(hf_config_fields(**MODEL, max_positions=4096), name="bench")
model = mj.init_random(cfg, seed=0)
rs = np.random.RandomState(0)
prompts = [[1] + rs.randint(3, cfg.vocab_size, 31).tolist() for _ in range(16)]
engines = {}
for parts in map(int, args.parts.split(",")):
    t0 = time.perf_counter()
    engines[parts] = Engine(model, 16, 160, 64, decode_parts=parts)
    engines[parts].start()
    print(f"decode_parts {parts}: warm-up {time.perf_counter() - t0:.1f} s", flush=True)


def wait(reqs):
    for r in reqs:
        while r.finish_reason is None:
            time.sleep(0.0005)


def first_token(engine):
    r = engine.submit(Request(prompts[0][:16], 1))
    wait([r])
    return r.first_token_at - r.submitted_at


for i in range(args.rounds):
    for parts, engine in (engines.items() if i % 2 == 0 else reversed(engines.items())):
        t0 = time.perf_counter()
        wait([engine.submit(Request(p, 32, stop_tokens=[])) for p in prompts])
        at_once = 16 * 32 / (time.perf_counter() - t0)
        r = engine.submit(Request(prompts[0], 33, stop_tokens=[]))
        wait([r])
        alone_ms = (time.perf_counter() - r.first_token_at) / 32 * 1e3
        alone = min(first_token(engine) for _ in range(3))
        longs = [engine.submit(Request(p, 96, stop_tokens=[])) for p in prompts[1:]]
        while any(len(r.tokens) < 3 for r in longs):
            time.sleep(0.001)
        busy = []
        for _ in range(5):
            time.sleep(0.05 * rs.rand())
            busy.append(first_token(engine))
        wait(longs)
        print(f"round {i} decode_parts {parts}: 16 x 32 at once {at_once:.1f} tok/s; one request "
              f"{alone_ms:.1f} ms/token; head of line {np.median(busy) / alone:.2f}x median, {max(busy) / alone:.2f}x worst "
              f"(alone {alone * 1e3:.1f} ms); load average {os.getloadavg()[0]:.1f}", flush=True)
for parts, engine in engines.items():
    print(f"decode_parts {parts}: compiles after warm-up {engine.compiles}")
    engine.stop()
