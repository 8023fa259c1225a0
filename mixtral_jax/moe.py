"""The mixture-of-experts block: route → sort by expert → grouped FFN → unsort → combine.

One algorithm on every platform, as small pure functions:

  route        softmax over all experts in float32, top-k, renormalise (as transformers).
  sort         the N·k (token, expert) assignments sorted by expert, so each
               expert's rows are one contiguous group (`sort_by_expert`).
  grouped FFN  each group through its expert's SwiGLU: `grouped_ffn`, the one
               platform seam. Stacked weights [E, D, F] (TPU/GPU, any mesh):
               `jax.lax.ragged_dot`, a grouped matmul over exactly the rows
               given. per_expert weights (one CPU device, layout.py): the
               C++ kernel of `cpu_kernel`. `grouped_ffn_reference`: every row
               through every expert, masked (tests; and where the kernel
               cannot run).
  unsort, combine  back to token order; the weighted sum over the k choices in float32.

Three paths run it: `moe_grouped` (one device), `expert_parallel.moe_expert_parallel` (a
mesh: tokens stay split over data × expert as they arrive; each device
exchanges over `expert` only the rows each expert shard needs, with
`ragged_all_to_all` (where the compiler lacks it, XLA:CPU and v5e slices of
more than 16 chips: an all_to_all of fixed slots, the same result), runs the
same grouped FFN on its F slice of what it received, and the partials are
summed over `tensor`), and `moe_grouped(..., all_experts=True)` (strategy
"dense": every expert on every token, the work a sparse MoE saves). Dropless
everywhere; on a mesh, `capacity_factor` optionally bounds the rows per
(token shard, expert), with exact drop counts
(`expert_parallel.count_dropped`). Figures: docs/performance.md, section "MoE".
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mixtral_jax import cpu_kernel, quant_tpu, quant
from mixtral_jax.layout import EXPERT_PARAMS, HFExperts

STRATEGIES = ("sparse", "dense")
HIGHEST = jax.lax.Precision.HIGHEST


def route(x: jax.Array, router: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Mixtral router: softmax over all experts in float32, top-k, renormalise.

    Args:
      x: [N, D] tokens.
      router: [D, E] router weight.
      k: experts per token.

    Returns:
      (weights [N, k] float32 summing to 1, expert ids [N, k] int32).
    """
    logits = jnp.einsum("ND,DE->NE", x, router)  # [N, E] in the model dtype, as HF
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_w, top_e = jax.lax.top_k(probs, k)
    return top_w / jnp.sum(top_w, axis=-1, keepdims=True), top_e.astype(jnp.int32)


def sort_by_expert(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Orders assignments by expert; ids >= num_experts (padding, drops) go last and join no group.

    Args:
      experts: [A] expert id per assignment.
      num_experts: E.

    Returns:
      (order [A]: the assignment at each sorted position, group_sizes [E] int32).
    """
    order = jnp.argsort(experts, stable=True)
    return order, jnp.bincount(experts, length=num_experts).astype(jnp.int32)


def inverse(order: jax.Array) -> jax.Array:
    """The permutation that undoes `order`: x[order][inverse(order)] == x."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def combine(y: jax.Array, weights: jax.Array, dtype) -> jax.Array:
    """Weighted sum over the k choices in float32. y [N, k, D]; weights [N, k] → [N, D] in `dtype`."""
    # HIGHEST: TPUs otherwise multiply float32 in one bfloat16 pass.
    return jnp.einsum("NKD,NK->ND", y.astype(jnp.float32), weights, precision=HIGHEST).astype(dtype)


# ---------------------------------------------------------------- the grouped FFN (the platform seam)


# Up to this many rows, stacked experts run as one batched product of every local expert on every
# row: it reads each weight once, in place from the layer scan's stacked buffer, while
# `ragged_dot` (a custom call) first copies the layer's experts out of it, three times the weight
# bytes of a decode step; its extra FLOPs (2·M per weight element) stay below what the weight
# reads cost at TPU ridge points of ~240 FLOP/byte (docs/performance.md#few-rows-one-batched-product).
DENSE_MAX_ROWS = 128


def grouped_ffn(xs: jax.Array, group_sizes: jax.Array, experts) -> jax.Array:
    """SwiGLU of each contiguous group of rows with its expert: w2(silu(x w1) * (x w3)).

    Rows past sum(group_sizes) belong to no expert and come out zero.

    Args:
      xs: [M, D] rows sorted by expert.
      group_sizes: [G] int32 rows per expert, in order.
      experts: the G experts' weights, either stacked {w1, w3: [G, D, F], w2:
        [G, F, D]} or the per_expert layout's `HFExperts` (w1, w3 [G, F, D],
        w2 [G, D, F]: HF's [out, in]).

    Returns:
      [M, D] float32 (a partial sum when F is a slice of the experts' hidden size).
    """
    with jax.named_scope("grouped_ffn"):
        stacked = not isinstance(experts, HFExperts)
        weights = [experts[n] for n in EXPERT_PARAMS] if stacked else experts.weights()
        if not stacked and cpu_kernel.moe_usable(xs, weights):
            return cpu_kernel.moe_cpu(xs, group_sizes, dict(zip(EXPERT_PARAMS, weights)), layer=experts.layer)
        _warn_if_widened(xs, weights)
        if stacked and xs.shape[0] > DENSE_MAX_ROWS:
            return _grouped_ffn_ragged(xs, group_sizes, experts)
        return grouped_ffn_reference(xs, group_sizes, experts)


def _grouped_ffn_ragged(xs, group_sizes, w):
    """lax.ragged_dot: a native grouped matmul on TPU/GPU; on XLA:CPU one dense masked dot."""
    # expert_dtype may be narrower, or the weights quantized: compute in the activation dtype.
    w1, w3, w2 = (quant.dequantize(w[n], xs.dtype) for n in EXPERT_PARAMS)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, group_sizes)) * jax.lax.ragged_dot(xs, w3, group_sizes)
    return jax.lax.ragged_dot(h, w2, group_sizes, preferred_element_type=jnp.float32)


