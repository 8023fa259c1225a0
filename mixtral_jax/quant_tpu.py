"""Products with weights quantized in groups along their inputs, on TPU: Pallas kernels that read the
quantized values and their scales and dequantize them in VMEM, tile by tile.

XLA cannot fuse such a dequantize into the product (a scale per 32 inputs is a scale along the contracted
axis): it writes each layer's weights out in float32 and reads them back, 34x the bytes a decode step holds
for int4 experts (docs/planning.md#8x7b-in-int8-on-a-v5e-4). These kernels read each weight tile once, as
stored: `matmul` for int4 experts, `int8_to_heads` and `int8_from_heads` for the attention projections'
int8 (wq, wk, wv and wo in their stacked [.., D, N, Dh] and [.., H, Dh, D] shapes: a reshape to one matrix
would be a copy on TPU, whose tiled layouts differ).

The arithmetic is `quant.dequantize`'s (qvalue · scale in float32, rounded once to the activations' dtype),
then the product in that dtype with float32 accumulation, as XLA's; only the order of the sums differs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mixtral_jax import quant

_HALF = quant.GROUP // 2  # a group of 32 inputs is 16 bytes: input i in byte i's low nibble, 16 + i in its high one


def _tile(n: int, sizes=(512, 256, 128)) -> int:
    """The largest of `sizes` dividing n (TPU blocks are multiples of 128 lanes), else n itself."""
    return next((t for t in sizes if n % t == 0), n)


def _out_type(shape, dtype, *inputs):
    # Inside shard_map the output varies over every mesh axis an input does.
    mat = jax.typeof(inputs[0]).mat
    mat = mat.update(varying=frozenset().union(*(jax.typeof(a).mat.varying for a in inputs)))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def _kernel(layer_ref, x_low_ref, x_high_ref, q_ref, scale_ref, o_ref, acc_ref):
    """o[e] = x_low · low(q[e]) · scale + x_high · high(q[e]) · scale, summed over the input tiles (grid axis 2)."""
    del layer_ref  # used by the index maps only
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    b = q_ref[0].astype(jnp.int32)
    low, high = (b << 28) >> 28, (b << 24) >> 28  # each nibble to the top, then an arithmetic shift: signed
    # The scales read as float16 bits (v5e has no float16 vectors); all are positive and finite.
    bits = scale_ref[0].astype(jnp.int32) & 0xFFFF
    exponent, mantissa = (bits >> 10) & 31, bits & 1023
    normal = pltpu.bitcast(((exponent + 112) << 23) | (mantissa << 13), jnp.float32)
    scale = jnp.where(exponent == 0, mantissa.astype(jnp.float32) * 2.0 ** -24, normal)  # [groups, n]
    groups, n = scale.shape
    scale = jnp.broadcast_to(scale[:, None, :], (groups, _HALF, n)).reshape(groups * _HALF, n)  # one per byte row
    dt = x_low_ref.dtype
    acc_ref[...] += (
        jnp.dot(x_low_ref[0], (low.astype(jnp.float32) * scale).astype(dt), preferred_element_type=jnp.float32)
        + jnp.dot(x_high_ref[0], (high.astype(jnp.float32) * scale).astype(dt), preferred_element_type=jnp.float32))

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[0] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def matmul(x: jax.Array, w: dict, out_dtype, interpret: bool = False) -> jax.Array:
    """x [X, M, K] times each of E int4 matrices w ({"qvalue": uint8 [E, K/2, N], "scale": float16 [E, K/32, N]},
    quant.py's stacked form) → [E, M, N] in `out_dtype`; X is 1 (the same rows for every matrix) or E.

    `w` may also be every layer's, [L, E, ...], with "layer": the layer's index (as the layer scan passes
    int4 experts, quant.at_layer): the kernel reads that layer's weight tiles where they lie, with no slice
    copied out first. `interpret` runs the kernel in Pallas's interpreter (any platform: the tests' reference check).
    """
    q, scale = w["qvalue"], quant.at_layer(w)["scale"]
    layer = jnp.asarray(w.get("layer", 0), jnp.int32).reshape(1)
    if "layer" not in w:
        q = q[None]  # one layer
    _, e, kp, n = q.shape
    xe, m, k = x.shape
    if k != 2 * kp or xe not in (1, e) or scale.shape != (e, k // quant.GROUP, n):
        raise ValueError(f"int4 product of x {x.shape} with qvalue {q.shape} and scale {scale.shape}: shapes disagree.")
    # The inputs each byte row pairs: x's columns g * 32 + i (low nibbles) and g * 32 + 16 + i (high), i < 16.
    split = x.reshape(xe, m, k // quant.GROUP, 2, _HALF)
    x_low, x_high = split[:, :, :, 0].reshape(xe, m, kp), split[:, :, :, 1].reshape(xe, m, kp)
    tk, tn = _tile(kp), _tile(n)
    x_map = (lambda i, j, l, layer: (i, 0, l)) if xe > 1 else (lambda i, j, l, layer: (0, 0, l))
    w_map = lambda i, j, l, layer: (layer[0], i, l, j)
    x_bytes = x.size * x.dtype.itemsize * (n // tn) * (e // xe)  # x's tiles are read again for each output tile
    cost = pl.CostEstimate(flops=2 * e * m * k * n, transcendentals=0,
                           bytes_accessed=(e * kp * n + e * k // quant.GROUP * n * 2 + x_bytes
                                           + e * m * n * jnp.dtype(out_dtype).itemsize))
    return pl.pallas_call(
        _kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(e, n // tn, kp // tk),
            in_specs=[pl.BlockSpec((1, m, tk), x_map), pl.BlockSpec((1, m, tk), x_map),
                      pl.BlockSpec((pl.Squeezed(), 1, tk, tn), w_map),
                      pl.BlockSpec((1, tk // _HALF, tn), lambda i, j, l, layer: (i, l, j))],
            out_specs=pl.BlockSpec((1, m, tn), lambda i, j, l, layer: (i, 0, j)),
            scratch_shapes=[pltpu.VMEM((m, tn), jnp.float32)]),
        out_shape=_out_type((e, m, n), out_dtype, x, q, scale),
        cost_estimate=cost, interpret=interpret,
    # Mosaic loads no float16 on v5e and takes the bits instead: a bitcast, which XLA makes a copy (of one
    # layer's scales, 1/9 of its bytes; on every layer's at once it would be hoisted out of the layer loop).
    )(layer, x_low, x_high, q, jax.lax.bitcast_convert_type(scale, jnp.int16))


def _rows_tile(m: int) -> int:
    """Rows per block: all of a decode step's, else 128 (a block's float32 accumulator must fit VMEM)."""
    return m if m <= 128 else 128


def _dequantize8(q, scale, dtype):
    """int8 q [K, N] times its float32 scales [K/G, N], each repeated over its group of G rows, in `dtype`."""
    groups, n = scale.shape
    scale = jnp.broadcast_to(scale[:, None, :], (groups, q.shape[0] // groups, n)).reshape(q.shape)
    return (q.astype(jnp.int32).astype(jnp.float32) * scale).astype(dtype)


def _layered(w: dict):
    """(qvalue, scale, layer [1]) with a leading layer axis: every layer's and the index where the layer scan
    passes the weight whole (quant.at_layer), else one layer's with index 0."""
    if "layer" in w:
        return w["qvalue"], w["scale"], jnp.asarray(w["layer"], jnp.int32).reshape(1)
    return w["qvalue"][None], w["scale"][None], jnp.zeros((1,), jnp.int32)


