"""Two processes × 4 CPU devices joined by jax.distributed over 127.0.0.1 give one process's tokens."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = [sys.executable, os.path.join(REPO, "tests", "multihost_worker.py")]
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")
TIMEOUT_S = 240


def _run(argv, devices: int, log_dir=None) -> str:
    """Runs argv in its own process group; on timeout or failure the whole group is killed."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if log_dir is not None:
        env["LOG_DIR"] = str(log_dir)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-3000:]}"
    return out


def _result(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


@pytest.mark.parametrize("mesh", ["data=2,expert=2,tensor=2", "expert=4,tensor=2"])
def test_two_processes_equal_one(mesh, tmp_path):
    two = _result(_run([LAUNCHER, "2", "4", *WORKER, "--mesh", mesh], devices=4, log_dir=tmp_path))
    one = _result(_run([*WORKER, "--mesh", mesh], devices=8))
    assert "{" not in (tmp_path / "process_1.log").read_text()  # only process 0 prints results
    assert (two["processes"], two["devices"], one["processes"], one["devices"]) == (2, 8, 1, 8)
    assert two["tokens"] == one["tokens"]
    np.testing.assert_allclose(two["logits"], one["logits"], rtol=1e-5, atol=1e-6)


def test_launcher_stops_everyone_when_a_process_fails(tmp_path):
    # Process 1 gets a mesh of the wrong size and exits at once; process 0 would wait for it forever.
    script = tmp_path / "fail_one.sh"
    script.write_text("#!/usr/bin/env bash\n"
                      "for a in \"$@\"; do [[ $prev == --process_id ]] && id=$a; prev=$a; done\n"
                      "if [[ $id == 1 ]]; then exit 3; fi\n"
                      "sleep 600\n")
    script.chmod(0o755)
    with pytest.raises(AssertionError, match=r"a process failed \(exit 3\)"):
        _run([LAUNCHER, "2", "1", str(script)], devices=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2), "needs --num_processes and --process_id"),
    (dict(num_processes=2, process_id=0), "need --coordinator_address"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), r"must be in \[0, 2\)"),
])
def test_initialize_distributed_bad_arguments(kwargs, match):
    from mixtral_jax import sharding

    with pytest.raises(ValueError, match=match):
        sharding.initialize_distributed(**kwargs)


def test_single_process_without_cluster_is_a_no_op(monkeypatch):
    from mixtral_jax import sharding

    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert sharding.initialize_distributed() is False
    assert sharding._multi_process_cluster({"SLURM_NTASKS": "16"})
    assert sharding._multi_process_cluster({"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"})
    assert not sharding._multi_process_cluster({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})


def _fake_tool(directory, name):
    """An executable `name` that prints its arguments one per line."""
    tool = directory / name
    tool.write_text('#!/usr/bin/env bash\nfor a in "$@"; do echo "ARG:$a"; done\n')
    tool.chmod(0o755)


def test_tpu_pod_script_runs_sample_on_every_worker(tmp_path):
    _fake_tool(tmp_path, "gcloud")
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "PROJECT": "p1"}
    out = subprocess.run([os.path.join(REPO, "launch", "tpu_pod.sh"), "my-v4-32", "us-central2-b", "--mesh",
                          "expert=8,tensor=2", "--prompt", "it's a test"], capture_output=True, text=True,
                         env=env, timeout=30, check=True).stdout
    args = [line[4:] for line in out.splitlines()]
    assert args[:7] == ["compute", "tpus", "tpu-vm", "ssh", "my-v4-32", "--zone", "us-central2-b"]
    assert "--worker=all" in args and args[args.index("--project") + 1] == "p1"
    command = args[args.index("--command") + 1]
    assert command.startswith("cd mixtral_jax && python3 -m mixtral_jax.sample ")
    # The remote shell gets the prompt back as one argument.
    remote = subprocess.run(["bash", "-c", "printf '%s\\n' " + command.split("mixtral_jax.sample ", 1)[1]],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert remote == ["--mesh", "expert=8,tensor=2", "--prompt", "it's a test"]


def test_gpu_slurm_script_runs_one_process_per_gpu(tmp_path):
    _fake_tool(tmp_path, "srun")
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path)}
    script = os.path.join(REPO, "launch", "gpu_slurm.sbatch")
    out = subprocess.run(["bash", script, "--mesh", "data=2,expert=4,tensor=2"], capture_output=True, text=True,
                         env=env, timeout=30, check=True).stdout
    assert [line[4:] for line in out.splitlines()] == [
        "--kill-on-bad-exit=1", "python", "-m", "mixtral_jax.sample", "--mesh", "data=2,expert=4,tensor=2"]
    directives = [line for line in open(script) if line.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=8\n" in directives and "#SBATCH --gpus-per-node=8\n" in directives


def test_sample_cli_two_processes_equal_one(tmp_path):
    args = ["-m", "mixtral_jax.sample", "--mesh", "expert=4,tensor=2", "--prompt_ids", "1,17,300,42",
            "--prompt_ids", "1,5", "--max_new_tokens", "5", "--json"]
    two = json.loads(_run([LAUNCHER, "2", "4", sys.executable, *args], devices=4, log_dir=tmp_path)
                     .strip().splitlines()[-1])
    one = json.loads(_run([sys.executable, *args], devices=8).strip().splitlines()[-1])
    assert two["tokens"] == one["tokens"] and len(two["tokens"]) == 2
    assert "tokens" not in (tmp_path / "process_1.log").read_text()  # process 0 alone prints results
