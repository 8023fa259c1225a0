"""Compile-only comparison (libtpu, no TPU attached) of jax.lax.ragged_dot vs tokamax.ragged_dot
for Mixtral-8x7B's grouped expert FFN (D=4096, F=14336, E=8) on a v5e:1x1 compile-only device.

Run (tokamax and its dependencies kept out of the project's environment, in a target directory):
  pip install --no-deps -t /tmp/tk/site tokamax einshape jaxtyping qwix "typeguard==2.13.3" immutabledict tensorboardx
  PYTHONPATH=/tmp/tk/site python benchmarks/tokamax_compile.py [HLO_DIR]

Prints a table; writes each case's optimized HLO to HLO_DIR/<case>.txt (default /tmp/tokamax_hlo).
Tested with tokamax 0.0.12 and jax 0.10.2; it picks tokamax's TPU kernel config from a private module.
"""
import os
import re
import sys
import time
import traceback

for k, v in dict(TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
                 TPU_ACCELERATOR_TYPE="v5litepod-1", TPU_WORKER_HOSTNAMES="localhost").items():
    os.environ.setdefault(k, v)

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

import tokamax
from absl import logging as absl_logging

# tokamax logs an "Autotuning cache miss" WARNING per call (no autotuning cache for these shapes, so
# it uses its heuristic config: a small LUT of tuned tilings, else tiles 128x128x128). Keep the table clean.
absl_logging.set_verbosity(absl_logging.ERROR)
from tokamax._src.ops.ragged_dot import pallas_mosaic_tpu as tk_mtpu

D, F, E = 4096, 14336, 8
BF16 = jnp.bfloat16
HLO_DIR = sys.argv[1] if len(sys.argv) > 1 else "/tmp/tokamax_hlo"
os.makedirs(HLO_DIR, exist_ok=True)

desc = topologies.get_topology_desc(platform="tpu", topology_name="v5e:1x1", chip_config_name="default",
                                    chips_per_host_bounds=(1, 1, 1), num_slices=1, wrap=(False, False, False))
DEV = desc.devices[0]
SH = SingleDeviceSharding(DEV)
print(f"jax {jax.__version__}, tokamax {tokamax.__version__}, device {DEV.device_kind} ({DEV.platform})")


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=SH)


# ---- the ragged-dot variants -------------------------------------------------------------
def rd_lax(x, w, gs, out_dtype):
    return jax.lax.ragged_dot(x, w, gs, preferred_element_type=out_dtype)


def rd_tk(impl):
    def f(x, w, gs, out_dtype):
        return tokamax.ragged_dot(x, w, gs, preferred_element_type=out_dtype, implementation=impl)
    return f


def rd_tk_pad(impl, pad_to=128):
    """tokamax with x zero-padded to >= pad_to rows (Mosaic TPU needs every dim >= 128);
    group sizes still sum to the real M; the padded rows are sliced off."""
    def f(x, w, gs, out_dtype):
        m = x.shape[0]
        if m >= pad_to:
            return rd_tk(impl)(x, w, gs, out_dtype)
        xp = jnp.pad(x, ((0, pad_to - m), (0, 0)))
        return tokamax.ragged_dot(xp, w, gs, preferred_element_type=out_dtype, implementation=impl)[:m]
    return f


MOSAIC_TILES_K4096 = tk_mtpu.PallasMosaicTpuRaggedDot(config=tk_mtpu.Config(tile_m=256, tile_k=4096, tile_n=512))
MOSAIC_BIG_TILES = tk_mtpu.PallasMosaicTpuRaggedDot(config=tk_mtpu.Config(tile_m=512, tile_k=1024, tile_n=1024))

VARIANTS = {
    "lax.ragged_dot": rd_lax,
    "tk default": rd_tk(None),
    "tk 'xla'": rd_tk("xla"),
    "tk 'mosaic'": rd_tk("mosaic"),
    "tk 'triton'": rd_tk("triton"),
    "tk 'mosaic' pad128": rd_tk_pad("mosaic"),
    "tk mosaic tiles512x1024x1024": rd_tk(MOSAIC_BIG_TILES),
    "tk mosaic tiles256x4096x512": rd_tk(MOSAIC_TILES_K4096),
}


