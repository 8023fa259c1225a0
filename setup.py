"""mixtral_jax: Mixtral mixture-of-experts inference in JAX/Flax with expert parallelism."""

from setuptools import setup

setup(
    name="mixtral_jax",
    version="0.1.0",
    description="Mixtral 8x7B / 8x22B in JAX/Flax NNX, sharded with expert parallelism.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["mixtral_jax", "mixtral_jax.bench", "mixtral_jax.configs"],
    package_data={"mixtral_jax": ["csrc/*.cc"], "mixtral_jax.configs": ["*.json"]},
    install_requires=[
        # jax 0.11+ needs Python 3.12+: on 3.11 the pair CI tests (jax 0.10.2, with libtpu 0.0.42 in
        # the tpu extra); on 3.12+ the newest that install (0.12: libtpu 0.0.50).
        "jax==0.10.2; python_version < '3.12'",
        "jax>=0.10.2,<0.13; python_version >= '3.12'",
        "flax>=0.11,<0.13",
        "optax>=0.2,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorstore>=0.1.84,<0.2",
        "ml_dtypes>=0.5,<0.7; python_version < '3.12'",  # as tested with jax 0.10.2
        "ml_dtypes>=0.5,<0.8; python_version >= '3.12'",
        "sentencepiece>=0.2,<0.3",
        "numpy>=1.26,<3",
        "absl-py>=2.1,<3",
        "safetensors>=0.4,<0.9",
        "xxhash>=3.4,<5",
        "mistral-common>=1.5,<2",
        "matplotlib>=3.8,<4",
        # The server (python -m mixtral_jax.serve).
        "fastapi>=0.110,<1",
        "uvicorn>=0.29,<1",
        "prometheus-client>=0.20,<1",
    ],
    extras_require={
        # The TPU runtime and compiler (libtpu) matching jax: runs on TPU VMs, and plans for any TPU
        # topology from any host (`python -m mixtral_jax.sample --dry_run --topology v5e:2x4 ...`).
        "tpu": [
            "jax[tpu]==0.10.2; python_version < '3.12'",
            "jax[tpu]>=0.10.2,<0.13; python_version >= '3.12'",
        ],
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",  # pytest.ini runs the files on up to 4 workers
            "torch==2.13.0",
            "transformers>=5.0,<6",
            "nbclient>=0.10,<0.12",
            "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8",
            "openai>=1.30,<4",  # tests/test_serve.py talks to the server with the official client
        ],
    },
)
