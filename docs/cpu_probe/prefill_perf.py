"""A 512-token prefill of the bench model in a loop, for `perf record` (where its CPU time goes).

Run after `python -m mixtral_jax.bench --workdir /tmp/bench_work` (for /tmp/bench_work/converted):

  PYTHONPATH=. python docs/cpu_probe/prefill_perf.py & \
  sleep 60; perf record -F 499 -e cpu-clock -p $! -o /tmp/prefill.perf -- sleep 8; \
  perf report -i /tmp/prefill.perf --sort dso,sym --stdio | head -40

T (env, default 512) sets the prompt length. It compiles and runs the forward once, prints "looping", then runs it N times (env N, default
40) and prints the median time. Start `perf record` after "looping".
"""
import os, time, importlib
import numpy as np, jax, jax.numpy as jnp
import mixtral_jax as mj
from mixtral_jax import model as model_lib

g = importlib.import_module("mixtral_jax.generate")
m = mj.load(os.environ.get("CKPT", "/tmp/bench_work/converted"), dtype="float32")
cfg, params, T = m.cfg, m.params(), int(os.environ.get("T", "512"))
tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, T)), jnp.int32)
pos = jnp.arange(T, dtype=jnp.int32)[None]


@jax.jit
def prefill(params, tokens):  # as generate.prefill: the cache written, last position's logits only
    cache = g.init_cache(cfg, 1, T * 2, jnp.float32, None, "per_expert")
    return model_lib.apply(params, tokens, pos, cfg=cfg, cache=(cache["k"], cache["v"]), cache_index=0,
                           k_pos=jnp.concatenate([pos, -jnp.ones_like(pos)], 1), last_only=True)[0]


prefill(params, tokens).block_until_ready()
print("looping", flush=True)
ts = []
for _ in range(int(os.environ.get("N", "40"))):
    t0 = time.perf_counter()
    prefill(params, tokens).block_until_ready()
    ts.append(time.perf_counter() - t0)
print(f"median {np.median(ts) * 1e3:.1f} ms over {len(ts)}")
