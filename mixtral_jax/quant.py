"""Weight-only quantization: int8 per output channel or in groups along the input, int4 in groups.

Modes (`MODES`): "int8" and "int4" quantize the experts (int8 per output
channel or int4) and the attention projections, lm_head and embedding (int8 in
both, as llama.cpp's Q4_K_M keeps its output matrix at 6 bits: the attention
projections with a scale per 32 inputs, the lm_head per output channel, the
embedding per 32 values of a token's row, so a lookup dequantizes only the rows
it reads; model.quantized says why); "int8-experts" and "int4-experts" only
the experts. Norms and router stay float.

A quantized weight is a dict {"qvalue", "scale"} in place of the float array
(the layout of Qwix's `QArray`: qvalue has the weight's shape, scale one value
per tile, broadcast back), so Orbax, NNX and jax.tree see plain arrays:

    stacked [..., in, out]       qvalue int8 [..., in, out]    (int4: uint8 [..., in/2, out], two per byte)
                                 scale [..., in/g, out]        g = in for int8 per output channel, else GROUP
    per_expert [out, in] (HF's)  the same arrays transposed (the packed pairs stay pairs along the input)

A per-channel int8 weight's input may span several axes (`in_axes`), its scale
size 1 on each; in groups, its input is one axis (wo [L, H, Dh, D]: Dh, so a
group never spans two heads) and a group is GROUP values or the largest
divisor of that axis below it (`int8_group`). int4 packs each group of 32 as 16
bytes, value i in the low nibble of byte i and value 16 + i in the high one
(llama.cpp's Q4_0 order: the CPU kernel widens 16 consecutive values from one load).

Symmetric (no zero point): w ≈ qvalue · scale with qvalue in QRANGE, [-127, 127]
for int8 and all 16 nibble values [-8, 7] for int4 (as llama.cpp's Q4_0). An
int8 scale is the smallest, rounded UP to float32, with which every w / scale
of the channel or group lies within that range. An int4 group's scale is one of 4 from
the smallest with which every w / scale lies within half a step of [-8, 7] to
the smallest that clips nothing (each rounded UP to float16): the one with the
least squared error weighted by |w| + the group's RMS, llama.cpp's weighting
for its K-quants without an importance matrix (a trained model's larger
weights matter more). Either way |w - dequantize(w)| ≤ scale / 2 for every
element (`error_bound`). What the search costs and gains against max|w| / 7
over [-7, 7]: docs/benchmarks.md#the-int4-scale.
int8 scales are float32 (4 bytes per D weights, or per 32: 1.125 bytes per
weight, where llama.cpp's Q8_0 takes 1.0625); int4 scales float16 (as
llama.cpp's Q4_0 blocks: 0.5 + 2/32 = 0.5625 bytes per weight).

Quantizing runs on the host in NumPy, so a checkpoint quantized by `convert`
and one quantized while `load` restores are the same bytes on any platform
(TPU float division is not IEEE-exact). Dequantizing is XLA ops in the
activation dtype (`dequantize`): the product then runs on the float weight,
as Qwix's weight-only `ragged_dot` does (it dequantizes, then calls
`lax.ragged_dot`); the CPU C++ kernel reads qvalue and scale directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("int8", "int4", "int8-experts", "int4-experts")
WIDTHS = ("int8", "int4")  # what a weight is stored in (an expert: its mode's width; the rest: int8)
# int4 group along the input: llama.cpp's Q4_0/Q4_K block; it divides every Mixtral dimension
# (and F / tensor for tensor ≤ 64), and 128 would cut the bytes by 8% while doubling the
# spread a group's largest weight sets (docs/benchmarks.md#quantized-weights).
GROUP = 32
QRANGE = {"int8": (-127, 127), "int4": (-8, 7)}  # the values a qvalue takes
# How far past QRANGE, in steps, a w / scale may lie (then clipped, erring no more than rounding does).
SLACK = {"int8": 0.0, "int4": 0.5}
SCALE_DTYPE = {"int8": np.dtype(np.float32), "int4": np.dtype(np.float16)}


def check_mode(mode: str | None) -> str | None:
    """None or one of MODES, else one clear ValueError."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)} "
                         "(or none for float weights).")
    return mode


