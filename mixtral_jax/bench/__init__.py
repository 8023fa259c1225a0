"""The benchmark against transformers; `python -m mixtral_jax.bench` (see __main__.py) runs it."""
