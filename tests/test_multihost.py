"""Multi-process runs over 127.0.0.1: two processes give one process's tokens (the sample CLI, the server), a lost
process ends the others with one line, and the launchers leave no process behind."""

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest
from conftest import FAST_COMPILE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = [sys.executable, os.path.join(REPO, "tests", "multihost_worker.py")]
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")
TIMEOUT_S = 240


def _run(argv, devices: int, env=None) -> tuple[str, str]:
    """Runs argv in its own process group; returns (stdout, stderr). On timeout or failure the group is killed."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}", **(env or {})}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"exit {proc.returncode}: {err[-3000:]}"
    return out, err


# One launch across all three mesh axes (test_sharding.py covers expert=4,tensor=2 in one process).
MESH = "data=2,expert=2,tensor=2"
PROMPTS = [[1, 17, 300, 42, 9], [1, 5], [1, 400, 401, 402, 403, 404, 405, 406]]


@pytest.fixture(scope="module")
def model():
    """The tiny model (seed 0) on MESH over this process's 8 devices: the processes' models' reference."""
    import mixtral_jax as mj

    assert jax.device_count() == 8, "conftest.py sets 8 virtual CPU devices"
    return mj.init_random(mj.load_config("tiny"), seed=0, dtype="float32", mesh=mj.make_mesh(MESH))


def test_sample_cli_on_two_processes_equals_one(tmp_path, model):
    """The sample CLI on 2 processes x 4 devices: its tokens, and the logits of the model it built, equal
    those of the same model on this process's 8 devices."""
    import mixtral_jax as mj
    import multihost_worker

    args = ["--mesh", MESH, *[f"--prompt_ids={','.join(map(str, p))}" for p in PROMPTS], "--max_new_tokens", "6",
            "--json"]
    stdout, stderr = _run([LAUNCHER, "2", "4", *WORKER, *args], devices=4,
                          env={"LOG_DIR": str(tmp_path), "LOGITS_FILE": str(tmp_path / "logits.json")})
    # --json: stdout is the JSON line only; Gloo's "Rank N is connected" lines, printed from C++ onto file
    # descriptor 1, land on stderr instead. The header (random weights!) is on stderr; progress is quiet.
    assert len(stdout.strip().splitlines()) == 1
    assert "RANDOM weights" in stderr and "[mixtral_jax] initialising" not in stderr
    two = json.loads(stdout)
    log_1 = (tmp_path / "process_1.log").read_text()
    assert "tokens" not in log_1 and "Gloo" in log_1  # process 0 alone prints results; the chatter is on stderr
    two_logits = json.loads((tmp_path / "logits.json").read_text())
    assert (two_logits["processes"], two_logits["devices"]) == (2, 8)

    assert two["tokens"] == mj.generate(model, PROMPTS, max_new_tokens=6) and two["random_weights"] is True
    assert len(two["tokens"]) == 3 and two["prompt_tokens"] == [len(p) for p in PROMPTS]
    np.testing.assert_allclose(two_logits["logits"], multihost_worker.last_logits(model, PROMPTS[0]),
                               rtol=1e-5, atol=1e-6)


