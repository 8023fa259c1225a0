"""The train step: optax AdamW with warmup + cosine, global-norm clipping and gradient accumulation, over the
same mesh and expert-parallel MoE as inference; full fine-tuning or LoRA; the train state's checkpoints.

The state is {"step", "params" (the trainable tree: all weights, or the LoRA
adapters), "opt_state"}; the frozen base of a LoRA run is passed beside it
and never copied. `train_step` is jitted with the state donated and its
shardings pinned, so every step reuses the state's buffers in place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp

from mixtral_jax import checkpoint, ckpt_files, lora as lora_lib, loss as loss_lib, model as model_lib


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a run (hashable: the step is compiled for one).

    learning_rate: peak, reached after `warmup_steps`, then cosine to 10% of it at `total_steps`.
    grad_accum: micro-batches accumulated into one update, weighted as one batch (`accumulated_grads`).
    lora_rank: 0 trains every weight; R > 0 trains rank-R adapters (lora.py) on a frozen base.
    router_aux_loss_coef: None takes the model config's.
    remat: recompute each layer in the backward pass (activation memory flat in depth).
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 10
    total_steps: int = 100
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    grad_accum: int = 1
    lora_rank: int = 0
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float = 0.0
    remat: bool = True


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on a linear-warmup + cosine-decay schedule."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, max(tc.warmup_steps, 1),
                                                  max(tc.total_steps, tc.warmup_steps + 1),
                                                  end_value=0.1 * tc.learning_rate)
    return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=tc.weight_decay))


def init_state(model: model_lib.Mixtral, tc: TrainConfig, seed: int = 0) -> dict:
    """The initial train state for `model` (stacked layout): the trainable tree and its optimizer state.

    Args:
      model: the model to fine-tune; with `tc.lora_rank` its weights are the frozen base.
      tc: hyperparameters.
      seed: PRNG seed of the LoRA A matrices.

    Returns:
      {"step": int32 scalar, "params": trainable tree, "opt_state": optax state}, on model.mesh.
    """
    if model.layout != "stacked":
        raise ValueError("training needs the stacked layout; create or load the model with layout='stacked'.")
    if model.quantization and not tc.lora_rank:
        raise ValueError(f"the model's experts are quantized ({model.quantization}); training every weight needs "
                         "float weights: train LoRA adapters (lora_rank > 0) or load the checkpoint without quantize.")
    if tc.lora_rank:
        params = lora_lib.init_lora(model.cfg, tc.lora_rank, seed, dtype="float32", mesh=model.mesh)
    else:
        params = model.params()

    def init(params):
        # Copies of the weights: the step donates the state, and the model stays usable.
        params = jax.tree.map(jnp.copy, params)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer(tc).init(params)}

    return jax.jit(init)(params)


def frozen_params(model: model_lib.Mixtral, tc: TrainConfig):
    """The base weights a LoRA step reads beside the state (None for full fine-tuning)."""
    return model.params() if tc.lora_rank else None


def router_coefs(cfg, tc: TrainConfig) -> tuple[float, float]:
    """(load-balancing weight, z-loss weight) of the objective: None takes the model config's."""
    return (cfg.router_aux_loss_coef if tc.router_aux_loss_coef is None else tc.router_aux_loss_coef,
            tc.router_z_loss_coef)


def objective(trainable, frozen, tokens, loss_mask, segment_ids, *, cfg, tc: TrainConfig, mesh):
    """(loss, metrics) of one micro-batch for the trainable tree (see `loss.loss_and_metrics`)."""
    aux_coef, z_coef = router_coefs(cfg, tc)
    params = lora_lib.with_adapters(frozen, trainable) if tc.lora_rank else trainable
    return loss_lib.loss_and_metrics(params, tokens, loss_mask, segment_ids, cfg=cfg, mesh=mesh, aux_coef=aux_coef,
                                     z_coef=z_coef, remat=tc.remat,
                                     adapt_layer=lora_lib.AddAdapters() if tc.lora_rank else None)


