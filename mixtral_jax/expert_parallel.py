"""Expert parallelism: the MoE block on a mesh, each device sending each expert shard only its rows.

Tokens stay split over data × expert as they arrive; each device routes its
shard, sorts the assignments by expert (moe.py's functions), exchanges over
`expert` only the rows each expert shard needs (`ragged_all_to_all`; where the
compiler lacks it, an all_to_all of fixed slots with the same result), runs
the grouped FFN on its slice of F for the rows it received, and sends the
partial results back to be combined and summed over `tensor`. Dropless unless
`capacity_factor` bounds the rows per (token shard, expert); `count_dropped`
counts the drops exactly. `exchange_plan` is the arithmetic the planner reports.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mixtral_jax import quant, sharding
from mixtral_jax.moe import combine, grouped_ffn, inverse, route, sort_by_expert


def expert_capacity(tokens_per_device: int, num_experts: int, k: int, capacity_factor: float | None) -> int:
    """Rows each (data, expert) token shard may send to one expert.

    Dropless (capacity_factor None): all of a shard's tokens may choose the
    same expert, so the capacity is `tokens_per_device`. Otherwise the usual
    ceil(capacity_factor × tokens_per_device × k / E), clipped to [1, tokens_per_device].
    """
    if capacity_factor is None:
        return tokens_per_device
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive (or None for dropless), got {capacity_factor}.")
    return max(1, min(tokens_per_device, math.ceil(capacity_factor * tokens_per_device * k / num_experts)))


def within_capacity(experts: jax.Array, valid: jax.Array, num_experts: int, capacity: int) -> jax.Array:
    """Which assignments a device keeps: the first `capacity` valid ones (in token order) of each expert.

    Args:
      experts: [A] expert id per assignment (A = tokens × k, token-major).
      valid: [A] False for padding tokens, which are neither kept nor counted as dropped.

    Returns:
      keep [A] bool.
    """
    chosen = (experts[:, None] == jnp.arange(num_experts)) & valid[:, None]  # [A, E]
    rank = jnp.take_along_axis(jnp.cumsum(chosen, axis=0), experts[:, None], axis=1)[:, 0] - 1  # [A]
    return valid & (rank < capacity)


def _rows_per_source(tokens_per_device: int, e_loc: int, k: int, capacity: int) -> int:
    """The most rows one device sends one expert shard (a token chooses an expert once)."""
    return min(tokens_per_device * min(k, e_loc), e_loc * capacity)


def token_shards(mesh: Mesh) -> int:
    """How many ways `moe_expert_parallel` splits tokens: data × expert (each shard's `tensor` devices share it)."""
    return mesh.shape["data"] * mesh.shape["expert"]


def exchange_plan(tokens: int, num_experts: int, k: int, expert: int, data: int = 1,
                  capacity_factor: float | None = None) -> dict[str, int]:
    """Rows of the expert-parallel MoE per device and layer, from the design's arithmetic.

    Each device routes its (data, expert) shard's `tokens / (data × expert)`
    tokens (the same as its `tensor` peers) and sends every kept assignment to
    the device of the same tensor rank holding its expert, which returns the
    result of its F slice. The receive buffer is static, sized for the worst
    case (every real token of the exchange group choosing that device's
    experts; padding rows, where the shards outnumber the tokens, are never
    sent); the grouped matmul computes only the rows received. The mesh's
    `tensor` size changes no row count, only how F is split.

    Args:
      tokens: tokens in the batch (B × T); the mesh sizes `data` and `expert`.

    Returns (per device, one MoE layer):
      tokens_per_device: tokens it routes (padded up to divide data × expert).
      capacity: rows it may send one expert (`expert_capacity`).
      rows_per_source: the most rows it sends one expert shard: the slot of an all-to-all of
        fixed slots, where the compiler has no ragged-all-to-all.
      buffer_rows: rows of its receive buffer, which the grouped matmul's
        compiled cost counts (2 · rows · D · F / tensor per matmul).
      rows_balanced: rows it receives and computes when routing is balanced
        (each expert chosen by tokens × k / E assignments): tokens × k /
        (data × expert) for every device (ideal).
      rows_sent_balanced: rows a device holding tokens_per_device real tokens
        sends to other devices, and gets back, when balanced.
    """
    n = -(-tokens // (data * expert))
    e_loc = num_experts // expert
    capacity = expert_capacity(n, num_experts, k, capacity_factor)
    real = min(tokens, expert * n)  # real tokens of the fullest exchange group (one data slice)
    balanced = min(n * k / num_experts, capacity)  # rows one full source sends to one expert at balanced routing
    return {
        "tokens_per_device": n,
        "capacity": capacity,
        "rows_per_source": _rows_per_source(n, e_loc, k, capacity),
        "buffer_rows": min(expert * _rows_per_source(n, e_loc, k, capacity), real * min(k, e_loc)),
        "rows_balanced": round(e_loc * min(real * k / num_experts, expert * capacity)),
        "rows_sent_balanced": round(balanced * (num_experts - e_loc)),
    }


def has_ragged_all_to_all(devices) -> bool:
    """Whether the compiler for these devices has ragged-all-to-all: XLA:CPU has none, and libtpu
    (0.0.42.1) refuses it on v5e slices of more than 16 chips ("not supported in limited ICI
    routing settings"; v5e:4x4 compiles, v5e:4x8 and v5e:8x8 do not; v6e, v5p and v4 compile).
    The slice decides, not the exchange group: v5e:8x8 refuses it over 8 or even 2 devices."""
    first = devices.flat[0]
    return first.platform != "cpu" and not (first.device_kind == "TPU v5 lite" and devices.size > 16)


def _ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name,
                       slot_rows: int | None, recv_offsets):
    """lax.ragged_all_to_all; or, where the compiler lacks it (`slot_rows` given), the same result
    from a plain all_to_all of `slot_rows` rows per (source, destination) pair, at least as many as
    any source sends any destination: it moves that static worst case whatever the sizes.
    `recv_offsets` [G]: where each source's rows land here (the receiver's side of `output_offsets`,
    which the callers already know, so the fallback exchanges no offsets)."""
    if slot_rows is None:
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                         axis_name=axis_name)
    r = jnp.arange(slot_rows)
    rows = jnp.clip(input_offsets[:, None] + r, 0, operand.shape[0] - 1)  # [G, slot]
    send = jnp.where((r < send_sizes[:, None])[..., None], operand[rows], 0)  # [G, slot, D]: one per destination
    recv = jax.lax.all_to_all(send, axis_name, 0, 0)  # [G, slot, D]: each source's slice for me
    dest = jnp.where(r < recv_sizes[:, None], recv_offsets[:, None] + r, output.shape[0])  # past the end: dropped
    return output.at[dest.reshape(-1)].set(recv.reshape(-1, operand.shape[1]), mode="drop")