def test_quantized_load_on_two_processes_equals_one(tmp_path, model):
    """A float checkpoint quantized to int8 while 2 processes x 4 devices restore it (each process reads and
    quantizes the shards of its own devices): the sample CLI's tokens, and the logits of the model it loaded,
    equal the same load on this process's 8 devices."""
    import mixtral_jax as mj
    import multihost_worker

    ckpt = mj.save(mj.init_random(mj.load_config("tiny"), seed=0, dtype="float32", layout="stacked"),
                   tmp_path / "ckpt")
    args = ["--checkpoint", ckpt, "--quantize", "int8", "--dtype", "float32", "--mesh", MESH,
            f"--prompt_ids={','.join(map(str, PROMPTS[0]))}", "--max_new_tokens", "6", "--json"]
    stdout, _ = _run([LAUNCHER, "2", "4", *WORKER, *args], devices=4,
                     env={"LOG_DIR": str(tmp_path), "LOGITS_FILE": str(tmp_path / "logits.json")})
    two, two_logits = json.loads(stdout), json.loads((tmp_path / "logits.json").read_text())
    assert (two_logits["processes"], two_logits["devices"]) == (2, 8)
    one = mj.load(ckpt, dtype="float32", mesh=model.mesh, quantize="int8")
    assert one.quantization == "int8"  # int4 groups do not fit the tiny F (224) split over tensor=2
    assert two["tokens"] == mj.generate(one, PROMPTS[:1], max_new_tokens=6)
    np.testing.assert_allclose(two_logits["logits"], multihost_worker.last_logits(one, PROMPTS[0]),
                               rtol=1e-5, atol=1e-6)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_server_on_two_processes_equals_one(tmp_path, model):
    """The server on 2 processes x 4 devices: its completions, greedy and seeded sampled, sent together,
    equal mj.generate of the same model on this process's 8 devices."""
    import mixtral_jax as mj

    port = _free_port()
    argv = [LAUNCHER, "2", "4", sys.executable, "-m", "mixtral_jax.serve", "--mesh", MESH, "--port", str(port),
            "--max_batch", "4", "--max_seq_len", "32", "--prefill_chunk", "8", "--prefill_batch", "1"]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "LOG_DIR": str(tmp_path)}
    log_0 = tmp_path / "process_0.log"
    launcher = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log_0.open("w"), env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    requests = [dict(prompt=p, max_tokens=6, temperature=0) for p in PROMPTS]
    requests.append(dict(prompt=PROMPTS[0], max_tokens=6, temperature=0.9, top_k=20, seed=5))
    try:
        # The references, while the server starts. Greedy: one batch, as the sample CLI test's (its rows equal
        # each prompt alone: test_generate.py).
        refs = mj.generate(model, PROMPTS, max_new_tokens=6, stop_tokens=[])
        refs.append(mj.generate(model, PROMPTS[:1], max_new_tokens=6, stop_tokens=[], temperature=0.9, top_k=20,
                                seed=5)[0])
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert launcher.poll() is None, f"the server exited {launcher.returncode}: {log_0.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the server did not come up in time"
            try:
                if json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())["status"] == "ok":
                    break
            except OSError:
                time.sleep(0.5)
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            texts = list(pool.map(lambda r: _post(url + "/v1/completions", {**r, "stop_token_ids": []}), requests))
        texts = [t["choices"][0]["text"] for t in texts]
    finally:
        launcher.terminate()  # the launcher stops both processes; SIGKILL for whatever is left after 20 s
        try:
            launcher.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        for pid in _session_pids(launcher.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait()
    assert launcher.returncode == 143 and _gone([launcher.pid])  # stopped by SIGTERM, nothing left behind
    tok = mj.load_tokenizer("8x7b")
    for text, r, ref in zip(texts, requests, refs):
        assert text == tok.decode(r["prompt"][-1:] + ref)[len(tok.decode(r["prompt"][-1:])):]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launcher_stops_everyone_when_a_process_fails(tmp_path):
    # Process 1 gets a mesh of the wrong size and exits at once; process 0 would wait for it forever.
    script = tmp_path / "fail_one.sh"
    script.write_text("#!/usr/bin/env bash\n"
                      "for a in \"$@\"; do [[ $prev == --process_id ]] && id=$a; prev=$a; done\n"
                      "if [[ $id == 1 ]]; then exit 3; fi\n"
                      "sleep 600\n")
    script.chmod(0o755)
    with pytest.raises(AssertionError, match=r"process 1 failed \(exit 3\)"):
        _run([LAUNCHER, "2", "1", str(script)], devices=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2), "needs --num_processes and --process_id"),
    (dict(num_processes=2, process_id=0), "need --coordinator_address"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), r"must be in \[0, 2\)"),
    (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0), "is not host:port"),
    (dict(coordinator_address="10.0.0.2:1234", num_processes=0, process_id=0), "--num_processes must be >= 1"),
])
def test_initialize_bad_arguments(kwargs, match):
    from mixtral_jax import distributed

    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kwargs)


