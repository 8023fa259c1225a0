"""Two processes × 4 CPU devices joined by jax.distributed over 127.0.0.1 give one process's tokens."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multihost_worker.py")
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    return env


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def _run_processes(argvs):
    """Starts every process, waits at most TIMEOUT_S in all, kills them all on timeout or failure."""
    procs = [subprocess.Popen([sys.executable, WORKER, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env()) for argv in argvs]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


@pytest.mark.parametrize("mesh", ["data=2,expert=2,tensor=2", "expert=4,tensor=2"])
def test_two_processes_equal_one(mesh):
    port = _free_port()
    multi = _run_processes([
        ["--local_devices", "4", "--mesh", mesh, "--coordinator_address", f"127.0.0.1:{port}",
         "--num_processes", "2", "--process_id", str(i)] for i in range(2)])
    single = _run_processes([["--local_devices", "8", "--mesh", mesh]])[0]
    two, one = _result(multi[0]), _result(single)
    assert not [line for line in multi[1].splitlines() if line.startswith("{")]  # only process 0 prints
    assert (two["processes"], two["devices"], one["processes"], one["devices"]) == (2, 8, 1, 8)
    assert two["tokens"] == one["tokens"]
    np.testing.assert_allclose(two["logits"], one["logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2), "needs --num_processes and --process_id"),
    (dict(num_processes=2, process_id=0), "need --coordinator_address"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), r"must be in \[0, 2\)"),
])
def test_initialize_distributed_bad_arguments(kwargs, match):
    from mixtral_jax import sharding

    with pytest.raises(ValueError, match=match):
        sharding.initialize_distributed(**kwargs)
