"""mixtral_jax: Mixtral mixture-of-experts models in JAX/Flax NNX, sharded with expert parallelism.

The public API (see README.md):

    import mixtral_jax as mj
    cfg = mj.load_config("8x7b")
    mj.param_count(cfg)
    model = mj.init_random(cfg, seed=0, dtype="float32", mesh=None)
    logits = mj.forward(model, tokens)
"""

from mixtral_jax.config import MixtralConfig, load_config, presets
from mixtral_jax.generate import generate, generate_stream
from mixtral_jax.model import Mixtral, forward, init_random, param_count
from mixtral_jax.routing import Routing, expert_load, expert_routing, plot_routing
from mixtral_jax.sharding import make_mesh
from mixtral_jax.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "MixtralConfig",
    "Mixtral",
    "expert_load",
    "expert_routing",
    "forward",
    "generate",
    "generate_stream",
    "init_random",
    "load_config",
    "load_tokenizer",
    "make_mesh",
    "param_count",
    "plot_routing",
    "presets",
    "Routing",
    "Tokenizer",
]
