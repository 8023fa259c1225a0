"""Mixture-of-experts block as small pure functions: route → dispatch → experts → combine.

Dispatch strategies (all numerically equal to a per-expert loop):
  dense   every expert runs on every token; unchosen ones get weight zero.
          The simple reference; cost grows with the number of experts.
  sparse  assignments are sorted by expert and packed into fixed-size blocks,
          each block padded so it holds one expert's tokens; only those blocks
          run. Dropless; cost grows with tokens × top-k, not with experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STRATEGIES = ("dense", "sparse")


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


def moe(x, p, k, strategy: str = "sparse"):
    """MoE block on [..., D] activations with the chosen dispatch strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown MoE strategy {strategy!r}; choose one of {STRATEGIES}.")
    shape = x.shape
    fn = moe_dense if strategy == "dense" else moe_sparse
    return fn(x.reshape(-1, shape[-1]), p, k).reshape(shape)