def test_single_process_without_cluster_is_a_no_op(monkeypatch):
    from mixtral_jax import distributed

    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.initialize() is False
    assert distributed.requested(env={"SLURM_NTASKS": "16"})
    assert distributed.requested(env={"TPU_WORKER_HOSTNAMES": "t1k-w-0,t1k-w-1"})
    assert not distributed.requested(env={"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})


@pytest.mark.parametrize("address,bind", [("127.0.0.1:1234", "127.0.0.1:1234"), ("localhost:99", "localhost:99"),
                                          ("10.0.0.2:1234", None)])
def test_coordinator_on_loopback_listens_on_loopback_only(address, bind, monkeypatch):
    import jax

    from mixtral_jax import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(distributed, "_cxx_stdout_to_stderr", lambda: None)
    monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS", raising=False)
    assert distributed.initialize(address, 2, 0) is True
    (args, kwargs), = calls
    assert args == (address, 2, 0) and kwargs.get("coordinator_bind_address") == bind  # None: JAX's [::]:port
    assert kwargs["heartbeat_timeout_seconds"] <= 20


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
    assert command.startswith("cd mixtral_jax && echo $$ > /tmp/mixtral_jax-")
    assert " && exec python3 -m mixtral_jax.sample " in command
    # The remote shell gets the prompt back as one argument.
    remote = subprocess.run(["bash", "-c", "printf '%s\\n' " + command.split("mixtral_jax.sample ", 1)[1]],
                            capture_output=True, text=True, check=True).stdout.splitlines()
    assert remote == ["--mesh", "expert=8,tensor=2", "--prompt", "it's a test"]


def test_tpu_pod_script_stops_the_workers_when_interrupted(tmp_path):
    # A fake gcloud: the run's ssh "hangs" like a long generation; every call is logged.
    log = tmp_path / "calls.log"
    tool = tmp_path / "gcloud"
    tool.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> ' + str(log) + '\n'
                    'if [[ "$*" == *"exec python3"* ]]; then exec sleep 300; fi\n')
    tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen([os.path.join(REPO, "launch", "tpu_pod.sh"), "my-v4-32", "us-central2-b"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        for _ in range(100):
            if log.exists() and "exec python3" in log.read_text():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        run, stop = log.read_text().splitlines()
        pid_file = run.split("echo $$ > ")[1].split()[0]
        assert stop.startswith("compute tpus tpu-vm ssh my-v4-32 --zone us-central2-b --worker=all --command")
        assert f"kill -TERM $(cat {pid_file})" in stop
        assert proc.returncode == 143 and not _session_pids(proc.pid)  # the ssh (fake gcloud) is gone too
    finally:
        _kill_session(proc)


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


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _kill_session(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _gone(sids, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_session_pids(s) for s in sids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("victim", [1, 0])
def test_a_lost_process_ends_the_others_with_one_line(victim):
    """kill -9 of one process mid-run: the other exits 1 within 30 s with one line naming it; nothing is left."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}"}
    port = subprocess.run([sys.executable, "-c", "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); "
                           "print(s.getsockname()[1])"], capture_output=True, text=True, check=True).stdout.strip()
    procs = [subprocess.Popen([sys.executable, "-m", "mixtral_jax.sample", "--mesh", "expert=2", "--max_new_tokens",
                               "4000", "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
                               "--process_id", str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, start_new_session=True) for i in range(2)]
    try:
        for line in procs[0].stderr:  # process 0 says when both have joined and start building the model
            if "initialising random" in line:
                break
        assert _session_pids(procs[1].pid), "process 1 ended before the test could kill a process"
        procs[victim].kill()
        procs[victim].wait()
        t0 = time.monotonic()
        survivor = procs[1 - victim]
        _, err = survivor.communicate(timeout=60)
        elapsed = time.monotonic() - t0
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert survivor.returncode == 1 and elapsed < 30, (survivor.returncode, elapsed, err[-2000:])
        assert len(errors) == 1 and "Traceback" not in err and "Check failure" not in err, err[-2000:]
        lost = "process 1 of 2 stopped responding" if victim == 1 else "lost the coordinator, process 0 of 2"
        assert lost in errors[0] and f"process {1 - victim} stopped too" in errors[0]
        assert _gone([p.pid for p in procs])  # no orphan: the killed process's supervised child died with it
    finally:
        for p in procs:
            _kill_session(p)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_process_outlives_the_launcher(sig, tmp_path):
    # Each process records its pid and waits; the launcher is then stopped (SIGTERM) or killed outright.
    script = tmp_path / "wait.sh"
    script.write_text('#!/usr/bin/env bash\nfor a in "$@"; do [[ $prev == --process_id ]] && id=$a; prev=$a; done\n'
                      f'echo $$ > {tmp_path}/pid_$id\nexec sleep 300\n')
    script.chmod(0o755)
    launcher = subprocess.Popen([LAUNCHER, "2", "1", str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "LOG_DIR": str(tmp_path)})
    pid_files = [tmp_path / "pid_0", tmp_path / "pid_1"]
    try:
        for _ in range(100):
            if all(f.exists() and f.read_text().strip() for f in pid_files):
                break
            time.sleep(0.1)
        pids = [int(f.read_text()) for f in pid_files]
        launcher.send_signal(sig)
        launcher.wait(timeout=20)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
        assert launcher.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL)
    finally:
        for f in pid_files:
            if f.exists() and f.read_text().strip() and _alive(int(f.read_text())):
                os.kill(int(f.read_text()), signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