def _expert_parallel_local(x, valid, router, w1, w3, w2, *, k: int, capacity: int, buffer_rows: int,
                           slot_rows: int | None):
    """Per-device body of `moe_expert_parallel` (inside shard_map over data, expert, tensor).

    Args:
      x: [n, D] this (data, expert) shard's tokens, the same on its tensor peers; valid: [n] False on padding.
      router: [D, E] (replicated).
      w1, w3: [E_loc, D, F_loc]; w2: [E_loc, F_loc, D]: this device's experts, its slice of F.

    Returns:
      (out [n, D], number of dropped assignments over the whole mesh).

    The exchange spans the `expert` devices of one (data, tensor) pair: device
    s holds experts [s·E_loc, (s+1)·E_loc), so an assignment to expert e goes
    to device e // E_loc, which returns its F slice's partial result.
    """
    n, d = x.shape
    num_experts = router.shape[1]
    ep, tp = jax.lax.axis_size("expert"), jax.lax.axis_size("tensor")
    e_loc = num_experts // ep
    shard = jax.lax.axis_index("expert")
    with jax.named_scope("route"):
        weights, chosen = route(x, router, k)  # [n, k]
        valid_a = jnp.repeat(valid, k)  # [A]
        # A token chooses an expert once, so a capacity of n rows (dropless) keeps every valid one.
        keep = valid_a if capacity >= n else within_capacity(chosen.reshape(-1), valid_a, num_experts, capacity)
        flat = jnp.where(keep, chosen.reshape(-1), num_experts)  # drops and padding sort last, sent nowhere
    with jax.named_scope("sort"):
        order, counts = sort_by_expert(flat, num_experts)  # counts [E]: rows for each global expert
        xs = jnp.take(x, order // k, axis=0)  # [A, D]
        to_shard = counts.reshape(ep, e_loc).sum(axis=1)  # [EP]
        shard_start = jnp.cumsum(to_shard) - to_shard
        all_counts = jax.lax.all_gather(counts, "expert")  # [EP, E]: every source's rows per expert
        sent = all_counts.reshape(ep, ep, e_loc).sum(axis=2)  # [EP sources, EP shards]
        # Each source's rows for shard s land on s after those of earlier sources.
        land = jnp.cumsum(sent, axis=0) - sent  # [EP, EP]
        recv_sizes = sent[:, shard]  # [EP]
        recv_start = jnp.cumsum(recv_sizes) - recv_sizes
    with jax.named_scope("dispatch"):
        recv = _ragged_all_to_all(xs, jnp.zeros((buffer_rows, d), x.dtype), shard_start, to_shard, land[shard],
                                  recv_sizes, axis_name="expert", slot_rows=slot_rows, recv_offsets=land[:, shard])
        if e_loc == 1:  # rows arrive packed at the front, all for the one local expert: no regrouping
            order2, group_sizes, grouped = None, jnp.sum(recv_sizes, keepdims=True), recv
        else:  # received rows come by source, then local expert: regroup them by local expert
            mine = jax.lax.dynamic_slice_in_dim(all_counts, shard * e_loc, e_loc, axis=1).reshape(-1)  # [EP·E_loc]
            seg = jnp.searchsorted(jnp.cumsum(mine), jnp.arange(buffer_rows), side="right", method="compare_all")
            local = jnp.where(seg < mine.shape[0], seg % e_loc, e_loc)  # e_loc: an unused row
            order2, group_sizes = sort_by_expert(local, e_loc)
            grouped = jnp.take(recv, order2, axis=0)
    ys = grouped_ffn(grouped, group_sizes, {"w1": w1, "w3": w3, "w2": w2})
    with jax.named_scope("return"):
        # Rows go back in the activation dtype, F-partials too: rounding each of tensor partials costs
        # what rounding the whole expert output does at tensor=1 and halves the return (docs/planning.md).
        y = ys.astype(x.dtype)
        y = y if order2 is None else jnp.take(y, inverse(order2), axis=0)
        src_start = (jnp.cumsum(sent, axis=1) - sent)[:, shard]  # [EP]: where each source's rows for me began
        back = _ragged_all_to_all(y, jnp.zeros((flat.shape[0], d), y.dtype), recv_start, recv_sizes, src_start,
                                  to_shard, axis_name="expert", slot_rows=slot_rows, recv_offsets=shard_start)
    with jax.named_scope("combine"):
        y_rows = jnp.take(back, inverse(order), axis=0).reshape(n, k, d)
        gates = jnp.where(keep.reshape(n, k), weights, 0.0)
        if tp == 1:
            out = combine(y_rows, gates, x.dtype)
        else:
            out = jax.lax.psum(combine(y_rows, gates, jnp.float32), "tensor").astype(x.dtype)
    # Tensor peers route the same tokens, so each drop is counted once per (data, expert) shard.
    dropped = jax.lax.psum(jnp.sum(valid_a & ~keep, dtype=jnp.int32), ("data", "expert"))
    return out, dropped


def moe_expert_parallel(x: jax.Array, p, k: int, mesh: Mesh, capacity_factor: float | None = None):
    """Expert-parallel MoE over `mesh`: each device sends each expert shard only the rows it needs.

    Tokens are split over data × expert, as the activations arrive (padded to
    a multiple of that, so a decode batch smaller than the mesh works), and
    replicated over tensor. Each device routes its shard's tokens, sorts the
    assignments by expert, sends each expert shard's rows to the device of
    that shard with its own tensor rank (`ragged_all_to_all` over expert,
    sizes exchanged first), runs the grouped FFN on its slice of F for the
    rows it received, gets the partial results back in x's dtype, combines
    them in float32 and sums them over tensor.

    Args:
      x: [N, D] tokens.
      p: router [D, E], w1 / w3 [E, D, F], w2 [E, F, D] (sharded per `sharding.RULES`).
      k: experts per token.
      mesh: a mesh with axes (data, expert, tensor); expert must divide E and tensor F.
      capacity_factor: None for dropless, or the fraction of the even share
        tokens × k / E of rows each (data, expert) shard may send to one expert.

    Returns:
      (out [N, D] in x's dtype, dropped: int32 scalar, the number of (token,
      expert) assignments over capacity; always 0 when dropless).
    """
    n, d = x.shape
    num_experts = p["router"].shape[1]
    sizes = dict(mesh.shape)
    plan = exchange_plan(n, num_experts, k, sizes["expert"], sizes["data"], capacity_factor)
    padded = plan["tokens_per_device"] * token_shards(mesh)
    x_pad = jnp.pad(x, ((0, padded - n), (0, 0)))
    valid = jnp.arange(padded) < n
    w_in = _weight_spec(p["w1"], ("experts", "embed", "ffn"), mesh)
    w_out = _weight_spec(p["w2"], ("experts", "ffn", "embed"), mesh)
    tokens = P(("data", "expert"))  # as sharding.RULES["batch"] splits activations; replicated over tensor
    # Without ragged-all-to-all, a fixed slot per (source, destination): the most one source sends one
    # expert shard, which is also the most a device returns to one source.
    slot_rows = None if has_ragged_all_to_all(mesh.devices) else plan["rows_per_source"]
    body = jax.shard_map(
        functools.partial(_expert_parallel_local, k=k, capacity=plan["capacity"], buffer_rows=plan["buffer_rows"],
                          slot_rows=slot_rows),
        mesh=mesh, in_specs=(tokens, tokens, P(), w_in, w_in, w_out), out_specs=(tokens, P()))
    out, dropped = body(x_pad, valid, p["router"], p["w1"], p["w3"], p["w2"])
    return out[:n], dropped


def _weight_spec(w, axes, mesh):
    """PartitionSpec of a stacked expert weight, or of a quantized one's qvalue and scale (sharded alike; with
    every layer and the layer's index when the layer scan passes it whole: quant.at_layer)."""
    if quant.is_quantized(w):
        quant.check_split(w["qvalue"].shape[-1] if axes[-1] == "ffn" else w["scale"].shape[-2] * quant.GROUP,
                          quant.mode_of(w), mesh.shape["tensor"])
        qaxes = quant.axes(axes, quant.mode_of(w))
        if "layer" in w:
            return {"layer": P(), **{k: sharding.logical_to_spec(("layers", *qaxes[k]), mesh, w[k].shape)
                                     for k in ("qvalue", "scale")}}
        return {k: sharding.logical_to_spec(qaxes[k], mesh, w[k].shape) for k in ("qvalue", "scale")}
    return sharding.logical_to_spec(axes, mesh, w.shape)


def count_dropped(experts, num_shards: int, num_experts: int, capacity_factor: float | None):
    """Assignments that `moe_expert_parallel` drops for given router choices, per layer.

    Exact: the same split of tokens (contiguous, over the data × expert
    shards) and the same capacity rule (`within_capacity`). With
    `routing.expert_routing(model, tokens, capacity_factor=f)` it reports what
    a forward pass at capacity f drops.

    Args:
      experts: int [L, B, T, k] (or [L, N, k]) expert ids, tokens in row-major order.
      num_shards: data × expert of the mesh (`token_shards(mesh)`); tensor peers share their tokens.
      num_experts: E.
      capacity_factor: as in `moe_expert_parallel` (None: dropless, all zeros).

    Returns:
      int [L] numpy array: dropped (token, expert) assignments per layer.
    """
    experts = jnp.asarray(experts)
    num_layers, k = experts.shape[0], experts.shape[-1]
    experts = experts.reshape(num_layers, -1, k)  # [L, N, k]
    n = experts.shape[1]
    per_device = -(-n // num_shards)
    capacity = expert_capacity(per_device, num_experts, k, capacity_factor)
    pad = per_device * num_shards - n
    groups = jnp.pad(experts, ((0, 0), (0, pad), (0, 0))).reshape(num_layers, num_shards, per_device * k)
    valid = jnp.repeat(jnp.arange(per_device * num_shards) < n, k).reshape(num_shards, per_device * k)

    def dropped(group, valid_group):
        return jnp.sum(valid_group & ~within_capacity(group, valid_group, num_experts, capacity))

    per_group = jax.vmap(jax.vmap(dropped), in_axes=(0, None))(groups, valid)  # [L, shards]
    return jax.device_get(per_group.sum(axis=1))
