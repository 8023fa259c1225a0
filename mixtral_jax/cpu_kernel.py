"""The CPU kernels: XLA FFI custom calls built from `csrc/moe_cpu.cc`.

`moe_cpu` is the MoE's grouped FFN on the CPU (`moe.grouped_ffn`): rows sorted
by expert, each group through its expert, reading only the weights of experts
that have rows, in place, with both cores taking chunks of work from one
counter. For a decode step's few rows it computes row-dot products (XLA:CPU's own matrix-vector
products split each matrix in fixed halves and left a core idle 9% of a
batch-1 step, docs/performance.md#why-a-kernel-for-decode); from PANEL_MIN_ROWS
rows, register tiles over packed panels of each expert's rows, as fast as
XLA's grouped matmuls and with nothing to compile per expert. `linear_cpu` is
the row-dot product for one row times an [out, in] weight. `write_cache_cpu`
writes new keys or values into rows of a layer's KV cache in place, one
buffer for the write and the attention's reads after it; `attend_cpu` is a
decode step's attention over the slots a row's mask admits, read in place.

They are compiled at first use with the host's g++ (4-5 s) into a cache
folder ($MIXTRAL_JAX_CACHE, else ~/.cache/mixtral_jax), keyed by the source,
the compiler flags, jaxlib's version and the CPU: `-march=native` builds for
the CPU at hand, so a home folder shared by machines of different CPUs would
otherwise hand one a library using instructions it lacks (SIGILL). Without a
compiler, or with MIXTRAL_JAX_CPU_KERNEL=0, `available()` is False and callers run XLA ops
(`moe.grouped_ffn_reference`, `layers.linear_t`), equal to float32 rounding.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

# FFI target names; `available()` appends the library's key, so two builds
# (another version of this package in the same process) never clash.
TARGET = "mixtral_jax_moe_cpu"
LINEAR_TARGET = "mixtral_jax_linear_cpu"
WRITE_CACHE_TARGET = "mixtral_jax_write_cache_cpu"
ATTEND_TARGET = "mixtral_jax_attend_cpu"
SOURCE = Path(__file__).parent / "csrc" / "moe_cpu.cc"
# Weight bytes per chunk of work a core takes: long contiguous runs stream faster
# (docs/performance.md#thresholds-and-chunk-sizes).
CHUNK_BYTES = 1 << 20
# From this many rows (assignments: tokens × k) `moe_cpu` runs its panel path
# (tiles of weight rows times packed panels of token columns, compute-bound)
# instead of row-dot products (bandwidth-bound, for a decode step's few rows):
# from 17 tokens at Mixtral's k = 2 (docs/performance.md#thresholds-and-chunk-sizes).
PANEL_MIN_ROWS = 34
# The same for bfloat16 expert weights (widened before the tiles run, while
# row-dot products read half the bytes): from 88 tokens at k = 2
# (docs/performance.md#bfloat16-experts-widened-inside-the-kernel).
PANEL_MIN_ROWS_BF16 = 176
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread")


def cache_dir() -> Path:
    return Path(os.environ.get("MIXTRAL_JAX_CACHE") or Path.home() / ".cache" / "mixtral_jax")


@functools.cache
def cpu_identity() -> str:
    """What `-march=native` builds for: the CPU's model name and instruction-set flags (Linux's
    /proc/cpuinfo), else what `platform` knows of it."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().split("\n\n")[0].splitlines()
    except OSError:
        lines = []
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags", "Features")]
    return "\n".join(keep) or f"{platform.machine()} {platform.processor()}"


