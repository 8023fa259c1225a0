"""Mixture-of-experts block as small pure functions: route → dispatch → experts → combine.

Dispatch strategies (all numerically equal to a per-expert loop):
  dense   every expert runs on every token; unchosen ones get weight zero.
          The simple reference; cost grows with the number of experts.
  sparse  only the chosen experts run. Dropless; cost grows with tokens ×
          top-k, not with experts. For stacked weights: assignments sorted
          by expert and packed into per-expert blocks (`moe_sparse`). For
          per_expert weights (one buffer per expert, the CPU layout) and
          float32 activations (expert weights float32, or bfloat16 widened
          as read): the C++ kernel of `cpu_kernel` (`moe_kernel`), which reads
          only the chosen experts' weights with both cores, as row-dot
          products for a decode step's few rows and as register tiles over
          packed panels of each expert's rows for more. Where it cannot run
          (a bfloat16 model, no compiler), XLA ops: up to 8 tokens each chosen expert
          runs on all of them behind a `lax.cond`, or in a decode step on its
          one row when only one token chose it (`moe_per_expert_masked`);
          beyond, each expert's sorted rows run as one block of about the
          group's size (`moe_per_expert_grouped`).

On a mesh of more than one device the block is expert-parallel instead
(`moe_expert_parallel`): tokens split over every device, all_to_all to the
experts' shards at a fixed capacity, computed tensor-parallel over F,
all_to_all back, combined.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from mixtral_jax import cpu_kernel, sharding

STRATEGIES = ("dense", "sparse")

# Per-expert layout (one CPU device), sparse. Up to MASKED_MAX_TOKENS tokens
# (a decode step of a small batch), each chosen expert runs once on all of
# them, gated, behind a `lax.cond`; XLA:CPU's product costs about the same for
# 2 to 8 rows (docs/cpu_probe/results/ffn_layout.txt), so gathering each
# expert's own rows would gain little and cost compile time. One row is the
# exception: a matrix-vector product streams 20-29% faster (24.9 vs 32.1 ms for
# 16 bench-model experts at 1 vs 4 rows; 47.9 vs 57.4 ms for two 8x7B-sized
# ones, docs/cpu_probe/results/expert_parts.txt), so in a decode step an expert
# chosen by exactly one token runs on that row alone (a third `lax.switch`
# branch: batch 2/4/8 decode of the bench model 1.15x/1.09x/1.08x faster, for
# 0.2-1.9 s more compile, 1.0-1.9 s in five of six pairs of runs;
# docs/cpu_probe/results/single_row.txt). Beyond, tokens
# are grouped by expert and each expert's rows run as ONE matmul block, its
# row count the smallest of `group_block_sizes` that holds the group, picked by
# a `lax.switch`: multiples of GROUP_STEP up to GROUP_MAX (and HALF_STEP when
# groups are small); a group beyond GROUP_MAX first runs whole GROUP_MAX blocks
# in a loop. One block per expert beats a cascade of 128/64/32/16-row blocks
# (each re-reads the expert's weights, and small blocks run slower): 102.5 vs
# 107.6 ms for a T=512 layer of the bench model
# (docs/cpu_probe/results/prefill_groups.txt).
# A call that runs once (a prompt, `one_shot`) stays masked up to
# MASKED_MAX_ONE_SHOT tokens: there the grouped path's extra compile time
# outweighs its run time (a 16-token prefill of the bench model: first call
# 4.9-5.0 s grouped vs 1.9-2.6 s masked, both 0.1-0.2 s after).
# With float32 per_expert weights on XLA:CPU, every MoE block is one call of the
# C++ kernel (`moe_kernel`) when it builds. Up to 16 rows it computes row-dot
# products, a bandwidth-bound decode step (docs/cpu_probe/results/cpu_kernel.txt,
# kernel vs XLA ops, 8 layers of the bench model's experts in three runs; one
# layer of 8x7B-sized ones):
#   tokens    1            4            8
#   bench     1.12-1.25x   1.13-1.15x   1.14-1.19x
#   8x7B      1.00x        1.04x        1.04x
# From 17 rows (cpu_kernel.PANEL_MIN_ROWS) it runs register tiles over packed
# panels of each expert's rows, compute-bound, about as fast as XLA's grouped
# matmuls (XLA/kernel 0.92-0.99x at 24-32 rows, 1.00x at 64, 1.07-1.09x at
# 128-512; a 512-token prefill of the whole bench model 1.01-1.03x) but with
# none of their switch branches to compile: the first call with a 512-token
# prompt compiles in 1.7-1.9 s instead of 10.0 s, batch-16 and batch-64 ones
# in 1.4-1.5 s instead of 8.2-10.7 s (docs/cpu_probe/results/cpu_kernel_panel.txt).
MASKED_MAX_TOKENS = 8
MASKED_MAX_ONE_SHOT = 16
HALF_STEP = 8
GROUP_STEP = 16
GROUP_MAX = 256


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


def expert_ffn(x: jax.Array, w1: jax.Array, w3: jax.Array, w2: jax.Array) -> jax.Array:
    """SwiGLU expert: w2(silu(x w1) * (x w3)). x [..., D]; w1, w3 [D, F]; w2 [F, D]."""
    h = jax.nn.silu(x @ w1) * (x @ w3)  # [..., F]
    return h @ w2  # [..., D]


def combine(y: jax.Array, weights: jax.Array, dtype) -> jax.Array:
    """Weighted sum over the k slots in float32. y [N, k, D]; weights [N, k] → [N, D]."""
    out = jnp.einsum("NKD,NK->ND", y.astype(jnp.float32), weights)
    return out.astype(dtype)


def moe_dense(x, p, k):
    """All experts on all tokens, unchosen ones weighted zero. x [N, D] → [N, D]."""
    with jax.named_scope("moe_dense"):
        weights, experts = route(x, p["router"], k)
        gate = jnp.zeros((x.shape[0], p["w1"].shape[0]), jnp.float32)  # [N, E]
        gate = gate.at[jnp.arange(x.shape[0])[:, None], experts].add(weights)
        h = jax.nn.silu(jnp.einsum("ND,EDF->ENF", x, p["w1"])) * jnp.einsum("ND,EDF->ENF", x, p["w3"])
        y = jnp.einsum("ENF,EFD->END", h, p["w2"])  # [E, N, D]
        out = jnp.einsum("END,NE->ND", y.astype(jnp.float32), gate)
        return out.astype(x.dtype)


def block_size_for(num_assignments: int, num_experts: int) -> int:
    """Rows per block for sparse dispatch.

    One row per block when there are fewer assignments than experts (decode:
    fetch exactly the chosen experts); otherwise blocks sized near the mean
    group so padding stays below one block per expert.
    """
    mean = num_assignments // num_experts
    if mean < 1:
        return 1
    return int(min(128, 1 << (mean.bit_length() - 1)))


def sort_into_blocks(experts: jax.Array, num_experts: int, block: int):
    """Plans a dropless grouped layout: assignments sorted by expert, groups padded to `block`.

    Args:
      experts: [A] expert id per assignment.
      num_experts: E.
      block: rows per block.

    Returns:
      dest: [A] row of each assignment in the padded layout.
      block_expert: [nb] expert of each block.
      block_used: [nb] whether the block holds any assignment.
      nb: static number of blocks (an upper bound for any routing).
    """
    a = experts.shape[0]
    sizes = jnp.bincount(experts, length=num_experts)  # [E]
    padded = (sizes + block - 1) // block * block
    start = jnp.cumsum(sizes) - sizes  # first sorted index of each expert
    pstart = jnp.cumsum(padded) - padded  # first padded row of each expert
    order = jnp.argsort(experts, stable=True)
    rank = jnp.arange(a) - start[experts[order]]
    dest = jnp.zeros((a,), jnp.int32).at[order].set((pstart[experts[order]] + rank).astype(jnp.int32))
    nb = -(-(a + num_experts * (block - 1)) // block)
    row0 = jnp.arange(nb) * block
    block_expert = jnp.clip(jnp.searchsorted(jnp.cumsum(padded), row0, side="right"), 0, num_experts - 1)
    block_used = row0 < jnp.sum(padded)
    return dest, block_expert.astype(jnp.int32), block_used, nb


def moe_sparse(x, p, k, block: int | None = None):
    """Only the chosen experts run: sorted, block-padded grouped compute. x [N, D] → [N, D]."""
    with jax.named_scope("moe_sparse"):
        n, d = x.shape
        num_experts = p["w1"].shape[0]
        weights, experts = route(x, p["router"], k)
        flat_e = experts.reshape(-1)  # [A], A = N k
        block = block or block_size_for(flat_e.shape[0], num_experts)
        dest, block_expert, block_used, nb = sort_into_blocks(flat_e, num_experts, block)
        x_rows = jnp.repeat(x, k, axis=0)  # [A, D]: assignment a is token a // k
        x_pad = jnp.zeros((nb * block, d), x.dtype).at[dest].set(x_rows)

        def run_block(_, inp):
            xb, e, used = inp
            yb = jax.lax.cond(
                used,
                lambda: expert_ffn(xb, p["w1"][e], p["w3"][e], p["w2"][e]),
                lambda: jnp.zeros_like(xb))
            return None, yb

        _, y_pad = jax.lax.scan(run_block, None, (x_pad.reshape(nb, block, d), block_expert, block_used))
        y = y_pad.reshape(nb * block, d)[dest].reshape(n, k, d)
        return combine(y, weights, x.dtype)


def expert_capacity(tokens_per_device: int, num_experts: int, k: int, capacity_factor: float | None) -> int:
    """Slots per (source device, expert) in the expert-parallel all_to_all buffers.

    Dropless (capacity_factor None): all of a device's tokens may choose the
    same expert, so the capacity is `tokens_per_device`. Otherwise the usual
    ceil(capacity_factor × tokens_per_device × k / E), clipped to [1, tokens_per_device].
    """
    if capacity_factor is None:
        return tokens_per_device
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive (or None for dropless), got {capacity_factor}.")
    return max(1, min(tokens_per_device, math.ceil(capacity_factor * tokens_per_device * k / num_experts)))


def dispatch_slots(experts: jax.Array, valid: jax.Array, num_experts: int, capacity: int):
    """Where each assignment goes in a device's send buffer of E × C rows.

    The c-th valid assignment (in token order) to expert e takes row e·C + c;
    assignments past the capacity are dropped (their expert output is zero).

    Args:
      experts: [A] expert id per assignment (A = tokens × k, token-major).
      valid: [A] False for padding tokens, which take no slot and are not counted as dropped.
      num_experts: E.
      capacity: C.

    Returns:
      (slot [A] int32, E·C for assignments without a row; keep [A] bool).
    """
    chosen = (experts[:, None] == jnp.arange(num_experts)) & valid[:, None]  # [A, E]
    rank = jnp.take_along_axis(jnp.cumsum(chosen, axis=0), experts[:, None], axis=1)[:, 0] - 1  # [A]
    keep = valid & (rank < capacity)
    slot = jnp.where(keep, experts * capacity + rank, num_experts * capacity)
    return slot.astype(jnp.int32), keep


def _expert_parallel_local(x, valid, router, w1, w3, w2, *, k: int, capacity: int):
    """Per-device body of `moe_expert_parallel` (inside shard_map).

    Args:
      x: [n, D] this device's tokens; valid: [n] False on padding.
      router: [D, E] (replicated).
      w1, w3: [E_loc, D, F_loc]; w2: [E_loc, F_loc, D]: this device's experts, its slice of F.
      k: experts per token; capacity: C slots per (source device, expert).

    Returns:
      (out [n, D], number of dropped assignments over the whole mesh).

    In the einsums E is the local experts and C their rows (capacity slots from every source).
    """
    n, d = x.shape
    num_experts = router.shape[1]
    e_loc = w1.shape[0]
    ep = num_experts // e_loc
    with jax.named_scope("route"):
        weights, experts = route(x, router, k)  # [n, k]
        valid_a = jnp.repeat(valid, k)  # [A]
        slot, keep = dispatch_slots(experts.reshape(-1), valid_a, num_experts, capacity)
    with jax.named_scope("dispatch"):
        # Rows by global expert: [E·C, D] = [EP (destination shard), E_loc, C, D].
        send = jnp.zeros((num_experts * capacity, d), x.dtype).at[slot].set(jnp.repeat(x, k, axis=0), mode="drop")
        recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True)  # [EP (source shard) · E_loc · C, D]
        xe = recv.reshape(ep, e_loc, capacity, d).transpose(1, 0, 2, 3).reshape(e_loc, ep * capacity, d)
        # Tensor peers hold different tokens but slices of the same experts: each needs all their tokens.
        xe = jax.lax.all_gather(xe, "tensor", axis=1, tiled=True)  # [E_loc, C', D], C' = TP·EP·C
    with jax.named_scope("experts"):
        h = jax.nn.silu(jnp.einsum("ECD,EDF->ECF", xe, w1)) * jnp.einsum("ECD,EDF->ECF", xe, w3)  # [E_loc, C', F_loc]
        y = jnp.einsum("ECF,EFD->ECD", h, w2, preferred_element_type=jnp.float32)  # partial sum over F_loc
        # Sum the F slices and hand each tensor peer back its own tokens.
        y = jax.lax.psum_scatter(y, "tensor", scatter_dimension=1, tiled=True).astype(x.dtype)  # [E_loc, EP·C, D]
    with jax.named_scope("combine"):
        y = y.reshape(e_loc, ep, capacity, d).transpose(1, 0, 2, 3).reshape(ep * e_loc * capacity, d)
        back = jax.lax.all_to_all(y, "expert", 0, 0, tiled=True)  # [E·C, D] by global expert, as sent
        y_rows = jnp.take(back, slot, axis=0, mode="fill", fill_value=0).reshape(n, k, d)
        out = combine(y_rows, jnp.where(keep.reshape(n, k), weights, 0.0), x.dtype)
    dropped = jax.lax.psum(jnp.sum(valid_a & ~keep, dtype=jnp.int32), sharding.MESH_AXES)
    return out, dropped


def moe_expert_parallel(x: jax.Array, p, k: int, mesh: Mesh, capacity_factor: float | None = None):
    """Expert-parallel MoE over `mesh` with fixed-capacity all_to_all dispatch.

    Tokens are split over every device of the mesh (data × expert × tensor;
    padded to a multiple of the device count, so a decode batch smaller than
    the mesh works). Each device routes its tokens, all_to_alls them over
    `expert` to the shard holding their expert, all_gathers over `tensor`
    (experts' F is split there), computes its experts, reduce-scatters the F
    partial sums, all_to_alls the results back and combines them with the
    router weights.

    Args:
      x: [N, D] tokens.
      p: router [D, E], w1 / w3 [E, D, F], w2 [E, F, D] (sharded per `sharding.RULES`).
      k: experts per token.
      mesh: a mesh with axes (data, expert, tensor); expert must divide E and tensor F.
      capacity_factor: None for dropless (capacity = tokens per device), or the
        fraction of the even share tokens × k / E each expert takes per device.

    Returns:
      (out [N, D] in x's dtype, dropped: int32 scalar, the number of (token,
      expert) assignments that did not fit; always 0 when dropless).
    """
    n, d = x.shape
    num_experts = p["w1"].shape[0]
    w_in = sharding.logical_to_spec(("experts", "embed", "ffn"), mesh, p["w1"].shape)
    w_out = sharding.logical_to_spec(("experts", "ffn", "embed"), mesh, p["w2"].shape)
    per_device = -(-n // mesh.size)
    capacity = expert_capacity(per_device, num_experts, k, capacity_factor)
    x_pad = jnp.pad(x, ((0, per_device * mesh.size - n), (0, 0)))
    valid = jnp.arange(per_device * mesh.size) < n
    tokens = P(sharding.MESH_AXES)  # rows split over every device
    body = jax.shard_map(functools.partial(_expert_parallel_local, k=k, capacity=capacity), mesh=mesh,
                         in_specs=(tokens, tokens, P(), w_in, w_in, w_out), out_specs=(tokens, P()))
    out, dropped = body(x_pad, valid, p["router"], p["w1"], p["w3"], p["w2"])
    return out[:n], dropped


def count_dropped(experts, num_devices: int, num_experts: int, capacity_factor: float | None):
    """Assignments that `moe_expert_parallel` drops for given router choices, per layer.

    Exact: the same split of tokens over devices and the same slot rule as the
    dispatch (`dispatch_slots`). With `routing.expert_routing(model, tokens,
    capacity_factor=f)` it reports what a forward pass at capacity f drops.

    Args:
      experts: int [L, B, T, k] (or [L, N, k]) expert ids, tokens in row-major order.
      num_devices: devices of the mesh (its size).
      num_experts: E.
      capacity_factor: as in `moe_expert_parallel` (None: dropless, all zeros).

    Returns:
      int [L] numpy array: dropped (token, expert) assignments per layer.
    """
    experts = jnp.asarray(experts)
    num_layers, k = experts.shape[0], experts.shape[-1]
    experts = experts.reshape(num_layers, -1, k)  # [L, N, k]
    n = experts.shape[1]
    per_device = -(-n // num_devices)
    capacity = expert_capacity(per_device, num_experts, k, capacity_factor)
    pad = per_device * num_devices - n
    groups = jnp.pad(experts, ((0, 0), (0, pad), (0, 0))).reshape(num_layers, num_devices, per_device * k)
    valid = jnp.repeat(jnp.arange(per_device * num_devices) < n, k).reshape(num_devices, per_device * k)

    def dropped(group, valid_group):
        _, keep = dispatch_slots(group, valid_group, num_experts, capacity)
        return jnp.sum(valid_group & ~keep)

    per_group = jax.vmap(jax.vmap(dropped), in_axes=(0, None))(groups, valid)  # [L, devices]
    return jax.device_get(per_group.sum(axis=1))


def expert_ffn_t(x: jax.Array, w: dict) -> jax.Array:
    """SwiGLU expert on HF-layout weights: w1, w3 [F, D], w2 [D, F]. x [N, D] → [N, D].

    Computed feature-major (W @ xᵀ, activations [F, N]): XLA:CPU runs that
    form 1.2-1.35x faster than x @ Wᵀ for 4 ≤ N ≤ 64 and no slower otherwise
    (docs/cpu_probe/results/ffn_layout.txt). The barrier keeps XLA from
    folding the final transpose back into the dot, which undoes the gain.
    """
    xt = x.T
    h = jax.nn.silu(jnp.einsum("FD,DN->FN", w["w1"], xt)) * jnp.einsum("FD,DN->FN", w["w3"], xt)
    return jax.lax.optimization_barrier(jnp.einsum("DF,FN->DN", w["w2"], h)).T


def moe_per_expert_masked(x, p, k, skip_unused: bool = True, single_row: bool = False):
    """Each expert (its own buffers) runs on all tokens, weighted by its gate (zero if unchosen).

    With `skip_unused`, an expert no token chose is skipped by a `lax.cond`, so
    a decode step reads only the chosen experts' weights. Without it, every
    expert runs: the dense reference. With `single_row` too, an expert that
    exactly one token chose runs on that token's row alone (a matrix-vector
    product, which XLA:CPU streams faster than a product of 2 or more rows).
    x [N, D] → [N, D].
    """
    n = x.shape[0]
    weights, experts = route(x, p["router"], k)
    out = jnp.zeros(x.shape, jnp.float32)
    zeros = lambda x, gate: jnp.zeros(x.shape, jnp.float32)
    for e, w in enumerate(p["experts"]):
        chosen = experts == e  # [N, k]
        gate = jnp.sum(jnp.where(chosen, weights, 0.0), axis=1)  # [N]
        run = lambda x, gate, w=w: gate[:, None] * expert_ffn_t(x, w).astype(jnp.float32)
        if not skip_unused:
            out = out + run(x, gate)
        elif single_row and n > 1:
            rows = jnp.any(chosen, axis=1)  # [N]: the tokens that chose e
            r = jnp.argmax(rows)  # the first of them: the only one when pick is 1

            def one_row(x, gate, w=w, r=r):
                y = expert_ffn_t(jax.lax.dynamic_slice_in_dim(x, r, 1), w).astype(jnp.float32)  # [1, D]
                return (jnp.arange(n) == r)[:, None] * (gate[r] * y)
            pick = jnp.minimum(jnp.sum(rows), 2)  # 0: skip, 1: one row, 2: all rows
            out = out + jax.lax.switch(pick, [zeros, one_row, run], x, gate)
        else:
            out = out + jax.lax.cond(jnp.any(chosen), run, zeros, x, gate)
    return out.astype(x.dtype)


def dense_gates(weights: jax.Array, experts: jax.Array, num_experts: int) -> jax.Array:
    """Top-k routing ([N, k] weights and expert ids) as [N, E] gates, zero where unchosen."""
    onehot = experts[..., None] == jnp.arange(num_experts)
    return jnp.sum(jnp.where(onehot, weights[..., None], 0.0), axis=1)


def moe_kernel(x, p, k, all_experts: bool = False, **options):
    """The MoE block as one call of the C++ CPU kernel (`cpu_kernel.moe_cpu`).

    Reads only the chosen experts' weights; with `all_experts` every expert
    runs on every token (the dense reference's work), unchosen ones weighted
    zero. float32 per_expert weights on XLA:CPU. `options` go to `moe_cpu`
    (chunk_bytes, panel_min_rows). x [N, D] → [N, D].
    """
    weights, experts = route(x, p["router"], k)
    gates = dense_gates(weights, experts, len(p["experts"]))  # float32, as route's weights
    return cpu_kernel.moe_cpu(x, gates, p["experts"], all_experts=all_experts, **options)


def group_block_sizes(num_tokens: int, k: int, num_experts: int) -> tuple[int, ...]:
    """Static row counts of the grouped path's blocks, ascending.

    No group holds more than `num_tokens` rows (a token picks an expert at
    most once) and none runs more than GROUP_MAX at a time (bigger groups run
    whole GROUP_MAX blocks first), so the last size is the smaller of the two.
    Below it: GROUP_STEP multiples, and HALF_STEP when the mean group
    (num_tokens * k / num_experts) is under GROUP_STEP, e.g. a decode step of
    16 rows, where groups of ~4 rows run at the 8-row rate instead of the
    16-row one (docs/cpu_probe/results/decode_groups.txt). Each size is a
    branch per expert, so sizes that rarely run would only add compile time.
    """
    cap = min(GROUP_MAX, num_tokens)
    half = [HALF_STEP] if num_tokens * k < GROUP_STEP * num_experts else []
    return tuple(s for s in half + list(range(GROUP_STEP, GROUP_MAX + 1, GROUP_STEP)) if s < cap) + (cap,)


def moe_per_expert_grouped(x, p, k, sizes: tuple[int, ...] | None = None):
    """Tokens grouped by expert; each group runs through its expert's buffers in one block.

    Assignments are sorted by expert; expert e's are the contiguous range
    [start_e, start_e + count_e) of that order. Whole blocks of the largest
    size (`sizes[-1]`, default `group_block_sizes`) of big groups run first
    (one loop for all experts, usually zero trips); the rest of each group runs
    as one block of the smallest size that holds it, chosen by `lax.switch`
    (an empty group runs nothing). A block gathers its tokens' rows, runs the
    expert, and scatter-adds the gate-weighted result into the output in
    float32; rows past the group point at an extra zero row, whose output is
    dropped. Dropless. x [N, D] → [N, D].
    """
    n, d = x.shape
    sizes = group_block_sizes(n, k, len(p["experts"])) if sizes is None else tuple(sizes)
    biggest = sizes[-1]
    weights, experts = route(x, p["router"], k)
    flat_e = experts.reshape(-1)  # [A]
    order = jnp.argsort(flat_e, stable=True)
    counts = jnp.bincount(flat_e, length=len(p["experts"]))
    starts = jnp.cumsum(counts) - counts
    # Token row and gate of each sorted assignment, padded so a block's slice never runs off the end.
    tokens = jnp.concatenate([order // k, jnp.full((biggest,), n, order.dtype)])
    gates = jnp.concatenate([weights.reshape(-1)[order], jnp.zeros((biggest,), jnp.float32)])
    x_pad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])  # row n: the target of padding rows
    out = jnp.zeros((n + 1, d), jnp.float32)

    def block_rows(row, count):
        # Sorted assignments [row, row + biggest): token ids (from `count` on: the zero row) and gates.
        t = jnp.where(jnp.arange(biggest) < count, jax.lax.dynamic_slice_in_dim(tokens, row, biggest), n)
        return t, jax.lax.dynamic_slice_in_dim(gates, row, biggest)

    def ffn_first(xb, w, rows):
        # Expert w on the first `rows` rows of xb [biggest, D], zero-padded back to biggest rows.
        return jnp.pad(expert_ffn_t(xb[:rows], w), ((0, biggest - rows), (0, 0)))

    def add_block(out, t, g, y):
        return out.at[t].add(y.astype(jnp.float32) * g[:, None])

    # Groups over `biggest` rows: all but their last block first, all experts' in one loop
    # (none when no group can exceed `biggest`). The last block then holds 1..biggest rows.
    full = jnp.maximum(counts - 1, 0) // biggest
    full_end = jnp.cumsum(full)

    def full_block(i, out):
        e = jnp.searchsorted(full_end, i, side="right")
        t, g = block_rows(starts[e] + (i - full_end[e] + full[e]) * biggest, biggest)
        y = jax.lax.switch(e, [lambda xb, w=w: expert_ffn_t(xb, w) for w in p["experts"]], x_pad[t])
        return add_block(out, t, g, y)

    if n > biggest:
        out = jax.lax.fori_loop(0, full_end[-1], full_block, out)
    sizes_arr = jnp.asarray(sizes)
    for e, w in enumerate(p["experts"]):
        rest = counts[e] - full[e] * biggest
        t, g = block_rows(starts[e] + full[e] * biggest, rest)
        branches = [lambda xb: jnp.zeros_like(xb)] + [lambda xb, w=w, rows=rows: ffn_first(xb, w, rows) for rows in sizes]
        pick = jnp.where(rest == 0, 0, 1 + jnp.searchsorted(sizes_arr, rest, side="left"))
        out = add_block(out, t, g, jax.lax.switch(pick, branches, x_pad[t]))
    return out[:n].astype(x.dtype)


def moe(x, p, k, strategy: str = "sparse", mesh: Mesh | None = None, capacity_factor: float | None = None,
        one_shot: bool = False):
    """MoE block on [..., D] activations.

    On a mesh of more than one device: `moe_expert_parallel` (with
    `capacity_factor`). Otherwise the single-device `strategy`, which never
    drops: for per_expert weights (`p["experts"]`), the C++ kernel for
    float32 activations where it is built (`moe_kernel`; all experts for "dense");
    otherwise "sparse" picks masked
    experts for up to MASKED_MAX_TOKENS tokens (a decode step; with
    `one_shot`, a prompt, MASKED_MAX_ONE_SHOT) and grouped blocks for more,
    "dense" runs every expert; for stacked weights, `moe_sparse` / `moe_dense`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown MoE strategy {strategy!r}; choose one of {STRATEGIES}.")
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    weights = jax.tree.leaves(p["experts"]) if "experts" in p else [p["w1"], p["w3"], p["w2"]]
    kernel = "experts" in p and cpu_kernel.moe_usable(x, weights)
    if not kernel:
        _warn_if_widened(x, weights)
    if mesh is not None and mesh.size > 1:
        out, _ = moe_expert_parallel(x, p, k, mesh, capacity_factor)
    elif capacity_factor is not None:
        raise ValueError("capacity_factor applies to expert-parallel dispatch on a mesh of more than one device; "
                         "leave it unset here (single-device dispatch never drops tokens).")
    elif "experts" in p:
        if kernel:
            out = moe_kernel(x, p, k, all_experts=strategy == "dense")
        elif strategy == "dense":
            out = moe_per_expert_masked(x, p, k, skip_unused=False)
        elif x.shape[0] <= (MASKED_MAX_ONE_SHOT if one_shot else MASKED_MAX_TOKENS):
            out = moe_per_expert_masked(x, p, k, single_row=not one_shot)
        else:
            out = moe_per_expert_grouped(x, p, k)
    else:
        out = (moe_dense if strategy == "dense" else moe_sparse)(x, p, k)
    return out.reshape(shape)


def _warn_if_widened(x, weights) -> None:
    """Warns (at trace time) when XLA ops on the CPU must widen narrower expert weights at every call.

    XLA:CPU's bfloat16 -> float32 convert runs at about 1G values/s here
    (docs/cpu_probe/results/bf16_experts.txt §6), so each step would pay for
    widening every expert it runs; the C++ kernel widens as it reads instead.
    """
    if jax.default_backend() == "cpu" and any(w.dtype.itemsize < x.dtype.itemsize for w in weights):
        warnings.warn(f"expert weights in {weights[0].dtype} with {x.dtype} compute run as XLA ops here, which "
                      "widen every expert they run at each call, slowly on the CPU; the C++ kernel (one CPU "
                      "device, per_expert layout, g++) widens them as it reads, or load with expert_dtype=None.",
                      stacklevel=3)