# ---- analysis helpers ----------------------------------------------------------------------
def analyse(compiled):
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ma = compiled.memory_analysis()
    txt = compiled.as_text()
    targets = sorted(set(re.findall(r'custom_call_target="([^"]+)"', txt)))
    kernels = []
    for m in re.finditer(r'(?m)^\s*(?:ROOT\s+)?%([\w\-]+?)(?:\.\d+)?\s*=[^\n]*custom_call_target="tpu_custom_call"', txt):
        window = txt[m.start():m.start() + 4000]
        til = (re.search(r'ragged_dot_tiling="([0-9]+),([0-9]+),([0-9]+)"', window)
               or re.search(r'tile_m\\?":\s*(\d+),\s*\\?"tile_k\\?":\s*(\d+),\s*\\?"tile_n\\?":\s*(\d+)', window))
        k = m.group(1) + ("[tiles " + ",".join(til.groups()) + "]" if til else "")
        if k not in kernels:
            kernels.append(k)
    return dict(flops=ca.get("flops", float("nan")), bytes=ca.get("bytes accessed", float("nan")),
                temp=getattr(ma, "temp_size_in_bytes", None), arg=getattr(ma, "argument_size_in_bytes", None),
                out=getattr(ma, "output_size_in_bytes", None), targets=targets, kernels=kernels, hlo=txt)


WEIGHT_SHAPES = (f"[{E},{D},{F}]", f"[{E},{F},{D}]")