def _library_path() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + jaxlib.__version__.encode()
                         + cpu_identity().encode())
    return cache_dir() / f"moe_cpu-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """Compiles the kernel into the cache folder (once) and returns the library's path.

    Raises RuntimeError with the compiler's message if it cannot be built.
    """
    lib = _library_path()
    if lib.exists():
        return lib
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH; install one (Debian: apt install g++)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        cmd = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the CPU MoE kernel failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        os.replace(out, lib)  # atomic: a concurrent build never sees half a file
    return lib


@functools.cache
def available() -> bool:
    """True when the kernel is built and registered with XLA:CPU (builds it on first call).

    False, with one line on stderr saying why, when it cannot be built; False
    silently when MIXTRAL_JAX_CPU_KERNEL=0 turns it off.
    """
    if os.environ.get("MIXTRAL_JAX_CPU_KERNEL", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
    except (RuntimeError, OSError) as err:
        print(f"[mixtral_jax] the CPU MoE kernel is not available, so the MoE block runs as XLA ops "
              f"(set MIXTRAL_JAX_CPU_KERNEL=0 to skip this check): {err}", file=sys.stderr, flush=True)
        return False
    global TARGET, LINEAR_TARGET, WRITE_CACHE_TARGET, ATTEND_TARGET
    key = _library_path().stem.rsplit("-", 1)[-1]
    TARGET, LINEAR_TARGET = f"mixtral_jax_moe_cpu_{key}", f"mixtral_jax_linear_cpu_{key}"
    WRITE_CACHE_TARGET, ATTEND_TARGET = f"mixtral_jax_write_cache_cpu_{key}", f"mixtral_jax_attend_cpu_{key}"
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.MoeCpu), platform="cpu")
    jax.ffi.register_ffi_target(LINEAR_TARGET, jax.ffi.pycapsule(lib.LinearCpu), platform="cpu")
    jax.ffi.register_ffi_target(WRITE_CACHE_TARGET, jax.ffi.pycapsule(lib.WriteCacheCpu), platform="cpu")
    jax.ffi.register_ffi_target(ATTEND_TARGET, jax.ffi.pycapsule(lib.AttendCpu), platform="cpu")
    return True


def usable(*arrays: jax.Array) -> bool:
    """Whether the kernels can take these operands: all float32, on the CPU backend, kernel available."""
    return (jax.default_backend() == "cpu" and all(a.dtype == jnp.float32 for a in arrays)
            and available())


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
MADV_COLLAPSE = 25  # linux/mman.h, Linux 6.1+


def use_huge_pages(params) -> int:
    """Asks Linux to back the memory of `params`' CPU buffers with 2 MiB pages now (madvise MADV_COLLAPSE
    on each 2 MiB region a buffer touches; XLA's allocations get 4 KiB pages where THP is "madvise").
    A decode step streams every weight it reads once, and each 4 KiB page is a TLB entry and a stop for
    the hardware prefetcher (docs/performance.md#weights-on-huge-pages). A hint: where the platform or
    kernel declines (not Linux, THP "never", a kernel before 6.1) nothing changes. Returns the bytes
    collapsed."""
    if not sys.platform.startswith("linux"):
        return 0
    regions = set()
    for leaf in jax.tree.leaves(params):
        for shard in getattr(leaf, "addressable_shards", ()):
            if shard.device.platform != "cpu":
                continue
            start = shard.data.unsafe_buffer_pointer()
            regions.update(range(start // HUGE_PAGE, (start + shard.data.nbytes + HUGE_PAGE - 1) // HUGE_PAGE))
    if not regions:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(HUGE_PAGE for r in sorted(regions) if libc.madvise(r * HUGE_PAGE, HUGE_PAGE, MADV_COLLAPSE) == 0)


def moe_usable(x: jax.Array, weights: list) -> bool:
    """Whether `moe_cpu` can take these: x float32 and the expert weights all float32, all bfloat16, or all
    quantized alike (quant.py: their qvalues all int8 or all packed int4)."""
    if any(isinstance(w, dict) for w in weights):
        return (all(isinstance(w, dict) for w in weights) and len({w["qvalue"].dtype for w in weights}) == 1
                and usable(x))
    return {w.dtype for w in weights} in ({jnp.dtype(jnp.float32)}, {jnp.dtype(jnp.bfloat16)}) and usable(x)


def moe_cpu(xs: jax.Array, group_sizes: jax.Array, experts: dict, chunk_bytes: int = CHUNK_BYTES,
            panel_min_rows: int | None = None, layer: int | None = None) -> jax.Array:
    """The grouped FFN: each contiguous group of rows through its expert's SwiGLU.

    xs [M, D] float32, rows sorted by expert; group_sizes [E] int32 (rows past
    their sum come out zero); experts: {"w1", "w3": [E, F, D], "w2": [E, D, F]},
    each weight stacked over the E experts in HF's [out, in] orientation (the
    per_expert layout's), all float32, all bfloat16, or all quantized alike
    ({"qvalue", "scale"} of quant.py in the same orientation: int8 with a scale
    per row, or int4 packed two per byte with float16 group scales), widened
    (times their scale) to float32 as they are read: the products are float32
    products with the dequantized weights. Each expert is read in place, at its
    offset in the stacked buffer.
    → [M, D] float32. Row-dot products below `panel_min_rows` rows (default
    PANEL_MIN_ROWS, or PANEL_MIN_ROWS_BF16 for bfloat16 weights), packed panels from there.
    With `layer` (an int), each weight stacks every layer's, [L, E, ...], and layer `layer`'s is read
    where it lies (XLA would copy the slice; one operand per weight for all layers keeps a decode
    step's dispatch short: docs/performance.md#every-layer-in-one-buffer-per-weight). So in every kernel here.
    """
    if not available():
        raise RuntimeError("the CPU MoE kernel is not available (see the warning above, or "
                           "MIXTRAL_JAX_CPU_KERNEL=0); use moe.grouped_ffn, which falls back to XLA ops.")
    weights = [experts[n] for n in ("w1", "w3", "w2")]
    if panel_min_rows is None:  # the panel path widens narrower weights before its tiles run
        panel_min_rows = PANEL_MIN_ROWS if not isinstance(weights[0], dict) and weights[0].dtype == jnp.float32 \
            else PANEL_MIN_ROWS_BF16
    weights = [a for w in weights for a in ((w["qvalue"], w["scale"]) if isinstance(w, dict) else (w,))]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(xs.shape, jnp.float32), vmap_method="sequential")
    return call(xs, group_sizes.astype(jnp.int32), *weights, chunk_bytes=int(chunk_bytes),
                panel_min_rows=int(panel_min_rows), layer=_layer(layer))


def _layer(layer: int | None) -> int:
    """The kernels' `layer` attribute: -1 for operands that are one layer's."""
    return -1 if layer is None else int(layer)


def linear_cpu(x: jax.Array, w, chunk_bytes: int = CHUNK_BYTES, layer: int | None = None) -> jax.Array:
    """x [N, I] @ w [O, I]ᵀ → [N, O], float32, for a few rows (the row-dot product of `moe_cpu`); with
    `layer`, w stacks every layer's [L, O, I] (and scales [L, O, 1]).

    w: float32, or int8 per output row or in groups along the row (quant.py: {"qvalue" [O, I], "scale"
    [O, 1] or [O, I / G], G a power of two}), widened times its scale as it is read: the products are float32
    products with the dequantized weight.
    """
    if not available():
        raise RuntimeError("the CPU kernel is not available (see the message above, or MIXTRAL_JAX_CPU_KERNEL=0).")
    weights = (w["qvalue"], w["scale"]) if isinstance(w, dict) else (w,)
    call = jax.ffi.ffi_call(LINEAR_TARGET, jax.ShapeDtypeStruct((x.shape[0], weights[0].shape[-2]), jnp.float32),
                            vmap_method="sequential")
    return call(x, *weights, chunk_bytes=int(chunk_bytes), layer=_layer(layer))


def write_cache_cpu(cache: jax.Array, update: jax.Array, index: jax.Array, rows: jax.Array | None = None,
                    layer: int | None = None) -> jax.Array:
    """cache [B, K, S, Dh] float32 with update [P, K, T, Dh] written at slots [index[r], index[r] + T) of
    cache row rows[r] for each update row r (index [P] int32, clamped as dynamic_update_slice's; rows [P],
    default 0..B-1 with P = B), in place: the result aliases `cache`. With `layer`, cache is every layer's
    [L, B, K, S, Dh] and layer `layer`'s is written."""
    if not available():
        raise RuntimeError("the CPU kernel is not available (see the message above, or MIXTRAL_JAX_CPU_KERNEL=0).")
    rows = jnp.arange(update.shape[0], dtype=jnp.int32) if rows is None else rows
    call = jax.ffi.ffi_call(WRITE_CACHE_TARGET, jax.ShapeDtypeStruct(cache.shape, cache.dtype),
                            input_output_aliases={0: 0}, vmap_method="sequential")
    return call(cache, update.astype(cache.dtype), index.astype(jnp.int32), rows.astype(jnp.int32),
                layer=_layer(layer))


def attend_cpu(q: jax.Array, k: jax.Array, v: jax.Array, rows: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
               window: int | None = None, layer: int | None = None) -> jax.Array:
    """Decode attention, one query per row, float32: q [P, H, Dh] over the slots of cache rows `rows` [P] of
    k, v [B, K, S, Dh] (with `layer`: layer `layer` of k, v [L, B, K, S, Dh]) that attention.attention_mask
    admits (k_pos [P, S] >= 0 and <= q_pos [P], within `window`), softmax in float32 → [P, H, Dh]. Reads
    only those slots, in place; a row that admits none gets zeros."""
    if not available():
        raise RuntimeError("the CPU kernel is not available (see the message above, or MIXTRAL_JAX_CPU_KERNEL=0).")
    call = jax.ffi.ffi_call(ATTEND_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q, k, v, rows.astype(jnp.int32), q_pos.astype(jnp.int32), k_pos.astype(jnp.int32),
                window=int(window or 0), layer=_layer(layer))
