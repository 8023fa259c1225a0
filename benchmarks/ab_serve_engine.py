"""The serving engine of an older commit against the working tree's, or the working tree's with its decode
steps in different numbers of parts, in ONE process, alternating: head of line, 16 requests at once and one
request's time per token, next to mj.generate's static batch.

  python benchmarks/ab_serve_engine.py OLD_COMMIT [--model tiny|bench] [--rounds 2]
  python benchmarks/ab_serve_engine.py --decode_parts 1,2 [--model tiny|bench] [--rounds 4]

OLD_COMMIT's mixtral_jax/engine.py and slot_steps.py (`git show`) run on the working tree's other modules.
Each round, for each engine (the order reversed every other round): a 16-token request alone (best of 3),
then the same request sent 5 times at random moments while 15 long requests decode (median and worst
first-token time), then 16 requests of 32 tokens at once (output tok/s), then one request of 33 tokens (ms
per token after its first); then mj.generate on the same 16 prompts as one batch. No HTTP: the engines
directly. The bench model is python -m mixtral_jax.bench's (random weights).
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mixtral_jax as mj  # noqa: E402
from mixtral_jax import engine as new_engine  # noqa: E402
from mixtral_jax.bench.settings import MODEL, hf_config_fields  # noqa: E402
from mixtral_jax.config import from_hf_dict  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("old", nargs="?", help="the commit to compare with (or --decode_parts)")
parser.add_argument("--decode_parts", help="instead, the working tree's engine with these parts, e.g. 1,2")
parser.add_argument("--model", choices=["tiny", "bench"], default="bench")
parser.add_argument("--rounds", type=int, default=2)
args = parser.parse_args()
if (args.old is None) == (args.decode_parts is None):
    parser.error("give OLD_COMMIT or --decode_parts, not both.")


def _old_module(path: str, name: str):
    """OLD_COMMIT's mixtral_jax/<path> as module `name` (None if it has no such file)."""
    r = subprocess.run(["git", "show", f"{args.old}:mixtral_jax/{path}"], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    file = os.path.join(tempfile.mkdtemp(), path)
    with open(file, "w") as f:
        f.write(r.stdout)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if args.old:  # the old engine with the old steps it calls (slot_steps.py), on the working tree's other modules
    old_engine = _old_module("engine.py", "engine_old")
    old_steps = _old_module("slot_steps.py", "slot_steps_old")
    if old_steps is not None:
        old_engine.slot_steps = old_steps

if args.model == "bench":
    cfg = from_hf_dict(hf_config_fields(**MODEL, max_positions=4096), name="bench")
    max_seq_len, long_new, chunk = 160, 96, 64
else:
    cfg, max_seq_len, long_new, chunk = mj.load_config("tiny"), 256, 200, 128
model = mj.init_random(cfg, seed=0)
rs = np.random.RandomState(0)
prompts = [[1] + rs.randint(3, cfg.vocab_size, 31).tolist() for _ in range(16)]
short = prompts[0][:16]


def wait(reqs):
    for r in reqs:
        while r.finish_reason is None:
            time.sleep(0.0005)


def probe(module, engine):
    alone = []
    for _ in range(3):
        r = engine.submit(module.Request(short, 1))
        wait([r])
        alone.append(r.first_token_at - r.submitted_at)
    longs = [engine.submit(module.Request(p, long_new, stop_tokens=[])) for p in prompts[1:16]]
    while any(len(r.tokens) < 3 for r in longs):
        time.sleep(0.001)
    busy = []
    for _ in range(5):
        time.sleep(0.05 * rs.rand())
        r = engine.submit(module.Request(short, 1))
        wait([r])
        busy.append(r.first_token_at - r.submitted_at)
    wait(longs)
    t0 = time.perf_counter()
    reqs = [engine.submit(module.Request(p, 32, stop_tokens=[])) for p in prompts]
    wait(reqs)
    tok_s = 16 * 32 / (time.perf_counter() - t0)
    r = engine.submit(module.Request(prompts[0], 33, stop_tokens=[]))
    wait([r])
    ms_per_token = (time.perf_counter() - r.first_token_at) / 32 * 1e3
    return min(alone), float(np.median(busy)), max(busy), tok_s, ms_per_token


if args.old:
    settings = [("old", old_engine, {}), ("new", new_engine, {})]
    title = f"{args.old} (old) against the working tree (new)"
else:
    settings = [(f"decode_parts {p}", new_engine, {"decode_parts": int(p)}) for p in args.decode_parts.split(",")]
    title = "the working tree with decode_parts " + args.decode_parts
engines = {}
for name, module, kwargs in settings:
    engine = module.Engine(model, 16, max_seq_len, chunk, **kwargs)
    engine.start()
    engines[name] = (module, engine)
mj.generate(model, prompts, max_new_tokens=32, stop_tokens=[])  # compiles
print(f"{cfg.name}; {title}; 16 slots, {max_seq_len} positions, chunk {chunk}")
for i in range(args.rounds):
    for name, (module, engine) in (list(engines.items())[::-1] if i % 2 else engines.items()):
        alone, mid, worst, tok_s, ms = probe(module, engine)
        print(f"round {i} {name}: first token alone {alone * 1e3:.1f} ms, with 15 streaming median {mid * 1e3:.1f} "
              f"worst {worst * 1e3:.1f} ms ({mid / alone:.2f}x, worst {worst / alone:.2f}x); 16 x 32 tokens at "
              f"once {tok_s:.1f} tok/s; one request {ms:.1f} ms/token; load average {os.getloadavg()[0]:.1f}",
              flush=True)
    t0 = time.perf_counter()
    mj.generate(model, prompts, max_new_tokens=32, stop_tokens=[])
    print(f"round {i} mj.generate static batch 16: {16 * 32 / (time.perf_counter() - t0):.1f} tok/s", flush=True)
for name, (_, engine) in engines.items():
    print(f"{name} engine: compiles after warm-up {engine.compiles}")
    engine.stop()
