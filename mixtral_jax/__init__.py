"""mixtral_jax: Mixtral mixture-of-experts models in JAX/Flax NNX."""
