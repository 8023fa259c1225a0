"""The CPU kernel alone (`cpu_kernel.moe_cpu`) on the bench model's expert shapes, per weight format, one process.

  python benchmarks/ab_quant_kernel.py

float32, bfloat16, int8 and int4 experts (the same random weights) for 2 rows (a batch-1 decode step's
top-2) and 1024 rows (a 512-token prompt); 3 alternating rounds, medians, ratios against float32.
"""
import time, numpy as np, jax, jax.numpy as jnp
from mixtral_jax import cpu_kernel, quant
rs = np.random.RandomState(0)
d, f, e = 1024, 3584, 8
ws = {n: (rs.randn(e, *( (d, f) if n != "w2" else (f, d))) * 0.02).astype(np.float32) for n in ("w1", "w3", "w2")}
fmts = {"f32": lambda w: jnp.asarray(w), "bf16": lambda w: jnp.asarray(w, jnp.bfloat16),
        "int8": lambda w: {k: jnp.asarray(v) for k, v in quant.quantize(w, "int8").items()},
        "int4": lambda w: {k: jnp.asarray(v) for k, v in quant.quantize(w, "int4").items()}}
experts = {k: [{n: quant.transpose(jax.tree.map(lambda a: a[i], fn(ws[n]))) for n in ws} for i in range(e)]
           for k, fn in fmts.items()}
for rows, sizes, reps in ((2, [1, 0, 0, 1, 0, 0, 0, 0], 60), (1024, [128] * 8, 3)):
    x = jnp.asarray(rs.randn(rows, d).astype(np.float32))
    g = jnp.asarray(sizes, jnp.int32)
    fns = {k: jax.jit(lambda x, g, ex: cpu_kernel.moe_cpu(x, g, ex)) for k in experts}
    for k in experts: fns[k](x, g, experts[k]).block_until_ready()
    t = {k: [] for k in experts}
    for r in range(3):
        for k in (list(experts) if r % 2 == 0 else list(experts)[::-1]):
            t0 = time.perf_counter()
            for _ in range(reps): out = fns[k](x, g, experts[k])
            out.block_until_ready(); t[k].append((time.perf_counter() - t0) / reps)
    med = {k: float(np.median(v)) for k, v in t.items()}
    print(rows, "rows:", ", ".join(f"{k} {v*1e3:.2f} ms ({med['f32']/v:.2f}x)" for k, v in med.items()), flush=True)
