"""Two builds of the MoE kernel source, timed in ONE process, alternating (this host drifts 15-40%
between runs, so separate runs hide changes of a few percent).

  PYTHONPATH=. python docs/cpu_probe/ab_kernels.py A.cc B.cc [rows] [rounds] [panel_min_rows_A panel_min_rows_B]

Each source is compiled with cpu_kernel.FLAGS and registered under its own FFI name; both run
8 bench-model layers of MoE (D=1024, F=3584, 8 experts, top-2, random weights, x + 0.1 * moe(x)
chained) on the same `rows` float32 tokens (default 512), `rounds` times each (default 7).
Prints the max difference of the two outputs, then the medians, A/B, and useful GFLOP/s.
BF16=1 stores the expert weights in bfloat16. Default panel_min_rows 17 (the float32 threshold).
"""
import hashlib, os, subprocess, sys, tempfile, time, ctypes
import numpy as np, jax, jax.numpy as jnp
from common import chain, moe_layers
from mixtral_jax import cpu_kernel, moe

srcs = sys.argv[1:3]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 512
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 7
pmr = [int(a) for a in sys.argv[5:7]] if len(sys.argv) > 6 else [17, 17]
out_dir = tempfile.mkdtemp()
names = []
for i, src in enumerate(srcs):
    key = hashlib.md5(open(src, "rb").read()).hexdigest()[:8]
    so = os.path.join(out_dir, f"ab_{i}_{key}.so")
    subprocess.run(["g++", *cpu_kernel.FLAGS, f"-I{jax.ffi.include_dir()}", src, "-o", so], check=True)
    name = f"ab_moe_{i}_{key}"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(so).MoeCpu), platform="cpu")
    names.append(name)
wdtype = jnp.bfloat16 if os.environ.get("BF16") else jnp.float32
rng = np.random.default_rng(0)
D, F, E, L = 1024, 3584, 8, 8
layers = [{**p, "experts": [{k: w.astype(wdtype) for k, w in ex.items()} for ex in p["experts"]]}
          for p in moe_layers(rng, D, F, E, L)]
x = jnp.asarray(rng.standard_normal((n, D), np.float32))


def kernel_block(name, panel_min_rows):
    def block(x, p):
        g = moe.dense_gates(*moe.route(x, p["router"], 2), E)
        ws = [w[k] for w in p["experts"] for k in ("w1", "w3", "w2")]
        return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(x.shape, jnp.float32))(
            x, g, *ws, all_experts=False, chunk_bytes=1 << 20, panel_min_rows=panel_min_rows)
    return block


fns = [chain(kernel_block(name, q)) for name, q in zip(names, pmr)]
outs = [f(x, layers) for f in fns]
print("max |A - B|", float(jnp.max(jnp.abs(outs[0] - outs[1]))))
times = [[], []]
for _ in range(rounds):
    for i, f in enumerate(fns):
        t = time.perf_counter()
        f(x, layers).block_until_ready()
        times[i].append(time.perf_counter() - t)
med = [float(np.median(t)) for t in times]
flop = L * n * 2 * 3 * 2 * D * F
print(f"rows={n}: A {med[0] * 1e3:.1f} ms  B {med[1] * 1e3:.1f} ms  A/B {med[0] / med[1]:.3f}  "
      f"useful GFLOP/s A {flop / med[0] / 1e9:.0f} B {flop / med[1] / 1e9:.0f}")