def _f32_product(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """einsum with a float32 result; XLA:CPU has no bfloat16 x bfloat16 -> float32 dot, so there it widens first
    (chosen when lowering, so a TPU compile from a CPU host gets the TPU form)."""
    return jax.lax.platform_dependent(
        a, b, cpu=lambda a, b: jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32)),
        default=lambda a, b: jnp.einsum(spec, a, b, preferred_element_type=jnp.float32))


def every_expert(xs: jax.Array, experts) -> jax.Array:
    """Every stacked expert on every row, as one batched product: xs [M, D] → [E, M, D] float32.

    int4 experts on TPU go through quant_tpu.py's kernel, which reads them as stored; XLA would write
    each layer's weights out dequantized first (its scales run along the contracted axis)."""
    def xla(xs, experts):
        w1, w3, w2 = (quant.dequantize(experts[n], xs.dtype) for n in EXPERT_PARAMS)
        h = jax.nn.silu(jnp.einsum("MD,EDF->EMF", xs, w1)) * jnp.einsum("MD,EDF->EMF", xs, w3)
        return _f32_product("EMF,EFD->EMD", h, w2)

    if quant.mode_of(experts["w1"]) != "int4":
        return xla(xs, experts)

    def tpu(xs, experts):
        w1, w3, w2 = (experts[n] for n in EXPERT_PARAMS)
        h = jax.nn.silu(quant_tpu.matmul(xs[None], w1, xs.dtype)) * quant_tpu.matmul(xs[None], w3, xs.dtype)
        return quant_tpu.matmul(h, w2, jnp.float32)

    # Chosen when lowering, so a TPU compile from a CPU host gets the kernel.
    return jax.lax.platform_dependent(xs, experts, tpu=tpu, default=xla)


def grouped_ffn_reference(xs: jax.Array, group_sizes: jax.Array, experts) -> jax.Array:
    """`grouped_ffn` as every row through every expert, each row keeping its own expert's result.

    Stacked weights run as one batched product over the experts (reading each weight once);
    per_expert ones (`HFExperts`) one expert at a time.
    """
    ends = jnp.cumsum(group_sizes)
    expert_of_row = jnp.searchsorted(ends, jnp.arange(xs.shape[0]), side="right", method="compare_all")  # [M]
    if not isinstance(experts, HFExperts):
        y = every_expert(xs, experts)  # [E, M, D]
        mine = expert_of_row[None, :] == jnp.arange(y.shape[0])[:, None]  # [E, M]
        # where, not a product: an unused expert's NaN stays out.
        return jnp.sum(jnp.where(mine[:, :, None], y, 0.0), axis=0)
    out = jnp.zeros(xs.shape, jnp.float32)
    for e in range(group_sizes.shape[0]):
        w1, w3, w2 = (quant.dequantize(w, xs.dtype, axis=-1).T for w in experts.expert(e))
        y = jnp.dot(jax.nn.silu(xs @ w1) * (xs @ w3), w2, preferred_element_type=jnp.float32)
        out = jnp.where((expert_of_row == e)[:, None], y, out)
    return out


# ---------------------------------------------------------------- one device


