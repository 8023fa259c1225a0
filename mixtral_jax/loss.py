"""The training objective: next-token cross-entropy plus the router's load-balancing and z losses.

Definitions follow transformers' MixtralForCausalLM with `output_router_logits=True`:

  ce   mean over targets of -log p(token t | tokens < t), in float32.
  aux  `load_balancing_loss_func`: over every layer's real (non-padding) tokens,
       E · Σ_e f_e · P_e, with f_e the share of tokens whose top-k includes e
       (so Σ_e f_e = k) and P_e the mean router probability of e.
  z    the router z-loss (ST-MoE): mean over layers and real tokens of logsumexp(router logits)².

  loss = ce + router_aux_loss_coef · aux + router_z_loss_coef · z
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixtral_jax import model as model_lib


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions restarting at 0 at the start of each segment. segment_ids [B, T] → int32 [B, T]."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


def target_mask(loss_mask, segment_ids=None) -> jax.Array:
    """float32 [B, T-1]: 1 where token t+1 is a target (a segment's first token never is, having no context)."""
    mask = jnp.asarray(loss_mask, jnp.float32)[:, 1:]
    if segment_ids is not None:
        mask = jnp.where(segment_ids[:, 1:] == segment_ids[:, :-1], mask, 0.0)
    return mask


def router_losses(router_logits: jax.Array, real: jax.Array, k: int) -> dict[str, jax.Array]:
    """Load-balancing loss, z-loss and expert load from every layer's router logits.

    Args:
      router_logits: float32 [L, B, T, E].
      real: [B, T] 1 for real tokens, 0 for padding (transformers' attention_mask).
      k: experts per token.

    Returns:
      {"aux": scalar, "z": scalar, "load": [L, E] share of each layer's top-k
      assignments that go to each expert (rows sum to 1)}.
    """
    num_layers, num_experts = router_logits.shape[0], router_logits.shape[-1]
    real = real.astype(jnp.float32)
    probs = jax.nn.softmax(router_logits, axis=-1)  # [L, B, T, E]
    _, chosen = jax.lax.top_k(probs, k)  # [L, B, T, k]
    picked = jnp.sum(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32), axis=-2)  # [L, B, T, E]
    rows = num_layers * jnp.sum(real)
    tokens_per_expert = jnp.einsum("LBTE,BT->E", picked, real) / rows  # sums to k
    prob_per_expert = jnp.einsum("LBTE,BT->E", probs, real) / rows
    aux = num_experts * jnp.sum(tokens_per_expert * prob_per_expert)
    z = jnp.einsum("LBT,BT->", jnp.square(jax.nn.logsumexp(router_logits, axis=-1)), real) / rows
    per_layer = jnp.einsum("LBTE,BT->LE", picked, real)
    return {"aux": aux, "z": z, "load": per_layer / jnp.sum(per_layer, axis=-1, keepdims=True)}


def loss_and_metrics(params, tokens, loss_mask, segment_ids=None, *, cfg, mesh=None, aux_coef: float,
                     z_coef: float, remat: bool = False, adapt_layer=None):
    """The pure objective behind `lm_loss` and the train step (differentiable in `params`).

    Args:
      params: the stacked parameter tree (layout.py), or per_expert for a forward value only.
      tokens: int [B, T].
      loss_mask: [B, T] 1 where token t is a target (position 0, and a segment's first token, never is).
      segment_ids: optional int [B, T] packed documents, numbered from 1 in each row;
        0 marks padding. None: one document per row, no padding.
      cfg, mesh, remat, adapt_layer: as `model.apply`.
      aux_coef, z_coef: weights of the router losses in the total.

    Returns:
      (loss scalar float32, metrics {"ce", "aux", "z", "load" [L, E], "targets"}).
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if segment_ids is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        real = jnp.ones(tokens.shape, jnp.float32)
    else:
        positions = segment_positions(segment_ids)
        real = (segment_ids != 0).astype(jnp.float32)
    logits, _, router_logits = model_lib.apply(params, tokens, positions, cfg=cfg, mesh=mesh, segment_ids=segment_ids,
                                               router_logits=True, remat=remat, adapt_layer=adapt_layer)
    # Logits at t-1 predict token t.
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [B, T-1, V] float32
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    mask = target_mask(loss_mask, segment_ids)
    targets = jnp.sum(mask)
    ce = jnp.sum(nll * mask) / jnp.maximum(targets, 1.0)
    metrics = {"ce": ce, **router_losses(router_logits, real, cfg.num_experts_per_tok), "targets": targets}
    return ce + aux_coef * metrics["aux"] + z_coef * metrics["z"], metrics


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "aux_coef", "z_coef"))
def _lm_loss(params, tokens, loss_mask, segment_ids, *, cfg, mesh, aux_coef, z_coef):
    return loss_and_metrics(params, tokens, loss_mask, segment_ids, cfg=cfg, mesh=mesh, aux_coef=aux_coef,
                            z_coef=z_coef)


def lm_loss(model: model_lib.Mixtral, tokens, loss_mask, router_aux_loss_coef: float | None = None,
            router_z_loss_coef: float = 0.0, segment_ids=None):
    """Language-model loss with the router's losses, as transformers' MixtralForCausalLM computes it.

    Args:
      model: a `Mixtral` (on `model.mesh`, if it has one: the MoE runs expert-parallel).
      tokens: int [B, T] token ids.
      loss_mask: [B, T] 1 where token t is a target, predicted from the tokens
        before it (position 0 never is); transformers' labels are tokens where
        the mask is 1 and -100 elsewhere.
      router_aux_loss_coef: weight of the load-balancing loss; None: the config's.
      router_z_loss_coef: weight of the router z-loss.
      segment_ids: optional int [B, T] packed documents numbered from 1 in each row
        (attention stays within a document, positions restart); 0 marks padding,
        left out of the router losses as transformers' attention_mask does.

    Returns:
      (loss float32 scalar, metrics): "ce" mean token cross-entropy over the
      targets, "aux" load-balancing loss, "z" router z-loss, "load" float32
      [L, E] each layer's share of assignments per expert, "targets" their count.
    """
    coef = model.cfg.router_aux_loss_coef if router_aux_loss_coef is None else router_aux_loss_coef
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or jnp.shape(loss_mask) != tokens.shape:
        raise ValueError(f"tokens and loss_mask must both be [batch, time], got {tokens.shape} and "
                         f"{jnp.shape(loss_mask)}.")
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
    return _lm_loss(model.params(), tokens, jnp.asarray(loss_mask, jnp.float32), segment_ids, cfg=model.cfg,
                    mesh=model.mesh, aux_coef=float(coef), z_coef=float(router_z_loss_coef))
