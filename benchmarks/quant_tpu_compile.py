"""Compile-only comparison (libtpu, no TPU attached) of quantized expert FFNs on TPU: ours against Qwix's
`ragged_dot` and tokamax's `ragged_dot` on Qwix `QArray`s, for one layer of Mixtral-8x7B's experts
(D 4096, F 14336, 8 experts, bfloat16 activations) on a v5e:1x1 compile-only device.

Run (Qwix and tokamax kept out of the project's environment, in a target directory):
  pip install --no-deps -t /tmp/tk/site tokamax einshape jaxtyping qwix "typeguard==2.13.3" immutabledict tensorboardx
  PYTHONPATH=/tmp/tk/site python benchmarks/quant_tpu_compile.py

For each width (int8 per output channel; int4 in groups of 32 inputs, float16 scales) and row count
(16: a decode step of batch 8, top-2; 4096: a 2048-token prompt chunk) it compiles
h = silu(x @ w1) * (x @ w3), y = h @ w2 three ways and prints the compiler's FLOPs, bytes accessed and
temporary bytes beside the bytes the layer's weights hold:

  mixtral_jax        moe.grouped_ffn on quant.py's {"qvalue", "scale"} (what the model runs)
  qwix               qwix.ragged_dot on a QArray (weight-only: it dequantizes, then lax.ragged_dot)
  tokamax            tokamax.ragged_dot on the same QArray (its Mosaic TPU kernel from 128 rows)
  qwix every expert  (16 rows) qwix.einsum of every row with every expert, as our decode step does

Temporaries the size of the float weights mean XLA wrote the dequantized weights out and read them back.
Tested with qwix 0.1.8, tokamax 0.0.12, jax 0.10.2, libtpu 0.0.42.1.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's package
from mixtral_jax import topology  # noqa: E402

topology.quiet_libtpu_without_tpu()  # before JAX starts its backends

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import qwix  # noqa: E402
import tokamax  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from mixtral_jax import moe, quant  # noqa: E402

absl_logging.set_verbosity(absl_logging.ERROR)  # tokamax's "autotuning cache miss" warnings
D, F, E = 4096, 14336, 8
BF16 = jnp.bfloat16
DEV = topology.tpu_devices("v5e:1x1")[0]
SH = SingleDeviceSharding(DEV)


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=SH)


def ours_weight(width, i, o):
    """quant.py's stacked form of [E, i, o]."""
    if width == "int8":
        return {"qvalue": sds((E, i, o), jnp.int8), "scale": sds((E, 1, o), jnp.float32)}
    return {"qvalue": sds((E, i // 2, o), jnp.uint8), "scale": sds((E, i // quant.GROUP, o), jnp.float16)}


def qarray_weight(width, i, o):
    """The same weight as a Qwix QArray (int4 as jnp.int4, which XLA packs two per byte)."""
    if width == "int8":
        return qwix.QArray(sds((E, i, o), jnp.int8), sds((E, 1, o), jnp.float32))
    return qwix.QArray(sds((E, i, o), jnp.int4), sds((E, i // quant.GROUP, o), jnp.float16))


def swiglu(rd):
    def f(x, gs, w1, w3, w2):
        h = (jax.nn.silu(rd(x, w1, gs).astype(jnp.float32)) * rd(x, w3, gs).astype(jnp.float32)).astype(BF16)
        return rd(h, w2, gs).astype(jnp.float32)
    return f


def qwix_every_expert(x, gs, w1, w3, w2):
    """Every row through every expert with qwix.einsum (moe.every_expert's products); gs picks nothing here,
    so the FLOPs are E x the routed rows', as ours at decode."""
    del gs
    prod = lambda spec, a, w: qwix.einsum(spec, a, w, preferred_element_type=jnp.float32)
    h = (jax.nn.silu(prod("MD,EDF->EMF", x, w1)) * prod("MD,EDF->EMF", x, w3)).astype(BF16)
    return prod("EMF,EFD->EMD", h, w2).sum(0)


def ours(x, gs, w1, w3, w2):
    return moe.grouped_ffn(x, gs, {"w1": w1, "w3": w3, "w2": w2})


CASES = {
    "mixtral_jax": (ours, ours_weight),
    "qwix": (swiglu(lambda x, w, gs: qwix.ragged_dot(x, w, gs, preferred_element_type=jnp.float32).astype(BF16)),
             qarray_weight),
    "tokamax": (swiglu(lambda x, w, gs: tokamax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32)
                       .astype(BF16)), qarray_weight),
    "qwix every expert": (qwix_every_expert, qarray_weight),
}


def analyse(fn, args):
    with jax.default_device(DEV):  # tokamax picks its kernel from the default device
        compiled = jax.jit(fn, out_shardings=SH).lower(*args).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    ma = compiled.memory_analysis()
    calls = sorted({line.split('custom_call_target="')[1].split('"')[0]
                    for line in compiled.as_text().splitlines() if 'custom_call_target="' in line})
    return ca.get("flops", float("nan")), ca.get("bytes accessed", float("nan")), ma.temp_size_in_bytes, calls


def main():
    print(f"jax {jax.__version__}, qwix {qwix.__version__}, tokamax {tokamax.__version__}, {DEV.device_kind}")
    print(f"{'width':<5} {'rows':>5} {'case':<17} {'GFLOP':>8} {'/ideal':>7} {'GB accessed':>11} {'/held':>6} "
          f"{'temp GB':>8}  custom calls")
    for width in ("int8", "int4"):
        held = E * 3 * D * F * (1 + 4 / D if width == "int8" else 0.5 + 2 / quant.GROUP)
        for m in (16, 4096):
            ideal = 2 * 3 * m * D * F
            for name, (fn, weight) in CASES.items():
                if name == "qwix every expert" and m > 128:
                    continue
                args = (sds((m, D), BF16), sds((E,), jnp.int32), weight(width, D, F), weight(width, D, F),
                        weight(width, F, D))
                try:
                    flops, read, temp, calls = analyse(fn, args)
                except Exception as e:  # noqa: BLE001  (a library refusing a case is a result)
                    print(f"{width:<5} {m:>5} {name:<17} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
                    continue
                print(f"{width:<5} {m:>5} {name:<17} {flops / 1e9:>8.1f} {flops / ideal:>6.2f}x {read / 1e9:>11.2f} "
                      f"{read / held:>5.2f}x {temp / 1e9:>8.2f}  {', '.join(calls) or '-'}", flush=True)


if __name__ == "__main__":
    main()
