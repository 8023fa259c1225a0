"""mixtral_jax: Mixtral mixture-of-experts models in JAX/Flax NNX, sharded with expert parallelism.

The public API (see README.md):

    import mixtral_jax as mj
    cfg = mj.load_config("8x7b")
    mj.param_count(cfg)
    model = mj.init_random(cfg, seed=0, dtype="float32", mesh=None)
    logits = mj.forward(model, tokens)
    mj.convert_hf_checkpoint(hf_dir, out_dir, dtype="bfloat16")
    model = mj.load(ckpt_dir, dtype="bfloat16", mesh=None)
    loss, metrics = mj.lm_loss(model, tokens, loss_mask)
    model = mj.merge_lora(model, mj.init_lora(cfg, rank=8))
"""

from mixtral_jax import topology as _topology

# With the tpu extra installed on a host without TPUs, libtpu would warn at backend start-up; every
# entry point (CLIs, launch/ scripts, notebooks) imports the package first, so this is the one call.
_topology.quiet_libtpu_without_tpu()

from mixtral_jax.checkpoint import load, save
from mixtral_jax.ckpt_files import CheckpointError
from mixtral_jax.config import MixtralConfig, load_config, presets
from mixtral_jax.generate import generate, generate_stream
from mixtral_jax.finetune import TrainConfig
from mixtral_jax.lora import init_lora, merge_lora
from mixtral_jax.loss import lm_loss
from mixtral_jax.model import Mixtral, forward, init_random, param_bytes, param_count
from mixtral_jax.routing import Routing, expert_load, expert_routing, plot_routing
from mixtral_jax.sharding import make_mesh
from mixtral_jax.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError",
    "MixtralConfig",
    "Mixtral",
    "convert_hf_checkpoint",
    "expert_load",
    "expert_routing",
    "forward",
    "generate",
    "generate_stream",
    "init_lora",
    "init_random",
    "lm_loss",
    "load",
    "load_config",
    "load_tokenizer",
    "make_mesh",
    "merge_lora",
    "param_bytes",
    "param_count",
    "plot_routing",
    "presets",
    "Routing",
    "save",
    "Tokenizer",
    "TrainConfig",
]


def __getattr__(name):
    # convert is imported on first use: `python -m mixtral_jax.convert` runs that module
    # as __main__, and runpy warns when the package has already imported it.
    if name == "convert_hf_checkpoint":
        from mixtral_jax.convert import convert_hf_checkpoint

        return convert_hf_checkpoint
    raise AttributeError(f"module 'mixtral_jax' has no attribute {name!r}")
