"""Model configuration: a frozen dataclass read from HF `config.json` files.

Presets live in `mixtral_jax/configs/*.json` (the repository's top-level
`configs/` points there) and use Hugging Face field names, so any hub
`config.json` of a Mixtral model loads the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
from typing import Any

PRESET_PACKAGE = "mixtral_jax.configs"
CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    """Shape and numerics of a Mixtral model (HF `MixtralConfig` field names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float = 1e-5
    head_dim: int | None = None
    sliding_window: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Weight of the router's load-balancing loss in training (transformers' default when a config omits it).
    router_aux_loss_coef: float = 0.001
    dtype: str = "bfloat16"  # dtype the checkpoint was published in
    name: str = "custom"

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                        f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                        f"{self.num_attention_heads}; set head_dim explicitly in the config.")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                    f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                    f"num_key_value_heads {self.num_key_value_heads} (grouped-query attention).")
        if not 1 <= self.num_experts_per_tok <= self.num_local_experts:
            raise ValueError(
                    f"num_experts_per_tok {self.num_experts_per_tok} must be between 1 and "
                    f"num_local_experts {self.num_local_experts}.")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings.")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be null or a positive int, got {self.sliding_window}.")

    def to_hf_dict(self) -> dict[str, Any]:
        """Returns a HF-style config.json dict that `from_hf_dict` reads back."""
        d = dataclasses.asdict(self)
        d["torch_dtype"] = d.pop("dtype")
        d.pop("name")
        d.update(architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_act="silu",
                          tie_word_embeddings=False)
        return d


def from_hf_dict(d: dict[str, Any], name: str = "custom") -> MixtralConfig:
    """Builds a config from a HF `config.json` dict (old and new field spellings).

    Accepts top-level `rope_theta` (older files) or `rope_parameters` (newer),
    `torch_dtype` or `dtype`, `sliding_window` null or an int, `head_dim` null or set.
    """
    if d.get("model_type", "mixtral") != "mixtral":
        raise ValueError(f"config model_type is {d.get('model_type')!r}; mixtral_jax runs 'mixtral' models only.")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported; Mixtral uses 'silu'.")
    if d.get("tie_word_embeddings", False):
        raise ValueError("tie_word_embeddings=true is not supported; Mixtral checkpoints have a separate lm_head.")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"RoPE scaling {rope!r} is not supported; only default rotary embeddings are.")
    theta = d.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
        # Never fall back to 1e4 silently: Mixtral uses 1e6 and the wrong base is a silent quality bug.
        raise ValueError("config has no rope_theta (top level or in rope_parameters); add it to config.json.")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "num_local_experts", "num_experts_per_tok",
                            "max_position_embeddings")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ValueError(f"config is missing required fields {missing}; is this a Mixtral config.json?")
    eos = d.get("eos_token_id", 2)
    return MixtralConfig(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            num_local_experts=int(d["num_local_experts"]),
            num_experts_per_tok=int(d["num_experts_per_tok"]),
            max_position_embeddings=int(d["max_position_embeddings"]),
            rope_theta=float(theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            head_dim=None if d.get("head_dim") is None else int(d["head_dim"]),
            sliding_window=None if d.get("sliding_window") is None else int(d["sliding_window"]),
            bos_token_id=int(d.get("bos_token_id", 1) if d.get("bos_token_id") is not None else 1),
            eos_token_id=int(eos[0] if isinstance(eos, list) else (eos if eos is not None else 2)),
            router_aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)),
            dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            name=name,
    )


def presets() -> list[str]:
    """Names of the built-in presets (configs/*.json)."""
    files = importlib.resources.files(PRESET_PACKAGE).iterdir()
    return sorted(f.name[:-len(".json")] for f in files if f.name.endswith(".json"))


def load_config(name_or_path: str | os.PathLike) -> MixtralConfig:
    """Loads a config from a preset name, a config.json path, or a checkpoint dir.

    Args:
        name_or_path: "tiny" | "8x7b" | "8x22b", a path to a HF-style config.json,
            or a directory holding one (an HF checkpoint or a converted checkpoint).

    Returns:
        The frozen `MixtralConfig`.
    """
    s = os.fspath(name_or_path)
    if os.path.isdir(s):
        path = os.path.join(s, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"directory {s} has no {CONFIG_FILE}; pass a checkpoint directory or a preset.")
        name = os.path.basename(os.path.normpath(s))
    elif os.path.isfile(s):
        path, name = s, os.path.splitext(os.path.basename(s))[0]
    elif s.lower() in presets():
        name = s.lower()
        with importlib.resources.files(PRESET_PACKAGE).joinpath(f"{name}.json").open() as f:
            return from_hf_dict(json.load(f), name=name)
    else:
        raise ValueError(
                f"unknown config {s!r}: use a preset ({', '.join(presets())}), a config.json path "
                "or a checkpoint directory.")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); pass a HF-style config.json.") from None
    return from_hf_dict(d, name=name)