# XLA's TPU layout keeps an int8 [.., D, N, Dh] with fewer heads than this heads-major (N moved out of the
# tiled minor pair): the kernel then takes it as [.., N, D, Dh], a transpose that is a bitcast there, where
# the row-major form would be a copy of the whole weight.
_HEADS_MAJOR_BELOW = 4


def _to_heads_kernel(layer_ref, x_ref, q_ref, scale_ref, o_ref, acc_ref, heads_major: bool):
    """o[:, n] = x · dequantized q[:, n] for each head n, summed over the input tiles (grid axis 1)."""
    del layer_ref  # used by the index maps only
    k = pl.program_id(1)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...]
    for n in range(scale_ref.shape[1]):  # one head at a time: Mosaic multiplies 2-D tiles
        w = _dequantize8(q_ref[n] if heads_major else q_ref[:, n, :], scale_ref[:, n, :], x.dtype)
        acc_ref[:, n, :] += jnp.dot(x, w, preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(1) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def int8_to_heads(x: jax.Array, w: dict, out_dtype, interpret: bool = False) -> jax.Array:
    """x [M, D] times an int8 projection to heads (wq, wk, wv: {"qvalue": int8 [D, N, Dh], "scale": float32
    [D/G, N, Dh]}) → [M, N, Dh] in `out_dtype`.

    `w` may also be every layer's, [L, ...], with "layer": the layer's index (as the layer scan passes
    it, quant.at_layer), read where it lies. `interpret`: as `matmul`'s.
    """
    q, scale, layer = _layered(w)
    m, d = x.shape
    _, dq, n, dh = q.shape
    if dq != d or scale.shape[2:] != (n, dh) or d % scale.shape[1]:
        raise ValueError(f"int8 product of x {x.shape} with qvalue {q.shape} and scale {scale.shape}: shapes disagree.")
    group = d // scale.shape[1]
    tm, tk = _rows_tile(m), _tile(d)
    heads_major = n < _HEADS_MAJOR_BELOW
    if heads_major:
        q = q.transpose(0, 2, 1, 3)  # [L, N, D, Dh]
    q_block, q_map = (((pl.Squeezed(), n, tk, dh), lambda i, k, layer: (layer[0], 0, k, 0)) if heads_major else
                      ((pl.Squeezed(), tk, n, dh), lambda i, k, layer: (layer[0], k, 0, 0)))
    cost = pl.CostEstimate(flops=2 * m * d * n * dh, transcendentals=0,
                           bytes_accessed=(pl.cdiv(m, tm) * (d * n * dh + 4 * d // group * n * dh)
                                           + x.size * x.dtype.itemsize + m * n * dh * jnp.dtype(out_dtype).itemsize))
    return pl.pallas_call(
        functools.partial(_to_heads_kernel, heads_major=heads_major),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(pl.cdiv(m, tm), d // tk),
            in_specs=[pl.BlockSpec((tm, tk), lambda i, k, layer: (i, k)), pl.BlockSpec(q_block, q_map),
                      pl.BlockSpec((pl.Squeezed(), tk // group, n, dh), lambda i, k, layer: (layer[0], k, 0, 0))],
            out_specs=pl.BlockSpec((tm, n, dh), lambda i, k, layer: (i, 0, 0)),
            scratch_shapes=[pltpu.VMEM((tm, n, dh), jnp.float32)]),
        out_shape=_out_type((m, n, dh), out_dtype, x, q, scale),
        cost_estimate=cost, interpret=interpret,
    )(layer, x, q, scale)


def _from_heads_kernel(layer_ref, x_ref, q_ref, scale_ref, o_ref, acc_ref):
    """o = Σ_h x[h] · dequantized q[h], summed over the head tiles (grid axis 2)."""
    del layer_ref  # used by the index maps only
    h = pl.program_id(2)

    @pl.when(h == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    for a in range(q_ref.shape[0]):
        acc_ref[...] += jnp.dot(x_ref[a], _dequantize8(q_ref[a], scale_ref[a], x_ref.dtype),
                                preferred_element_type=jnp.float32)

    @pl.when(h == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "interpret"))
def int8_from_heads(x: jax.Array, w: dict, out_dtype, interpret: bool = False) -> jax.Array:
    """x [M, H, Dh] times an int8 projection from heads (wo: {"qvalue": int8 [H, Dh, D], "scale": float32
    [H, Dh/G, D]}), summed over H and Dh → [M, D] in `out_dtype`.

    `w` may also be every layer's, [L, ...], with "layer", as `int8_to_heads`'s.
    """
    q, scale, layer = _layered(w)
    m, h, dh = x.shape
    _, hq, dq, d = q.shape
    if (hq, dq) != (h, dh) or scale.shape[1::2] != (h, d) or dh % scale.shape[2]:
        raise ValueError(f"int8 product of x {x.shape} with qvalue {q.shape} and scale {scale.shape}: shapes disagree.")
    groups = scale.shape[2]
    # th heads per block: few enough for their dequantized tiles to fit VMEM.
    tm, tn, th = _rows_tile(m), _tile(d), _tile(h, (8, 4, 2, 1))
    xt = x.transpose(1, 0, 2)  # [H, M, Dh]: a head's rows as one 2-D tile
    cost = pl.CostEstimate(flops=2 * m * h * dh * d, transcendentals=0,
                           bytes_accessed=(pl.cdiv(m, tm) * (h * dh * d + 4 * h * groups * d)
                                           + x.size * x.dtype.itemsize * (d // tn)
                                           + m * d * jnp.dtype(out_dtype).itemsize))
    return pl.pallas_call(
        _from_heads_kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(pl.cdiv(m, tm), d // tn, h // th),
            in_specs=[pl.BlockSpec((th, tm, dh), lambda i, j, a, layer: (a, i, 0)),
                      pl.BlockSpec((pl.Squeezed(), th, dh, tn), lambda i, j, a, layer: (layer[0], a, 0, j)),
                      pl.BlockSpec((pl.Squeezed(), th, groups, tn), lambda i, j, a, layer: (layer[0], a, 0, j))],
            out_specs=pl.BlockSpec((tm, tn), lambda i, j, a, layer: (i, j)),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)]),
        out_shape=_out_type((m, d), out_dtype, x, q, scale),
        cost_estimate=cost, interpret=interpret,
    )(layer, xt, q, scale)
