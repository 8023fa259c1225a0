"""Tiny configs and Hugging Face fixtures shared by the tests, notebooks and bench.

torch and transformers are imported lazily: they are test-only dependencies.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mixtral_jax.config import MixtralConfig, from_hf_dict

# Small HF MixtralConfig fields; tests override a few per case.
TINY_HF: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-5, sliding_window=None,
    # Larger than HF's 0.02 so attention and routing are decisive: a wrong RoPE base
    # or a mis-transposed weight moves the logits far beyond the tolerance.
    initializer_range=0.1, tie_word_embeddings=False,
)


def hf_model(seed: int = 0, dtype: str = "float32", **overrides):
    """A random transformers MixtralForCausalLM (eager attention, eval mode)."""
    import torch
    import transformers

    fields = {**TINY_HF, **overrides}
    torch.manual_seed(seed)
    hf_cfg = transformers.MixtralConfig(**fields)
    hf_cfg._attn_implementation = "eager"
    model = transformers.MixtralForCausalLM(hf_cfg).eval()
    return model.to(getattr(torch, dtype))


def write_hf_checkpoint(model, path: str | os.PathLike, max_shard_size: str = "200KB") -> str:
    """save_pretrained with small shards: the hub's sharded safetensors layout."""
    model.save_pretrained(os.fspath(path), max_shard_size=max_shard_size, safe_serialization=True)
    return os.fspath(path)


def config_of(model) -> MixtralConfig:
    """Our MixtralConfig for a transformers model (through its config.json dict)."""
    return from_hf_dict(model.config.to_dict(), name="hf")


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    """The model's tensors in float32 numpy under hub key names."""
    import tempfile

    from safetensors.numpy import load_file
    import torch

    # Through save_pretrained so the keys are the hub's (per-expert w1/w2/w3), not the
    # fused in-memory layout of newer transformers versions.
    with tempfile.TemporaryDirectory() as d:
        model.to(torch.float32).save_pretrained(d, safe_serialization=True)
        out = {}
        for name in sorted(os.listdir(d)):
            if name.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, name)))
    return out


def our_model(hf, layout: str = "stacked"):
    """A mixtral_jax `Mixtral` with the transformers model's weights (converted in memory)."""
    import jax
    import jax.numpy as jnp

    from mixtral_jax import convert, layout as layout_lib, model as model_lib

    cfg = config_of(hf)
    params = jax.tree.map(jnp.asarray, convert.params_from_state_dict(state_dict_numpy(hf), cfg))
    return model_lib.Mixtral(cfg, layout_lib.get(layout).from_stacked(params))


def hf_logits(model, tokens) -> np.ndarray:
    """transformers' float32 logits for int tokens [B, T]."""
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long))
    return out.logits.float().numpy()


def moe_params(e: int, d: int = 32, f: int = 48, seed: int = 0) -> dict[str, np.ndarray]:
    """Random stacked MoE weights (router [D, E], w1/w3 [E, D, F], w2 [E, F, D]), scaled so routing is decisive."""
    rs = np.random.RandomState(seed)
    return {"router": rs.randn(d, e).astype(np.float32) * 0.5,
            "w1": rs.randn(e, d, f).astype(np.float32) * 0.2,
            "w3": rs.randn(e, d, f).astype(np.float32) * 0.2,
            "w2": rs.randn(e, f, d).astype(np.float32) * 0.2}


def moe_loop_reference(x: np.ndarray, p: dict[str, np.ndarray], k: int) -> np.ndarray:
    """Per-token, per-expert loop in float64 numpy: the independent MoE reference.

    Args:
      x: [N, D]; p: router [D, E], w1 / w3 [E, D, F], w2 [E, F, D]; k: top-k.
    """
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        logits = x[n] @ np.asarray(p["router"], np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs, kind="stable")[:k]
        weights = probs[chosen] / probs[chosen].sum()
        for e, w in zip(chosen, weights):
            w1, w3, w2 = (np.asarray(p[name][e], np.float64) for name in ("w1", "w3", "w2"))
            a, b = x[n] @ w1, x[n] @ w3
            out[n] += w * (((a / (1 + np.exp(-a))) * b) @ w2)
    return out


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
