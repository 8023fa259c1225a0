"""Two builds of the CPU MoE kernel source, timed in ONE process, alternating.

  python benchmarks/ab_kernels.py A.cc B.cc [--rows 512] [--rounds 7] [--bf16] [--panel_min_rows 17,17]

This host's speed drifts 15-40% between runs, so separate runs hide a change of
a few percent. Each source is compiled with cpu_kernel.FLAGS and registered
under its own FFI name; both run 8 bench-model MoE layers (D 1024, F 3584, 8
experts, top-2, random weights and routing, x + 0.1 * moe(x) chained) on the
same float32 rows. Prints the largest difference of the two outputs, the
medians, A/B and useful GFLOP/s. A.cc is typically `git show OLD:mixtral_jax/csrc/moe_cpu.cc`
saved to a file, B.cc the working tree's.
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

from mixtral_jax import cpu_kernel  # noqa: E402

D, F, E, L, TOP = 1024, 3584, 8, 8, 2


def register(index: int, source: str, out_dir: str) -> str:
    """Compiles `source` and registers its MoeCpu under a name of its own."""
    key = hashlib.md5(open(source, "rb").read()).hexdigest()[:8]
    lib = os.path.join(out_dir, f"ab_{index}_{key}.so")
    subprocess.run(["g++", *cpu_kernel.FLAGS, f"-I{jax.ffi.include_dir()}", source, "-o", lib], check=True)
    name = f"ab_moe_{index}_{key}"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(lib).MoeCpu), platform="cpu")
    return name


def layers(rng, rows: int, dtype):
    """L layers: dense top-2 gates [rows, E] (renormalised) and the experts' w1, w3, w2 in HF [out, in] layout."""
    out = []
    for _ in range(L):
        logits = rng.standard_normal((rows, E)) * 2
        top = np.argsort(-logits, axis=1)[:, :TOP]
        chosen = np.take_along_axis(np.exp(logits), top, axis=1)
        gates = np.zeros((rows, E), np.float32)
        np.put_along_axis(gates, top, chosen / chosen.sum(1, keepdims=True), axis=1)
        weights = [jnp.asarray(rng.standard_normal(shape, np.float32) * 0.05, dtype)
                   for _ in range(E) for shape in ((F, D), (F, D), (D, F))]
        out.append((jnp.asarray(gates), weights))
    return out


def chain(name: str, panel_min_rows: int):
    def run(x, params):
        for gates, weights in params:
            call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(x.shape, jnp.float32))
            x = x + 0.1 * call(x, gates, *weights, all_experts=False, chunk_bytes=cpu_kernel.CHUNK_BYTES,
                               panel_min_rows=panel_min_rows)
        return x
    return jax.jit(run)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs=2)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--bf16", action="store_true", help="expert weights in bfloat16")
    parser.add_argument("--panel_min_rows", default="17,17", help="A's and B's panel threshold")
    args = parser.parse_args()
    thresholds = [int(v) for v in args.panel_min_rows.split(",")]
    out_dir = tempfile.mkdtemp()
    fns = [chain(register(i, src, out_dir), q) for i, (src, q) in enumerate(zip(args.sources, thresholds))]
    rng = np.random.default_rng(0)
    params = layers(rng, args.rows, jnp.bfloat16 if args.bf16 else jnp.float32)
    x = jnp.asarray(rng.standard_normal((args.rows, D), np.float32))
    outs = [f(x, params) for f in fns]
    print("max |A - B|", float(jnp.max(jnp.abs(outs[0] - outs[1]))))
    times = [[], []]
    for _ in range(args.rounds):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            f(x, params).block_until_ready()
            times[i].append(time.perf_counter() - t0)
    med = [float(np.median(t)) for t in times]
    flop = L * args.rows * TOP * 3 * 2 * D * F
    print(f"rows={args.rows}: A {med[0] * 1e3:.1f} ms  B {med[1] * 1e3:.1f} ms  A/B {med[0] / med[1]:.3f}  "
          f"useful GFLOP/s A {flop / med[0] / 1e9:.0f} B {flop / med[1] / 1e9:.0f}")


if __name__ == "__main__":
    main()