def weight_materializations(hlo):
    """Instructions anywhere in the optimized HLO (fusion bodies included) that copy / slice /
    dynamic-slice a whole expert-weight array ([8,4096,14336], [8,14336,4096], or [1,8,...] of the
    stacked layers). A custom call cannot fuse such a producer, so each one means the slice is
    written out to HBM as a new buffer before the kernel reads it."""
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*bf16\[([0-9,]+)\]\S*\s+([\w\-]+)\(", line)
        if not m:
            continue
        name, dims, op = m.groups()
        if op not in ("copy", "slice", "dynamic-slice", "dynamic-update-slice", "transpose"):
            continue
        dims = dims[2:] if dims.startswith("1,") else dims
        if f"[{dims}]" in WEIGHT_SHAPES:
            found.append(f"{op}:{name}")
    return found


def compile_case(label, fn, arg_specs):
    t0 = time.time()
    try:
        with jax.default_device(DEV):  # tokamax picks its kernel from the default device
            lowered = jax.jit(fn, out_shardings=SH).lower(*arg_specs)
            compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if isinstance(e, ExceptionGroup):
            msg += " | " + " | ".join(f"{type(x).__name__}: {str(x).splitlines()[0][:120]}" for x in e.exceptions)
        return dict(ok=False, err=msg, secs=time.time() - t0)
    r = analyse(compiled)
    r.update(ok=True, secs=time.time() - t0)
    fname = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
    with open(f"{HLO_DIR}/{fname}.txt", "w") as f:
        f.write(r["hlo"])
    r["wmat"] = weight_materializations(r["hlo"])
    return r


def fmt_row(label, r, ideal_flops=None):
    if not r["ok"]:
        return f"{label:<58} FAIL  {r['err']}"
    ratio = f"{r['flops'] / ideal_flops:6.2f}x" if ideal_flops else "      "
    return (f"{label:<58} {r['flops']:>11.4g} {ratio} {r['bytes']:>11.4g} {r['temp'] or 0:>11.4g} "
            f"{r['secs']:>5.1f}s  {' '.join(r['kernels']) or '-'} (targets: {','.join(r['targets']) or '-'})")


HEADER = f"{'case':<58} {'flops':>11} {'/ideal':>7} {'bytes acc':>11} {'temp B':>11} {'cmpl':>6}  tpu_custom_call kernels (instruction name[tiles m,k,n]) (all custom-call targets)"


# ---- part 1: one grouped matmul x[M,D] @ w[E,D,F] ---------------------------------------------
def part1(Ms=(16, 512, 16384), out_dtypes=(BF16, jnp.float32)):
    print("\n=== Part 1: one ragged_dot x[M,4096] bf16 @ w[8,4096,14336] bf16, group_sizes int32[8] ===")
    print(f"ideal flops = 2*M*D*F; weight bytes = {E*D*F*2/1e9:.4g} GB")
    print(HEADER)
    notes = []
    for M in Ms:
        ideal = 2 * M * D * F
        for od in out_dtypes:
            specs = (sds((M, D), BF16), sds((E, D, F), BF16), sds((E,), jnp.int32))
            for name, rd in VARIANTS.items():
                if name.endswith("pad128") and M >= 128:
                    continue
                label = f"M={M:<5} out={jnp.dtype(od).name:<8} {name}"
                r = compile_case(label, lambda x, w, gs, rd=rd, od=od: rd(x, w, gs, od), specs)
                print(fmt_row(label, r, ideal), flush=True)


# ---- part 2: Mixtral SwiGLU expert block over 2 layers, scan vs unrolled -----------------------
def swiglu(rd, x, w1, w3, w2, gs):
    h1 = rd(x, w1, gs, BF16)
    h3 = rd(x, w3, gs, BF16)
    h = (jax.nn.silu(h1.astype(jnp.float32)) * h3.astype(jnp.float32)).astype(BF16)
    return rd(h, w2, gs, BF16)


def two_layers_scan(rd):
    def f(x, w1, w3, w2, gs):
        def body(x, ws):
            a, b, c = ws
            return swiglu(rd, x, a, b, c, gs), None
        y, _ = jax.lax.scan(body, x, (w1, w3, w2))
        return y
    return f


def two_layers_unrolled(rd):
    def f(x, w1, w3, w2, gs):
        for l in range(2):
            x = swiglu(rd, x, w1[l], w3[l], w2[l], gs)
        return x
    return f


def part2(Ms=(16, 512)):
    L = 2
    wbytes = L * 3 * E * D * F * 2
    print(f"\n=== Part 2: SwiGLU expert block (w1,w3 [2,8,D,F], w2 [2,8,F,D]) over 2 layers ===")
    print(f"weight bytes of the 2 layers = 2*3*8*4096*14336*2 B = {wbytes/1e9:.4g} GB; ideal flops = 2 layers*3*2*M*D*F")
    print(HEADER + "  | bytes/weight-bytes | weight-size materializations (op:name)")
    for M in Ms:
        ideal = L * 3 * 2 * M * D * F
        specs = (sds((M, D), BF16), sds((L, E, D, F), BF16), sds((L, E, D, F), BF16), sds((L, E, F, D), BF16),
                 sds((E,), jnp.int32))
        cands = {"lax.ragged_dot": rd_lax, "tk default": rd_tk(None), "tk 'mosaic'": rd_tk("mosaic")}
        if M < 128:
            cands["tk 'mosaic' pad128"] = rd_tk_pad("mosaic")
        for name, rd in cands.items():
            for mode, build in (("scan", two_layers_scan), ("unrolled", two_layers_unrolled)):
                label = f"M={M:<5} {mode:<8} {name}"
                r = compile_case(label, build(rd), specs)
                row = fmt_row(label, r, ideal)
                if r["ok"]:
                    wm = r["wmat"]
                    row += f"  | {r['bytes']/wbytes:5.2f} | {len(wm)}: {' '.join(wm[:8])}{' ...' if len(wm) > 8 else ''}"
                print(row, flush=True)


# ---- part 3: the stacked weights as 16 groups, layer chosen by zero group sizes (no slice) ---------
def two_layers_stacked_groups(rd, scan):
    """w*: [2,8,..] reshaped (a bitcast) to [16,..]; layer l uses group sizes that are zero except
    for groups 8l..8l+7. The kernel gets the whole stacked array as its operand, so nothing has to
    slice out one layer's experts."""
    def f(x, w1, w3, w2, gs):
        L = w1.shape[0]
        w1f, w3f, w2f = (w.reshape((L * E,) + w.shape[2:]) for w in (w1, w3, w2))

        def layer(x, l):
            gsl = jax.lax.dynamic_update_slice(jnp.zeros((L * E,), gs.dtype), gs, (l * E,))
            return swiglu(rd, x, w1f, w3f, w2f, gsl)
        if scan:
            y, _ = jax.lax.scan(lambda x, l: (layer(x, l), None), x, jnp.arange(L, dtype=jnp.int32))
            return y
        for l in range(L):
            x = layer(x, l)
        return x
    return f


def part3(Ms=(16, 512)):
    L = 2
    wbytes = L * 3 * E * D * F * 2
    print(f"\n=== Part 3: same 2-layer SwiGLU block, stacked weights passed whole as [16,..] groups, "
          f"group sizes zero outside layer l ===")
    print(HEADER + "  | bytes/weight-bytes | weight-size materializations (op:name)")
    for M in Ms:
        ideal = L * 3 * 2 * M * D * F
        specs = (sds((M, D), BF16), sds((L, E, D, F), BF16), sds((L, E, D, F), BF16), sds((L, E, F, D), BF16),
                 sds((E,), jnp.int32))
        cands = {"lax.ragged_dot": rd_lax, "tk default": rd_tk(None)}
        cands["tk 'mosaic' pad128" if M < 128 else "tk 'mosaic'"] = rd_tk_pad("mosaic")
        for name, rd in cands.items():
            for mode in ("scan", "unrolled"):
                label = f"M={M:<5} {mode:<8} 16grp {name}"
                r = compile_case(label, two_layers_stacked_groups(rd, mode == "scan"), specs)
                row = fmt_row(label, r, ideal)
                if r["ok"]:
                    wm = r["wmat"]
                    row += f"  | {r['bytes']/wbytes:5.2f} | {len(wm)}: {' '.join(wm[:8])}{' ...' if len(wm) > 8 else ''}"
                print(row, flush=True)


if __name__ == "__main__":
    parts = sys.argv[1:] or ["1", "2", "3"]
    if "1" in parts:
        part1()
    if "2" in parts:
        part2()
    if "3" in parts:
        part3()
