"""Prefill MoE layer: one block per expert (lax.switch over sizes) vs the old block cascade.

Times one MoE layer of the bench model (T=512 tokens, top-2 of 8) three ways,
interleaved, on the same routing:
  cascade0  the previous dispatch: each expert's sorted rows in blocks of
            128/64/32/16 rows (up to 4 matmul blocks per expert), with the
            previous token-major expert FFN (x @ Wᵀ);
  cascade   the same cascade with today's feature-major `moe.expert_ffn_t`;
  switch16  `moe.moe_per_expert_grouped` as shipped: one block per expert of
            its size rounded up to 16 rows (GROUP_STEP=16);
  switch32  the same with 32-row steps.
Each is checked against the all-experts reference first.

Run after `python -m mixtral_jax.bench --workdir /tmp/bench_work` (which leaves
the converted checkpoint there):
  PYTHONPATH=. python docs/cpu_probe/prefill_groups.py [layer]
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import mixtral_jax as mj
from mixtral_jax import moe as M

CASCADE = (128, 64, 32, 16)


def ffn_token_major(x, w):
    h = jax.nn.silu(jnp.einsum("ND,FD->NF", x, w["w1"])) * jnp.einsum("ND,FD->NF", x, w["w3"])
    return jnp.einsum("NF,DF->ND", h, w["w2"])


def cascade(x, p, k, ffn=M.expert_ffn_t):
    n, d = x.shape
    weights, experts = M.route(x, p["router"], k)
    flat_e = experts.reshape(-1)
    a = flat_e.shape[0]
    order = jnp.argsort(flat_e, stable=True)
    sizes = jnp.bincount(flat_e, length=len(p["experts"]))
    starts = jnp.cumsum(sizes) - sizes
    xs = jnp.zeros((a + CASCADE[0], d), x.dtype).at[:a].set(x[order // k])
    ys = jnp.zeros((a + CASCADE[0], d), x.dtype)

    def run_blocks(ys, w, first_row, num_blocks, size):
        def block(i, ys):
            r = first_row + i * size
            rows = jax.lax.dynamic_slice_in_dim(xs, r, size)
            return jax.lax.dynamic_update_slice_in_dim(ys, ffn(rows, w), r, axis=0)
        return jax.lax.fori_loop(0, num_blocks, block, ys)

    for e, w in enumerate(p["experts"]):
        row, rest = starts[e], sizes[e]
        for size in CASCADE:
            blocks = rest // size if size != CASCADE[-1] else (rest + size - 1) // size
            ys = run_blocks(ys, w, row, blocks, size)
            row, rest = row + blocks * size, jnp.maximum(rest - blocks * size, 0)
    y = jnp.zeros((a, d), x.dtype).at[order].set(ys[:a])
    return M.combine(y.reshape(n, k, d), weights, x.dtype)


def with_step(step):
    def f(x, p, k):
        saved, M.GROUP_STEP = M.GROUP_STEP, step
        try:
            return M.moe_per_expert_grouped(x, p, k)
        finally:
            M.GROUP_STEP = saved
    return f


def main():
    layer = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    lp = mj.load("/tmp/bench_work/converted", dtype="float32").params()["layers"][layer]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((512, 1024), np.float32))
    k = 2
    ref = jax.jit(lambda x, p: M.moe_per_expert_masked(x, p, k, skip_unused=False))(x, lp)
    _, e = M.route(x, lp["router"], k)
    print("tokens per expert:", np.bincount(np.asarray(e).ravel(), minlength=len(lp["experts"])))
    fns = {"cascade0": lambda x, p, k: cascade(x, p, k, ffn_token_major), "cascade": cascade,
           "switch16": with_step(16), "switch32": with_step(32)}
    fns = {n: jax.jit(lambda x, p, f=f: f(x, p, k)) for n, f in fns.items()}
    for n, f in fns.items():
        print(f"{n}: relative error vs all-experts reference "
              f"{float(jnp.abs(f(x, lp) - ref).max() / jnp.abs(ref).max()):.1e}")
    times = {n: [] for n in fns}
    for _ in range(10):
        for n, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(x, lp))
            times[n].append(time.perf_counter() - t0)
    flops = 2 * 3 * 512 * k * 1024 * 3584
    for n, t in times.items():
        print(f"{n:9s} median {np.median(t) * 1e3:6.1f} ms (min {min(t) * 1e3:6.1f}), "
              f"{flops / np.median(t) / 1e9:.0f} useful GFLOP/s")


if __name__ == "__main__":
    main()
