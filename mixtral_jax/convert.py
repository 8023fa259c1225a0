"""Hugging Face Mixtral weights → mixtral_jax parameter layout.

HF stores torch Linear weights as [out, in]; we store [in, out] with heads and
experts as their own axes (see model.py for the tree). The tables below are
the single mapping between the two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from mixtral_jax.config import MixtralConfig

# Top-level (not per-layer) tensors: our name -> (HF key, transform).
GLOBAL_KEYS: dict[str, tuple[str, Callable]] = {
    "embed": ("model.embed_tokens.weight", lambda w, c: w),                    # [V, D]
    "final_norm": ("model.norm.weight", lambda w, c: w),                       # [D]
    "lm_head": ("lm_head.weight", lambda w, c: w.T),                           # [V, D] -> [D, V]
}

# Per-layer tensors that are not experts: our name -> (HF key template, transform).
LAYER_KEYS: dict[str, tuple[str, Callable]] = {
    "attn_norm": ("model.layers.{l}.input_layernorm.weight", lambda w, c: w),
    "mlp_norm": ("model.layers.{l}.post_attention_layernorm.weight", lambda w, c: w),
    # [H*Dh, D] -> [D, H, Dh]
    "wq": ("model.layers.{l}.self_attn.q_proj.weight",
           lambda w, c: w.T.reshape(c.hidden_size, c.num_attention_heads, c.head_dim)),
    "wk": ("model.layers.{l}.self_attn.k_proj.weight",
           lambda w, c: w.T.reshape(c.hidden_size, c.num_key_value_heads, c.head_dim)),
    "wv": ("model.layers.{l}.self_attn.v_proj.weight",
           lambda w, c: w.T.reshape(c.hidden_size, c.num_key_value_heads, c.head_dim)),
    # [D, H*Dh] -> [H, Dh, D]
    "wo": ("model.layers.{l}.self_attn.o_proj.weight",
           lambda w, c: w.T.reshape(c.num_attention_heads, c.head_dim, c.hidden_size)),
    "router": ("model.layers.{l}.block_sparse_moe.gate.weight", lambda w, c: w.T),  # [E, D] -> [D, E]
}

# Per-expert tensors: our name -> HF key template; each is transposed and stacked over E.
EXPERT_KEYS: dict[str, str] = {
    "w1": "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",  # [F, D] -> [D, F]
    "w3": "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",  # [F, D] -> [D, F]
    "w2": "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight",  # [D, F] -> [F, D]
}


def hf_expected_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of a checkpoint for `cfg`, with its torch shape."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    per_layer = {"attn_norm": (d,), "mlp_norm": (d,), "wq": (hq, d), "wk": (hkv, d), "wv": (hkv, d),
                 "wo": (d, hq), "router": (cfg.num_local_experts, d)}
    expert = {"w1": (f, d), "w3": (f, d), "w2": (d, f)}
    for l in range(cfg.num_hidden_layers):
        for name, (tmpl, _) in LAYER_KEYS.items():
            shapes[tmpl.format(l=l)] = per_layer[name]
        for name, tmpl in EXPERT_KEYS.items():
            for e in range(cfg.num_local_experts):
                shapes[tmpl.format(l=l, e=e)] = expert[name]
    return shapes


def convert_layer(get: Callable[[str], np.ndarray], cfg: MixtralConfig, l: int) -> dict[str, np.ndarray]:
    """One decoder layer's parameters in our layout, reading HF tensors through `get(key)`."""
    out = {name: fn(get(tmpl.format(l=l)), cfg) for name, (tmpl, fn) in LAYER_KEYS.items()}
    for name, tmpl in EXPERT_KEYS.items():
        out[name] = np.stack([get(tmpl.format(l=l, e=e)).T for e in range(cfg.num_local_experts)])
    return out


def convert_global(get: Callable[[str], np.ndarray], cfg: MixtralConfig) -> dict[str, np.ndarray]:
    """The non-layer parameters (embed, final_norm, lm_head) in our layout."""
    return {name: fn(get(key), cfg) for name, (key, fn) in GLOBAL_KEYS.items()}


def params_from_state_dict(state: Mapping[str, np.ndarray], cfg: MixtralConfig) -> dict:
    """Whole-model conversion in memory (tests and tiny models; use the streaming converter for real ones)."""
    get = state.__getitem__
    per_layer = [convert_layer(get, cfg, l) for l in range(cfg.num_hidden_layers)]
    params = convert_global(get, cfg)
    params["layers"] = {k: np.stack([p[k] for p in per_layer]) for k in per_layer[0]}
    return params
