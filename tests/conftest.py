"""Test setup: 8 virtual CPU devices (set before jax is imported) for the sharding tests, and XLA:CPU's
LLVM at -O0 for every test and the processes tests start."""

import os

# The suite compiles hundreds of small programs and runs each a few times: LLVM at -O0 cuts their CPU
# time by about a third (tests/test_model.py 163 -> 104 CPU seconds, run back to back). XLA's own passes,
# which decide what is computed in which order, run as at the default level; the tests check results
# against references.
FAST_COMPILE = "--xla_backend_optimization_level=0"

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
