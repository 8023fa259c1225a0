"""Two builds of the CPU MoE kernel source, timed in ONE process, alternating.

  python benchmarks/ab_kernels.py A.cc B.cc [--rows 2] [--format int4] [--rounds 7]

This host's speed drifts 15-40% between runs, so separate runs hide a change of
a few percent. Each source is compiled with cpu_kernel.FLAGS and registered
under its own FFI name; both run 8 bench-model MoE layers (D 1024, F 3584, 8
experts, random weights in --format: float32, bfloat16, int8 or int4 as
quant.py stores them; 400 MB to 2.8 GB, beyond the caches, as a real step
reads them) on the same float32 rows, each row through 2 random experts,
x + 0.1 * moe(x) chained. --rows 2 is a batch-1 decode step's top-2 (the
row-dot products), 1024 a 512-token prompt's (the panel path). Prints the
largest difference of the two outputs, the medians, A/B and the weight bytes
read per second. A.cc is typically `git show OLD:mixtral_jax/csrc/moe_cpu.cc`
saved to a file, B.cc the working tree's; both must take each weight stacked over
the experts and a `layer` attribute (the kernel's operands from d41c5ad on; -1: one layer's).
"""

import argparse
import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mixtral_jax import cpu_kernel, quant  # noqa: E402

D, F, E, L, TOP = 1024, 3584, 8, 8, 2


def register(index: int, source: str, out_dir: str) -> str:
    """Compiles `source` and registers its MoeCpu under a name of its own."""
    key = hashlib.md5(open(source, "rb").read()).hexdigest()[:8]
    lib = os.path.join(out_dir, f"ab_{index}_{key}.so")
    subprocess.run(["g++", *cpu_kernel.FLAGS, f"-I{jax.ffi.include_dir()}", source, "-o", lib], check=True,
                   stderr=subprocess.DEVNULL)
    name = f"ab_moe_{index}_{key}"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(lib).MoeCpu), platform="cpu")
    return name


def layers(rng, rows: int, fmt: str):
    """L layers: group sizes [E] of `rows` rows (top-2 of random logits, sorted by expert) and the experts'
    w1, w3, w2 in HF [out, in] layout as the kernel takes them (quantized: qvalue, scale per matrix)."""
    out = []
    for _ in range(L):
        tokens = max(1, rows // TOP)
        top = np.argsort(-rng.standard_normal((tokens, E)), axis=1)[:, :TOP]
        sizes = np.bincount(top.ravel(), minlength=E).astype(np.int32)
        weights = []
        for shape in ((E, F, D), (E, F, D), (E, D, F)):  # w1, w3, w2, each stacked over the experts
            w = rng.standard_normal(shape, np.float32) * 0.05
            if fmt in ("int8", "int4"):  # quant.quantize takes [in, out]; transpose gives the HF layout
                q = quant.transpose(quant.quantize(quant.transpose(w), fmt))
                weights += [jnp.asarray(q["qvalue"]), jnp.asarray(q["scale"])]
            else:
                weights.append(jnp.asarray(w, {"f32": jnp.float32, "bf16": jnp.bfloat16}[fmt]))
        out.append((jnp.asarray(sizes), weights))
    return out


def chain(name: str):
    def run(x, params):
        for sizes, weights in params:
            call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(x.shape, jnp.float32))
            x = x + 0.1 * call(x, sizes, *weights, chunk_bytes=cpu_kernel.CHUNK_BYTES,
                               panel_min_rows=cpu_kernel.PANEL_MIN_ROWS_BF16, layer=-1)
        return x
    return jax.jit(run)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs=2)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--format", default="int4", choices=["f32", "bf16", "int8", "int4"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=20, help="chained runs per timing")
    args = parser.parse_args()
    out_dir = tempfile.mkdtemp()
    fns = [chain(register(i, src, out_dir)) for i, src in enumerate(args.sources)]
    rng = np.random.default_rng(0)
    params = layers(rng, args.rows, args.format)
    x = jnp.asarray(rng.standard_normal((args.rows, D), np.float32))
    outs = [f(x, params) for f in fns]
    print("max |A - B|", float(jnp.max(jnp.abs(outs[0] - outs[1]))), "max |A|", float(jnp.max(jnp.abs(outs[0]))))
    times = [[], []]
    for r in range(args.rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            for _ in range(args.reps):
                out = fns[i](x, params)
            out.block_until_ready()
            times[i].append((time.perf_counter() - t0) / args.reps)
    med = [float(np.median(t)) for t in times]
    experts = [int((sizes > 0).sum()) for sizes, _ in params]
    bits = {"f32": 32, "bf16": 16, "int8": 8, "int4": 4.5}[args.format]
    read = sum(experts) * 3 * D * F * bits / 8
    print(f"rows={args.rows} {args.format}: A {med[0] * 1e3:.2f} ms  B {med[1] * 1e3:.2f} ms  "
          f"A/B {med[0] / med[1]:.3f}  weights read GB/s A {read / med[0] / 1e9:.1f} B {read / med[1] / 1e9:.1f}")


if __name__ == "__main__":
    main()