def accumulated_grads(trainable, frozen, batch, *, cfg, tc: TrainConfig, mesh):
    """Loss, metrics and gradients of batch's A micro-batches (a scan), weighted as one pass over their union.

    The CE is the mean over all A micro-batches' targets: micro-batch i's CE
    weighs n_i / N (its share of the N targets), in the loss and in the
    gradient, so micro-batches with more targets count more, as they would in
    one batch. The router losses are statistics of a batch, not sums over
    tokens; each micro-batch's weighs 1 / A (the union's aux is no function of
    the micro-batches' values).

    Returns:
      (metrics: "loss", "ce" and "targets" of the union, "aux", "z", "load"
      averaged over the micro-batches; gradients of metrics["loss"]).
    """
    aux_coef, z_coef = router_coefs(cfg, tc)
    accum, t = batch["tokens"].shape[0], batch["tokens"].shape[-1]
    flat = {k: v.reshape(-1, t) for k, v in batch.items()}
    total = jnp.maximum(jnp.sum(loss_lib.target_mask(flat["loss_mask"], flat["segment_ids"])), 1.0)

    def weighted(trainable, mb):
        _, metrics = objective(trainable, frozen, mb["tokens"], mb["loss_mask"], mb["segment_ids"], cfg=cfg, tc=tc,
                               mesh=mesh)
        # ce·n_i is micro-batch i's summed NLL (the targets count is data, not a function of the weights).
        share = metrics["ce"] * metrics["targets"] / total + (aux_coef * metrics["aux"] + z_coef * metrics["z"]) / accum
        return share, metrics

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def micro(acc, mb):
        (share, metrics), grads = grad_fn(trainable, mb)
        part = {"loss": share, "ce": metrics["ce"] * metrics["targets"] / total, "targets": metrics["targets"],
                **{k: metrics[k] / accum for k in ("aux", "z", "load")}}
        return jax.tree.map(jnp.add, acc, (grads, part)), None

    (_, metric_shapes), _ = jax.eval_shape(grad_fn, trainable, jax.tree.map(lambda v: v[0], batch))
    init = (jax.tree.map(jnp.zeros_like, trainable),
            {"loss": jnp.zeros((), jnp.float32), **{k: jnp.zeros(metric_shapes[k].shape, metric_shapes[k].dtype)
                                                    for k in ("ce", "targets", "aux", "z", "load")}})
    (grads, metrics), _ = jax.lax.scan(micro, init, batch)
    return metrics, grads


def _step(state, frozen, batch, *, cfg, tc, mesh):
    """The accumulated gradients of batch's micro-batches, then one optimizer update."""
    metrics, grads = accumulated_grads(state["params"], frozen, batch, cfg=cfg, tc=tc, mesh=mesh)
    metrics["grad_norm"] = optax.global_norm(grads)
    updates, opt_state = optimizer(tc).update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def make_train_step(model: model_lib.Mixtral, tc: TrainConfig, state: dict):
    """The jitted step `(state, frozen, batch) -> (state, metrics)`, the state donated and kept in its shardings.

    Args:
      model: the model being trained (its config and mesh).
      tc: hyperparameters.
      state: a state from `init_state` or `restore_state` (its shardings are the step's).

    The batch is {"tokens", "loss_mask", "segment_ids"}, int32 [A, B, T] each
    (A = tc.grad_accum micro-batches, data.batch_at); metrics as
    `accumulated_grads`' (those of `lm_loss` over the union), plus "grad_norm".
    """
    leaves, treedef = jax.tree.flatten(jax.tree.map(lambda x: x.sharding, state))
    return _jitted_step(model.cfg, tc, model.mesh, treedef, tuple(leaves))


@functools.cache
def _jitted_step(cfg, tc, mesh, treedef, sharding_leaves):
    # One jitted step per (model, hyperparameters, mesh, state layout): a fresh jit per call would compile again.
    shardings = jax.tree.unflatten(treedef, sharding_leaves)
    # The state pinned on the way in as well as out: the first state (uncommitted arrays) and later ones
    # (the step's committed outputs) then share one compilation.
    return jax.jit(functools.partial(_step, cfg=cfg, tc=tc, mesh=mesh), donate_argnums=0,
                   in_shardings=(shardings, None, None), out_shardings=(shardings, None))


def trained_model(model: model_lib.Mixtral, tc: TrainConfig, state: dict) -> model_lib.Mixtral:
    """The fine-tuned model as a plain `Mixtral`: the trained weights, or the base with the adapters merged."""
    if tc.lora_rank:
        return lora_lib.merge_lora(model, state["params"])
    return model_lib.Mixtral(model.cfg, state["params"], model.mesh)


# ---------------------------------------------------------------- train-state checkpoints

STATE_DIR, PROGRESS_FILE = "state", "progress.json"


def save_state(state: dict, directory: str | os.PathLike, progress: dict) -> None:
    """Writes the whole train state (Orbax) and `progress` (JSON) as DIR/state, atomically.

    Built beside it and swapped in complete (`ckpt_files.staged`), so an
    interruption leaves the previous checkpoint whole.
    """
    path = os.path.join(os.path.abspath(os.fspath(directory)), STATE_DIR)
    with ckpt_files.staged(path) as built, checkpoint._quiet_orbax():
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(built, "arrays"), state)
        checkpointer.wait_until_finished()
        with open(os.path.join(built, PROGRESS_FILE), "w") as f:
            json.dump(progress, f)


def has_state(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(directory), STATE_DIR, PROGRESS_FILE))


def restore_state(directory: str | os.PathLike, like: dict) -> tuple[dict, dict]:
    """Reads a `save_state` checkpoint into the shapes, dtypes and shardings of `like` (a fresh state).

    Returns:
      (state, progress).
    """
    path = os.path.join(os.path.abspath(os.fspath(directory)), STATE_DIR)
    ckpt_files.verify(path)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    with checkpoint._quiet_orbax():
        state = ocp.StandardCheckpointer().restore(os.path.join(path, "arrays"), target)
    with open(os.path.join(path, PROGRESS_FILE)) as f:
        return state, json.load(f)