def width(mode: str) -> str:
    """The experts' width of a mode: "int8" or "int4"."""
    return mode.split("-")[0]


def dense(mode: str | None) -> bool:
    """Whether a mode quantizes the attention projections and lm_head too (always to int8)."""
    return mode is not None and not mode.endswith("-experts")


def is_quantized(w) -> bool:
    return isinstance(w, Mapping) and "qvalue" in w


def int8_group(shape: tuple[int, ...], in_axes: tuple[int, ...], group: int | None) -> int | None:
    """An int8 weight's group along its one input axis: `group`, or the largest divisor of that axis's size
    below it (a power of two: 16 for a head of 16 values; Mixtral's sizes are multiples of 32); None stays
    None (a scale per output channel)."""
    if group is None:
        return None
    (a,) = in_axes
    return math.gcd(group, shape[a])


def shapes(shape: tuple[int, ...], mode: str, in_axes: tuple[int, ...] = (-2,),
           group: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{"qvalue": (shape, dtype), "scale": (shape, dtype)} for a stacked float weight [..., in, out]
    (`mode` a width; int8 may take its input from several axes `in_axes`, negative, or with `group` a
    scale per `group` values of its one input axis)."""
    if mode == "int8":
        group = int8_group(shape, in_axes, group)
        scale = tuple((1 if group is None else n // group) if i - len(shape) in in_axes else n
                      for i, n in enumerate(shape))
        return {"qvalue": (tuple(shape), np.dtype(np.int8)), "scale": (scale, SCALE_DTYPE[mode])}
    *lead, in_dim, out = shape  # int4: two values per byte, a scale per GROUP
    if in_dim % GROUP:
        raise ValueError(f"int4 quantization needs the experts' input sizes to be multiples of {GROUP}; "
                         f"got {in_dim}: use int8 for this model.")
    return {"qvalue": ((*lead, in_dim // 2, out), np.dtype(np.uint8)),
            "scale": ((*lead, in_dim // GROUP, out), SCALE_DTYPE[mode])}


def axes(float_axes: tuple, mode: str, in_axes: tuple[int, ...] = (-2,), group: int | None = None) -> dict[str, tuple]:
    """Logical axes of qvalue and scale from the float weight's: the same, but a per-channel int8 scale's
    input dimensions (size 1) are replicated."""
    n = len(float_axes)
    per_channel = mode == "int8" and group is None
    scale_axes = tuple(None if per_channel and i - n in in_axes else a for i, a in enumerate(float_axes))
    return {"qvalue": tuple(float_axes), "scale": scale_axes}


def check_split(ffn: int, mode: str | None, tensor: int) -> None:
    """int4 groups must not straddle devices: each `tensor` shard of F must hold whole groups."""
    if mode is not None and width(mode) == "int4" and (ffn // tensor) % GROUP:
        raise ValueError(f"int4 experts keep groups of {GROUP} along intermediate_size={ffn}, which tensor={tensor} "
                         f"splits into {ffn // tensor} per device, not a multiple of {GROUP}; use a smaller tensor "
                         "axis or int8.")


def mode_of(w) -> str | None:
    """The width, "int8" or "int4", or None (a float weight), from qvalue's dtype."""
    if not is_quantized(w):
        return None
    return "int8" if w["qvalue"].dtype == np.int8 else "int4"


def in_groups(w) -> bool:
    """Whether `w` is quantized with scales per group of its inputs (int4; int8 in groups): scales along
    the contracted axis, which XLA cannot fuse into a product's dequantize."""
    mode = mode_of(w)
    if mode != "int8":
        return mode == "int4"
    return any(m not in (1, n) for n, m in zip(w["qvalue"].shape, w["scale"].shape))


def quantize(w: np.ndarray, mode: str, in_axes: tuple[int, ...] = (-2,),
             group: int | None = None) -> dict[str, np.ndarray]:
    """Quantizes a stacked float weight [..., in, out] on the host (`mode` a width; int8: the input
    may span several axes `in_axes`, negative, or with `group` a scale per `group` values of its one input
    axis).

    Returns:
      {"qvalue", "scale"} NumPy arrays (shapes and dtypes from `shapes`).
    """
    w = np.asarray(w)
    spec = shapes(w.shape, mode, in_axes, group)
    if mode == "int4" and w.ndim > 2 and w.shape[0] > 1:  # one expert (or layer) at a time: bounded temporaries
        parts = [quantize(w[i], mode) for i in range(w.shape[0])]
        return {k: np.stack([p[k] for p in parts]) for k in ("qvalue", "scale")}
    w = w.astype(np.float32)
    (lo, hi), sdt = QRANGE[mode], SCALE_DTYPE[mode]
    group = GROUP if mode == "int4" else int8_group(w.shape, in_axes, group)  # int8 without one: per channel
    if group is None:  # tiles: the whole input, reduced with the scale's dimensions kept
        tiles, reduce = w, dict(axis=in_axes, keepdims=True)
    else:  # [..., in/g, g, ...] along the one input axis, reduced over g; the scale is broadcast back below
        a = in_axes[0] % w.ndim
        tiles, reduce = w.reshape(*w.shape[:a], w.shape[a] // group, group, *w.shape[a + 1:]), dict(axis=a + 1)
    top, bottom = (np.maximum(np.asarray(f(tiles, **reduce), np.float64) * sign, 0)
                   for f, sign in ((np.max, 1), (np.min, -1)))
    zero = (top == 0) & (bottom == 0)  # an all-zero tile: any scale, qvalue 0
    clip_free = np.where(zero, 1, np.maximum(top / hi, bottom / -lo))  # the smallest scale that clips nothing
    scale = _round_up(clip_free, sdt)
    spread = (lambda s: s) if group is None else (lambda s: np.expand_dims(s, a + 1))
    if mode == "int4":  # the other 3 candidates, down to half a step of clipping; the least weighted error
        slack = SLACK[mode]
        finest = np.where(zero, 1, np.maximum(top / (hi + slack), bottom / (slack - lo)))
        importance = np.abs(tiles) + np.sqrt(np.mean(np.square(tiles), axis=a + 1, keepdims=True))

        def error(s):
            wide = spread(s.astype(np.float32))
            return np.sum(importance * np.square(_levels(tiles, wide, lo, hi) * wide - tiles), axis=a + 1)

        best = error(scale)
        for f in (0, 1 / 3, 2 / 3):
            s = _round_up(finest + (clip_free - finest) * f, sdt)
            err = error(s)
            scale, best = np.where(err < best, s, scale), np.minimum(err, best)
    q = _levels(tiles, spread(scale.astype(np.float32)), lo, hi).astype(np.int8)
    if mode == "int4":  # per group of 32: value i in the low nibble of byte i, 16 + i in the high one
        half = GROUP // 2
        q = (q[..., :half, :] & 0xF).astype(np.uint8) | ((q[..., half:, :] & 0xF).astype(np.uint8) << 4)
    q = q.reshape(spec["qvalue"][0])
    assert q.shape == spec["qvalue"][0] and scale.shape == spec["scale"][0]
    return {"qvalue": q, "scale": scale}


def _round_up(need: np.ndarray, dtype) -> np.ndarray:
    """need (float64) in `dtype`, rounded up: no w / scale grows past the range it was chosen for."""
    scale = need.astype(dtype)
    return np.where(scale < need, np.nextafter(scale, np.asarray(np.inf, dtype)), scale)


def _levels(tiles: np.ndarray, scale: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The tiles' quantized values with this scale (float32 integers in [lo, hi]): times scale, dequantized."""
    return np.clip(np.rint(tiles / scale), lo, hi)


def _unpack(qvalue: jax.Array, axis: int) -> jax.Array:
    """int4 bytes → int8 values, twice as many along `axis` (each 16 bytes: 16 low nibbles, then 16 high),
    sign-extended."""
    half = GROUP // 2
    signed = jax.lax.bitcast_convert_type(qvalue, jnp.int8)
    blocks = signed.reshape(*signed.shape[:axis], -1, half, *signed.shape[axis + 1:])  # [..., in/32, 16, ...]
    low = jnp.right_shift(jnp.left_shift(blocks, 4), 4)
    high = jnp.right_shift(blocks, 4)
    both = jnp.concatenate([low, high], axis=axis + 1)  # [..., in/32, 32, ...]
    shape = list(qvalue.shape)
    shape[axis] *= 2
    return both.reshape(shape)


def at_layer(w):
    """A quantized weight the layer scan passes whole, with the layer's index ({"qvalue", "scale", "layer"}:
    `layout.Stacked.layers`), as that layer's {"qvalue", "scale"}; any other weight as it is."""
    if not (is_quantized(w) and "layer" in w):
        return w
    return {k: jax.lax.dynamic_index_in_dim(w[k], w["layer"], keepdims=False) for k in ("qvalue", "scale")}


def dequantize(w, dtype, axis: int = -2) -> jax.Array:
    """The float weight in `dtype`: qvalue · scale in float32, rounded once to `dtype`.

    A float weight is only cast. `axis` is int4's input dimension: -2 for
    stacked [..., in, out], -1 for per_expert [out, in] (int8 finds its
    groups, if any, from the scale's shape).
    """
    if not is_quantized(w):
        return w.astype(dtype)
    w = at_layer(w)
    q, scale = w["qvalue"], w["scale"]
    if q.dtype == jnp.int8:  # per channel, the scale broadcasts (size 1 along the input); in groups, repeated
        for i, (n, m) in enumerate(zip(q.shape, scale.shape)):
            if m not in (1, n):
                scale = jnp.repeat(scale, n // m, axis=i)
        return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)
    axis = axis % q.ndim
    q = _unpack(q, axis)
    groups = scale.shape[axis]
    tiled = q.reshape(*q.shape[:axis], groups, q.shape[axis] // groups, *q.shape[axis + 1:])
    out = tiled.astype(jnp.float32) * jnp.expand_dims(scale.astype(jnp.float32), axis + 1)
    return out.reshape(q.shape).astype(dtype)


def transpose(w):
    """A weight's last two dimensions swapped (stacked ↔ per_expert orientation), quantized or not."""
    return jax.tree.map(lambda a: jnp.swapaxes(a, -1, -2), w)


def error_bound(w: dict) -> np.ndarray:
    """The analytic bound on |w - dequantize(w)| per element of a stacked weight: scale / 2 of its tile,
    plus float32 rounding of the division and of qvalue · scale (2 · top ulps of the scale, top the largest
    |w| / scale: 127 or 8.5)."""
    scale = np.asarray(w["scale"], np.float32)
    mode = mode_of(w)
    lo, hi = QRANGE[mode]
    top = max(-lo, hi) + SLACK[mode]
    in_dim = np.asarray(w["qvalue"]).shape[-2] * (1 if mode == "int8" else 2)
    per_tile = scale * (0.5 + 2 * top * np.finfo(np.float32).eps)
    return np.repeat(per_tile, in_dim // scale.shape[-2], axis=-2)


def quantize_layers(w: jax.Array, mode: str, shardings: Mapping | None = None,
                    in_axes: tuple[int, ...] = (-2,), group: int | None = None) -> dict[str, jax.Array]:
    """A stacked device weight [L, ..., in, out] quantized (`mode`, `in_axes`, `group`: as `quantize`) one layer
    at a time through the host.

    `shardings`: {"qvalue", "scale"} target shardings (None: the default device).
    """
    parts = [quantize(np.asarray(jax.device_get(w[l])), mode, in_axes, group) for l in range(w.shape[0])]
    out = {k: np.stack([p[k] for p in parts]) for k in ("qvalue", "scale")}
    return {k: jax.device_put(v, None if shardings is None else shardings[k]) for k, v in out.items()}
