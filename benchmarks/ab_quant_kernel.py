"""The CPU kernels alone on the bench model's shapes, per weight format, one process.

  python benchmarks/ab_quant_kernel.py

1. `cpu_kernel.moe_cpu`: float32, bfloat16, int8 and int4 experts (the same random weights) for 2 rows (a
   batch-1 decode step's top-2) and 1024 rows (a 512-token prompt), ratios against float32.
2. A batch-1 decode step's products, per token (8 layers): the experts (2 rows), the attention projections
   (wqkv [1536, 1024] and wo [1024, 1024] per layer, `cpu_kernel.linear_cpu`) and the lm_head [32000, 1024],
   float32 and int8, and XLA's product with the int8 weight dequantized first (what runs without the kernel).
3 alternating rounds, medians.
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import cpu_kernel, quant

rs = np.random.RandomState(0)
d, f, e, layers, vocab = 1024, 3584, 8, 8, 32000


def alternate(fns: dict, args: dict, reps: int, rounds: int = 3) -> dict:
    """{name: median seconds per call}, the order reversed every other round."""
    for k in fns:
        jax.block_until_ready(fns[k](*args[k]))
    t = {k: [] for k in fns}
    for r in range(rounds):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            for _ in range(reps):
                out = fns[k](*args[k])
            jax.block_until_ready(out)
            t[k].append((time.perf_counter() - t0) / reps)
    return {k: float(np.median(v)) for k, v in t.items()}


ws = {n: (rs.randn(e, *((d, f) if n != "w2" else (f, d))) * 0.02).astype(np.float32) for n in ("w1", "w3", "w2")}
fmts = {"f32": lambda w: jnp.asarray(w), "bf16": lambda w: jnp.asarray(w, jnp.bfloat16),
        "int8": lambda w: {k: jnp.asarray(v) for k, v in quant.quantize(w, "int8").items()},
        "int4": lambda w: {k: jnp.asarray(v) for k, v in quant.quantize(w, "int4").items()}}
experts = {k: {n: quant.transpose(fn(ws[n])) for n in ws} for k, fn in fmts.items()}  # per_expert: [E, out, in]
moe = jax.jit(lambda x, g, ex: cpu_kernel.moe_cpu(x, g, ex))
step = {}
for rows, sizes, reps in ((2, [1, 0, 0, 1, 0, 0, 0, 0], 60), (1024, [128] * 8, 3)):
    x = jnp.asarray(rs.randn(rows, d).astype(np.float32))
    g = jnp.asarray(sizes, jnp.int32)
    med = alternate({k: moe for k in experts}, {k: (x, g, experts[k]) for k in experts}, reps)
    print(rows, "rows:", ", ".join(f"{k} {v*1e3:.2f} ms ({med['f32']/v:.2f}x)" for k, v in med.items()), flush=True)
    if rows == 2:
        step = med
del experts

# A decode step's dense products: one row through each layer's wqkv and wo, and the lm_head.
dense = {"wqkv": (1536, d), "wo": (d, d), "lm_head": (vocab, d)}
x1 = jnp.asarray(rs.randn(1, d).astype(np.float32))
linear = jax.jit(lambda x, w: cpu_kernel.linear_cpu(x, w))
xla = jax.jit(lambda x, w: x @ quant.dequantize(w, jnp.float32, axis=-1).T)
fns, args, count = {}, {}, {}
for name, shape in dense.items():
    w = (rs.randn(*shape) * 0.02).astype(np.float32)
    q = quant.transpose({k: jnp.asarray(v) for k, v in quant.quantize(w.T, "int8").items()})
    for fmt, fn, weight in (("f32", linear, jnp.asarray(w)), ("int8", linear, q), ("int8 xla", xla, q)):
        fns[f"{name} {fmt}"], args[f"{name} {fmt}"] = fn, (x1, weight)
med = alternate(fns, args, 30)
per_token = {fmt: {"experts": layers * step[fmt.split()[0]], "attention": layers * (med[f"wqkv {fmt}"] + med[f"wo {fmt}"]),
                   "lm_head": med[f"lm_head {fmt}"]} for fmt in ("f32", "int8", "int8 xla")}
for name, v in med.items():
    print(f"{name}: {v * 1e3:.3f} ms", flush=True)
for fmt, parts in per_token.items():
    print(f"decode token, experts {fmt.split()[0]}, attention + lm_head {fmt}: "
          + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in parts.items())
          + f"; sum {sum(parts.values()) * 1e3:.2f} ms", flush=True)
