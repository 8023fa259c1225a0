"""What XLA:CPU does with the operations our CPU design avoids or relies on, as ratios in one process.

  python benchmarks/xla_cpu_ops.py [--quick]

1. bfloat16 vs float32 products (why the CPU computes in float32).
2. A dot on a slice of a stacked [E, D, F] weight vs on a whole buffer (why the
   per_expert layout): XLA:CPU copies the slice first; the big copies in the
   compiled HLO are counted.
3. An [out, in] weight times a few rows, feature-major (w @ xᵀ) vs token-major
   (x @ wᵀ) (why layers.linear_t goes feature-major up to 64 rows).
4. Grouped-query attention scores with the query heads of a group next to each
   other and (B, K) as batch dims, vs an einsum with G and T apart (attention.gqa).

Each line: the two forms' median times (alternating calls) and their ratio.
--quick uses small shapes (a smoke test, seconds).
"""

import math
import os
import re
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax: no accelerator probing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

QUICK = "--quick" in sys.argv[1:]
D, F, E = (128, 256, 4) if QUICK else (1024, 3584, 8)
ROUNDS = 3 if QUICK else 9


def median_ms(fns: dict, args: dict) -> dict:
    """{name: median ms} of fns[name](*args[name]), compiled first, then called alternately."""
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def report(title: str, ms: dict) -> None:
    (a, ta), (b, tb) = ms.items()
    print(f"{title}: {a} {ta:.2f} ms, {b} {tb:.2f} ms, {b}/{a} {tb / ta:.2f}", flush=True)


def big_copies(fn, *args, min_bytes: int) -> int:
    """Fusions and copies in the compiled HLO that write a float32 buffer of at least min_bytes.

    A fusion instruction only stands in a computation that runs (the fused
    computations it calls hold the ops), so each one counted is a buffer written.
    """
    text = jax.jit(fn).lower(*args).compile().as_text()
    count = 0
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = f32\[([\d,]+)\]\S* (?:fusion|copy)\(", line)
        if m and 4 * math.prod(int(v) for v in m.group(1).split(",")) >= min_bytes:
            count += 1
    return count


def main():
    key = jax.random.key(0)
    normal = lambda *shape: jax.random.normal(jax.random.fold_in(key, len(shape) * 7 + shape[-1]), shape)
    product = jax.jit(lambda x, w: x @ w)

    # 1. bfloat16 vs float32.
    w = normal(D, 8 * F)
    for rows in (1, 512):
        x = normal(rows, D)
        report(f"1. x[{rows}, {D}] @ w[{D}, {8 * F}]", median_ms(
            {"float32": product, "bfloat16": product},
            {"float32": (x, w), "bfloat16": (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))}))

    # 2. A slice of a stacked weight vs a whole buffer.
    stacked, x = normal(E, D, F), normal(1, D)
    experts = [stacked[e] for e in range(E)]
    sliced = lambda x, w, e: x @ w[e]
    whole = lambda x, w: x @ w
    ms = median_ms({"whole buffer": jax.jit(whole), "stacked[e]": jax.jit(sliced)},
                   {"whole buffer": (x, experts[3]), "stacked[e]": (x, stacked, 3)})
    report(f"2. x[1, {D}] @ one [{D}, {F}] expert", ms)
    print(f"   big copies in the compiled HLO: whole buffer {big_copies(whole, x, experts[3], min_bytes=D * F * 4)}, "
          f"stacked[e] {big_copies(sliced, x, stacked, 3, min_bytes=D * F * 4)}", flush=True)

    # 3. [out, in] weight, feature-major vs token-major.
    w_oi = normal(F, D)
    token_major = jax.jit(lambda x, w: jnp.einsum("NI,OI->NO", x, w))
    feature_major = jax.jit(lambda x, w: jax.lax.optimization_barrier(jnp.einsum("OI,IN->ON", w, x.T)).T)
    for rows in (1, 4, 16, 64, 512):
        x = normal(rows, D)
        report(f"3. x[{rows}, {D}] times w[{F}, {D}]", median_ms(
            {"feature-major": feature_major, "token-major": token_major},
            {"feature-major": (x, w_oi), "token-major": (x, w_oi)}))

    # 4. GQA scores.
    b, t, h, k, dh = 1, 64 if QUICK else 512, 16, 4, 64
    g = h // k
    q, kk = normal(b, t, h, dh), normal(b, k, t, dh)
    grouped = jax.jit(lambda q, kk: jnp.einsum(
        "BKQH,BKSH->BKQS", q.reshape(b, t, k, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, dh), kk))
    apart = jax.jit(lambda q, kk: jnp.einsum("BTKGH,BKSH->BKGTS", q.reshape(b, t, k, g, dh), kk))
    report(f"4. GQA scores, T = S = {t}, H {h}, K {k}", median_ms(
        {"(B, K) batched": grouped, "G and T apart": apart}, {"(B, K) batched": (q, kk), "G and T apart": (q, kk)}))


if __name__ == "__main__":
    main()
