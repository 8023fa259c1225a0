"""Which experts fire on my data, and is the load balanced? Router choices and their plots."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax import model as model_lib
from mixtral_jax import expert_parallel, sharding


class Routing(NamedTuple):
    """Router choices of every layer: experts and weights, each [L, B, T, k] (slot 0 = top-1)."""

    experts: np.ndarray
    weights: np.ndarray


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "capacity_factor"))
def _routing(params, tokens, *, cfg, mesh, capacity_factor):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    _, _, (weights, experts) = model_lib.apply(params, tokens, positions, cfg=cfg, collect_routing=True, mesh=mesh,
                                               capacity_factor=capacity_factor)
    # Replicated, so every process of a multi-host run can read them.
    return sharding.constrain(experts, mesh, (None,) * 4), sharding.constrain(weights, mesh, (None,) * 4)


def expert_routing(model: model_lib.Mixtral, tokens, capacity_factor: float | None = None) -> Routing:
    """Runs the model on tokens and returns each layer's router choices.

    Args:
      model: a `Mixtral` (on `model.mesh`, if it has one).
      tokens: int [B, T] token ids (or one list of ids).
      capacity_factor: expert-parallel capacity on a multi-device mesh (None:
        dropless); `expert_parallel.count_dropped` turns the result into drops per layer.

    Returns:
      `Routing(experts int32 [L, B, T, k], weights float32 [L, B, T, k])`, the
      top-k expert ids in descending router probability and their
      renormalised weights (each row sums to 1).
    """
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    experts, weights = _routing(model.params(), jnp.asarray(tokens), cfg=model.cfg, mesh=model.mesh,
                                capacity_factor=capacity_factor)
    return Routing(np.asarray(experts), np.asarray(weights))


def expert_load(routing: Routing, num_experts: int) -> np.ndarray:
    """Fraction of token-slots sent to each expert, per layer: float [L, E], rows sum to 1.

    A perfectly balanced router gives 1/E everywhere.
    """
    e = routing.experts.reshape(routing.experts.shape[0], -1)
    counts = np.stack([np.bincount(row, minlength=num_experts) for row in e])
    return counts / counts.sum(axis=1, keepdims=True)


def plot_routing(routing: Routing, num_experts: int, token_labels=None, row: int = 0, path: str | None = None):
    """Heat map of the top-1 expert (token × layer) and per-expert load bars.

    Args:
      routing: from `expert_routing`.
      num_experts: E (model.cfg.num_local_experts).
      token_labels: optional list of T strings for the x axis (e.g. token pieces).
      row: which batch row the heat map shows (the load bars use every row).
      path: if given, the figure is saved there (PNG).

    Returns:
      The matplotlib Figure.
    """
    # pyplot with the active backend: forcing Agg here would stop a notebook's later figures from showing,
    # and matplotlib picks Agg by itself where there is no display.
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    top1 = routing.experts[:, row, :, 0]  # [L, T]
    load = expert_load(routing, num_experts)  # [L, E]
    n_layers, n_tokens = top1.shape
    fig, (ax_map, ax_load) = plt.subplots(
        1, 2, figsize=(min(4 + 0.35 * n_tokens, 18), 1.5 + 0.35 * n_layers + 1.5),
        gridspec_kw={"width_ratios": [max(n_tokens, 4), 8]})
    cmap = plt.get_cmap("tab10" if num_experts <= 10 else "tab20", num_experts)
    im = ax_map.imshow(top1, aspect="auto", cmap=cmap, vmin=-0.5, vmax=num_experts - 0.5, interpolation="nearest")
    # Thin white lines between cells, so neighbours routed to the same expert stay distinguishable.
    ax_map.set_xticks(np.arange(n_tokens + 1) - 0.5, minor=True)
    ax_map.set_yticks(np.arange(n_layers + 1) - 0.5, minor=True)
    ax_map.grid(which="minor", color="white", linewidth=0.5)
    ax_map.tick_params(which="minor", length=0)
    ax_map.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_map.set_xlabel("token")
    ax_map.set_ylabel("layer")
    ax_map.set_title("top-1 expert per token and layer")
    if token_labels is not None:
        ax_map.set_xticks(range(n_tokens), [str(t) for t in token_labels], rotation=90, fontsize=8)
    else:
        ax_map.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=ax_map, ticks=range(num_experts), label="expert")

    experts = np.arange(num_experts)
    ax_load.bar(experts, load.mean(axis=0), color=[cmap(e) for e in experts], label="mean over layers")
    # One dot per layer shows the spread without implying negative shares, as ± sd bars can.
    ax_load.scatter(np.broadcast_to(experts, load.shape), load, s=8, color="k", alpha=0.5, zorder=3,
                    label="one layer")
    ax_load.axhline(1.0 / num_experts, color="k", linestyle="--", linewidth=1, label="balanced")
    ax_load.set_xticks(experts)
    ax_load.set_ylim(0, 1.35 * max(load.max(), 1.0 / num_experts))  # headroom for the legend
    ax_load.set_xlabel("expert")
    ax_load.set_ylabel("share of token-slots")
    ax_load.set_title("expert load")
    ax_load.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