def moe_grouped(x: jax.Array, p, k: int, all_experts: bool = False, active: jax.Array | None = None) -> jax.Array:
    """The MoE block on one device: route, sort, grouped FFN, unsort, combine. x [N, D] → [N, D].

    `active` [N] bool, if given: rows where it is False join no expert's group and come out zero
    (padding, a serving engine's idle slots), so an expert only they chose is not read at all.

    With `all_experts` every token runs through every expert, the unchosen
    ones weighted zero (the dense work, for comparisons). Stacked experts and
    few tokens (decode), or `all_experts`, skip the sort: each expert runs
    once on every token, not on each of its k sorted copies.
    """
    n, d = x.shape
    experts = expert_weights(p)
    num_experts = p["router"].shape[1]
    with jax.named_scope("route"):
        weights, chosen = route(x, p["router"], k)  # [N, k]
    if not isinstance(experts, HFExperts) and (all_experts or n <= DENSE_MAX_ROWS):
        with jax.named_scope("grouped_ffn"):
            _warn_if_widened(x, list(experts.values()))
            y = every_expert(x, experts)  # [E, N, D]
        with jax.named_scope("combine"):
            gates = dense_gates(weights, chosen, num_experts)  # [N, E]
            if active is not None:
                gates = jnp.where(active[:, None], gates, 0.0)
            if not all_experts:  # where, not a product: an unchosen expert's NaN stays out
                y = jnp.where((gates > 0).T[:, :, None], y, 0.0)
            return jnp.einsum("END,NE->ND", y, gates, precision=HIGHEST).astype(x.dtype)
    with jax.named_scope("route"):
        if all_experts:
            weights = dense_gates(weights, chosen, num_experts)  # [N, E]
            chosen = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), (n, num_experts))
        per_token = chosen.shape[1]
    if active is not None:
        chosen = jnp.where(active[:, None], chosen, num_experts)  # sorted last, in no group
    with jax.named_scope("sort"):
        order, group_sizes = sort_by_expert(chosen.reshape(-1), num_experts)
        xs = jnp.take(x, order // per_token, axis=0)  # [A, D], A = N k
    ys = grouped_ffn(xs, group_sizes, experts)
    with jax.named_scope("combine"):
        y = jnp.take(ys, inverse(order), axis=0).reshape(n, per_token, d)
        return combine(y, weights, x.dtype)


def dense_gates(weights: jax.Array, experts: jax.Array, num_experts: int) -> jax.Array:
    """Top-k routing ([N, k] weights and expert ids) as [N, E] gates, zero where unchosen."""
    onehot = experts[..., None] == jnp.arange(num_experts)
    return jnp.sum(jnp.where(onehot, weights[..., None], 0.0), axis=1)


def expert_weights(p):
    """A layer's experts as `grouped_ffn` takes them: the per_expert layout's `HFExperts`, or the stacked
    w1, w3, w2."""
    if "experts" not in p:
        return {n: p[n] for n in EXPERT_PARAMS}
    return p["experts"] if isinstance(p["experts"], HFExperts) else HFExperts(**p["experts"])


# ---------------------------------------------------------------- entry point


def moe(x, p, k, strategy: str = "sparse", mesh: Mesh | None = None, capacity_factor: float | None = None,
        active: jax.Array | None = None):
    """MoE block on [..., D] activations.

    On a mesh of more than one device: `moe_expert_parallel` (with
    `capacity_factor`). Otherwise `moe_grouped`, which never drops; strategy
    "dense" runs every expert on every token instead of the chosen ones.
    `active` [...] bool (optional): tokens whose output is never used (padding, idle serving slots);
    on one device with sparse dispatch they skip the experts and come out zero, elsewhere they run.
    `p`: router [D, E] and the experts, stacked (w1, w3, w2) or per_expert (`experts`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown MoE strategy {strategy!r}; choose one of {STRATEGIES}.")
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    if mesh is not None and mesh.size > 1:
        from mixtral_jax.expert_parallel import moe_expert_parallel  # it builds on this module's functions

        out, _ = moe_expert_parallel(x, p, k, mesh, capacity_factor)
    elif capacity_factor is not None:
        raise ValueError("capacity_factor applies to expert-parallel dispatch on a mesh of more than one device; "
                         "leave it unset here (single-device dispatch never drops tokens).")
    else:
        # One row needs no mask: an inactive one's output is never read (and batch-1 decode stays as lean).
        skip = active is not None and strategy != "dense" and x.shape[0] > 1
        out = moe_grouped(x, p, k, all_experts=strategy == "dense", active=active.reshape(-1) if skip else None)
    return out.reshape(shape)


def _warn_if_widened(x, weights) -> None:
    """Warns (at trace time) when XLA ops on the CPU must widen narrower expert weights at every call.

    XLA:CPU's bfloat16 -> float32 convert is slow (docs/performance.md#bfloat16-experts-widened-inside-the-kernel);
    the C++ kernel widens as it reads instead.
    """
    if jax.default_backend() == "cpu" and any(not quant.is_quantized(w) and w.dtype.itemsize < x.dtype.itemsize
                                              for w in weights):
        warnings.warn(f"expert weights in {weights[0].dtype} with {x.dtype} compute run as XLA ops here, which "
                      "widen every expert they run at each call, slowly on the CPU; the C++ kernel (one CPU "
                      "device, per_expert layout, g++) widens them as it reads, or load with expert_dtype=None.",
                      stacklevel=3)
