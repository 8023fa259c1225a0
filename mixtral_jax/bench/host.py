"""The host under the bench: its facts (/proc, /sys), other processes' load, and its reference rates.

Linux files are read where they exist; elsewhere the facts are None and the
load checks pass, so the bench still runs.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any

MATMUL_SHAPE = (512, 1024, 3584)  # [M, K] x [K, N], the shape of a 512-token expert matmul
PROBE_CALLS = 5  # calls per host-probe sample; the sample is their median


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _l3_cache() -> str | None:
    """The L3 cache size as the kernel states it (e.g. "266240K"), or None."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            return f.read().strip()
    except OSError:
        return None


def meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo field ("MemTotal", "MemAvailable") in bytes, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _busy_cpu_seconds() -> float | None:
    """Whole-machine non-idle CPU seconds since boot (steal included), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """CPU cores kept busy by everything except this process over a window (noise indicator)."""

    def __init__(self):
        self.start = (time.perf_counter(), _busy_cpu_seconds(), self._own())

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def cores(self) -> float | None:
        wall0, busy0, own0 = self.start
        busy1 = _busy_cpu_seconds()
        if busy0 is None or busy1 is None:
            return None
        return max(0.0, (busy1 - busy0) - (self._own() - own0)) / (time.perf_counter() - wall0)


def wait_quiet(max_wait_s: float, threshold_cores: float = 0.1) -> None:
    """Waits (up to max_wait_s) until other processes use under threshold_cores of CPU."""
    deadline = time.perf_counter() + max_wait_s
    while time.perf_counter() < deadline:
        window = OtherLoad()
        time.sleep(0.5)
        cores = window.cores()
        if cores is None or cores < threshold_cores:
            return


def machine_facts() -> dict[str, Any]:
    """nproc, CPU model, L3 size, memory and the versions that matter."""
    import jax
    import torch
    import transformers

    mem = meminfo_bytes("MemTotal")
    return {"nproc": os.cpu_count(), "cpu": _cpu_model(), "l3_cache": _l3_cache(),
            "memory_gib": None if mem is None else round(mem / 2**30, 1), "python": platform.python_version(),
            "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


class HostProbe:
    """This host's float32 streaming-read bandwidth and XLA matmul rate.

    Bandwidth is measured two ways on a weight bigger than the L3 cache: an XLA
    matvec, and (where it is built) the CPU MoE kernel on one row, one expert
    of the same total size. The roofline uses the faster of the two.
    """

    def __init__(self, weight_bytes: int):
        import jax
        import jax.numpy as jnp

        from mixtral_jax import cpu_kernel

        self.weight_bytes = weight_bytes // (4 * 1024) * 4 * 1024
        n = self.weight_bytes // (4 * 1024)
        k_w, k_x, k_a, k_b = jax.random.split(jax.random.key(0), 4)
        self.w = jax.random.normal(k_w, (1024, n), jnp.float32)
        self.x = jax.random.normal(k_x, (1, 1024), jnp.float32)
        m, k, n_mm = MATMUL_SHAPE
        self.a = jax.random.normal(k_a, (m, k), jnp.float32)
        self.b = jax.random.normal(k_b, (k, n_mm), jnp.float32)
        self.matmul_flops = 2 * m * k * n_mm
        self.product = jax.jit(lambda x, w: x @ w)
        self.kernel = None
        if cpu_kernel.usable(self.x):
            f = self.weight_bytes // (3 * 4 * 1024)  # w1, w3 [F, 1024] and w2 [1024, F]
            expert = {name: jax.random.normal(jax.random.fold_in(k_w, i), shape, jnp.float32)  # one expert
                      for i, (name, shape) in enumerate((("w1", (1, f, 1024)), ("w3", (1, f, 1024)),
                                                         ("w2", (1, 1024, f))))}
            self.kernel_bytes = 3 * f * 1024 * 4
            self.kernel = jax.jit(lambda x, g, e: cpu_kernel.moe_cpu(x, g, e))
            self.kernel_args = (self.x, jnp.ones((1,), jnp.int32), expert)  # one group: the one row
        self.sample()  # compiles every shape

    def _time(self, fn, *args) -> float:
        import jax

        times = []
        for _ in range(PROBE_CALLS):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def sample(self) -> tuple[float, float | None, float]:
        """One sample: (XLA matvec GB/s, kernel GB/s or None, matmul GFLOP/s), each a median of PROBE_CALLS."""
        gb_s = self.weight_bytes / self._time(self.product, self.x, self.w) / 1e9
        kernel_gb_s = None if self.kernel is None else self.kernel_bytes / self._time(self.kernel, *self.kernel_args) / 1e9
        return gb_s, kernel_gb_s, self.matmul_flops / self._time(self.product, self.a, self.b) / 1e9
