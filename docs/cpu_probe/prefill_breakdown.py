"""Where a 512-token prefill of the bench model spends its time: the full forward, then with
the MoE block stubbed out, then with the attention core stubbed out too (each jitted, interleaved).

Run after `python -m mixtral_jax.bench --workdir /tmp/bench_work`:
  PYTHONPATH=. python docs/cpu_probe/prefill_breakdown.py
"""
import time, numpy as np, jax, jax.numpy as jnp, importlib
import mixtral_jax as mj
from mixtral_jax import moe as moe_lib, model as model_lib, attention as A, layers as Lyr
g = importlib.import_module("mixtral_jax.generate")
m = mj.load("/tmp/bench_work/converted", dtype="float32")
cfg = m.cfg; params = m.params()
T = 512
tokens = jnp.asarray(np.random.default_rng(0).integers(3, 32000, (1, T)), jnp.int32)
pos = jnp.arange(T, dtype=jnp.int32)[None]
def full(params, tokens):
    cache = g.init_cache(cfg, 1, T * 2, jnp.float32, None, "per_expert")
    return model_lib.apply(params, tokens, pos, cfg=cfg, cache=(cache["k"], cache["v"]), cache_index=0,
                           k_pos=jnp.concatenate([pos, -jnp.ones_like(pos)], 1), last_only=True)[0]
fns = {}
orig_moe, orig_attend = moe_lib.moe, A.attend
fns["full"] = jax.jit(lambda p, t: full(p, t)); fns["full"](params, tokens).block_until_ready()
moe_lib.moe = lambda x, p, k, *a, **kw: x * 1.0001
fns["no_moe"] = jax.jit(lambda p, t: full(p, t)); fns["no_moe"](params, tokens).block_until_ready()
A.attend = lambda q, k, v, *a, **kw: q * 1.0001
fns["no_moe_no_attend"] = jax.jit(lambda p, t: full(p, t)); fns["no_moe_no_attend"](params, tokens).block_until_ready()
moe_lib.moe, A.attend = orig_moe, orig_attend
ts = {n: [] for n in fns}
for rep in range(7):
    for n, f in fns.items():
        t0 = time.perf_counter(); f(params, tokens).block_until_ready(); ts[n].append(time.perf_counter() - t0)
print("  ".join(f"{n} {np.median(t)*1e3:.0f} ms" for n, t in ts.items()))
