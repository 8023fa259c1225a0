"""Multi-process runs: joining `jax.distributed`, and ending cleanly when a process is lost.

A run of N processes (one per host, or several on one host over loopback)
fails as a whole: when one process dies, the others cannot finish. JAX's
coordination service notices (the lost process stops sending heartbeats, or
the coordinator's socket closes) and aborts every other process from C++, with
a stack dump. `initialize` makes that happen within seconds and keeps C++
chatter off stdout; `supervise` runs a CLI's work in a child process and turns
that abort into one line saying which process was lost and what to do.

    if distributed.requested(address, num_processes, process_id):
        distributed.supervise(process_id, num_processes)   # CLIs only; returns in the child
    distributed.initialize(address, num_processes, process_id)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import NoReturn

# Seconds without a heartbeat after which the coordination service declares a process lost and stops
# the others (JAX's default is 100). Heartbeats come from a C++ thread, so a busy Python thread cannot
# delay them; the survivors of a lost process exit about this long after it.
HEARTBEAT_TIMEOUT_S = 15
# Exit status of a process stopped because a peer was lost.
EXIT_PEER_LOST = 1

_CHILD_ENV = "MIXTRAL_JAX_SUPERVISED"
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
# Coordination-service log lines (absl format "E1205 23:20:09.019 5254 file.cc:123] ..."): from the first
# one on, the supervisor holds the child's stderr until it knows whether they end in the fatal abort.
_COORDINATION_LOG = re.compile(r"^[EWF]\d{4} [\d:.]+\s+\d+ (coordination_service\w*\.cc|client\.h|client\.cc)")
_FATAL = "Terminating process because the JAX distributed service detected fatal errors"


def requested(coordinator_address: str | None = None, num_processes: int | None = None,
              process_id: int | None = None, env=None) -> bool:
    """Whether these flags (or the environment) ask for a multi-process run; raises ValueError if incomplete.

    With `coordinator_address` ("host:port" of process 0), `num_processes` and
    `process_id` must be given too. With none of them, a run is multi-process
    when a launcher shows several processes: SLURM_NTASKS or
    OMPI_COMM_WORLD_SIZE > 1, or TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES
    listing several hosts. (Multi-host TPU VMs without those variables work
    too: the TPU runtime joins the hosts itself.)
    """
    env = os.environ if env is None else env
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ValueError("--coordinator_address needs --num_processes and --process_id too; give all three "
                         "(or none, to auto-detect a SLURM job or TPU pod).")
    if coordinator_address is None and (num_processes is not None or process_id is not None):
        raise ValueError("--num_processes/--process_id need --coordinator_address (host:port of process 0).")
    if coordinator_address is None:
        return _multi_process_cluster(env)
    if not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[\w.-]+):\d{1,5}", coordinator_address):
        raise ValueError(f"--coordinator_address {coordinator_address!r} is not host:port; give process 0's "
                         "address, e.g. 10.0.0.2:1234 (or 127.0.0.1:1234 for processes on this host).")
    if num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}.")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id {process_id} must be in [0, {num_processes}).")
    return True


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, initialization_timeout: int = 300) -> bool:
    """Joins this process to a multi-process JAX run, if there is one; call before any other JAX call.

    Beyond `jax.distributed.initialize`: CPU collectives over gloo; a lost
    process is noticed within HEARTBEAT_TIMEOUT_S; SIGTERM ends the process
    (JAX's preemption service would otherwise catch it and keep running); a
    coordinator on a loopback address listens on loopback only, not on every
    interface; and whatever C++ libraries print to stdout (Gloo's "Rank N is
    connected") goes to stderr, so stdout carries only the program's output.

    Args:
      coordinator_address: host:port of process 0, or None to auto-detect (see `requested`).
      num_processes: total number of processes.
      process_id: this process's index in [0, num_processes).
      initialization_timeout: seconds to wait for every process to join.

    Returns:
      Whether jax.distributed was initialised (False: a single-process run, nothing done).
    """
    if not requested(coordinator_address, num_processes, process_id):
        return False
    import jax

    # CPU computations spanning processes need a collectives backend; TPU/GPU ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", False)
    kwargs = {}
    if coordinator_address is not None and "JAX_COORDINATOR_BIND_ADDRESS" not in os.environ:
        host = coordinator_address.rsplit(":", 1)[0]
        if host in _LOOPBACK_HOSTS:
            kwargs["coordinator_bind_address"] = coordinator_address
    _cxx_stdout_to_stderr()
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S, **kwargs)
    if os.environ.get(_CHILD_ENV):
        # Ctrl-C ends a supervised process at once: a KeyboardInterrupt would wait in JAX's shutdown for
        # peers that are still computing.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    return True


def exit_after_error(message: str, status: int, maybe_peer_lost: bool) -> NoReturn:
    """Ends a process of a multi-process run after an error, without JAX's shutdown barrier.

    The barrier would wait for peers that are still computing. When the error may
    come from a lost peer (a collective failing), this first waits for the
    coordination service to name it (the supervisor then reports it instead).
    """
    import jax

    wait = HEARTBEAT_TIMEOUT_S + 5 if maybe_peer_lost else 0
    if jax.process_index() == 0:
        # Process 0 leaves last: it hosts the coordination service, whose end would stop the other
        # processes (as "lost the coordinator") before they report their own error.
        wait += 3
    time.sleep(wait)
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def supervise(process_id: int | None = None, num_processes: int | None = None) -> None:
    """Re-runs this command as a child process and exits with its outcome; in the child, returns at once.

    Call it from a CLI, before JAX starts, in a multi-process run. The child's
    stdout passes through; its stderr too, except JAX's abort when a peer is
    lost, which becomes one line naming the lost process (exit EXIT_PEER_LOST).
    SIGTERM, SIGHUP and SIGINT are passed on to the child, which dies with this
    process (Linux). Other exits keep the child's status (a signal N as 128+N).
    """
    if os.environ.get(_CHILD_ENV):
        return
    child = subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env={**os.environ, _CHILD_ENV: "1"},
                             stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    held = []
    for line in child.stderr:
        if held or _COORDINATION_LOG.match(line.decode(errors="replace")):
            held.append(line)
        else:
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()
    status = child.wait()
    text = b"".join(held).decode(errors="replace")
    if _FATAL in text:
        print(lost_peer_message(text, process_id, num_processes), file=sys.stderr)
        sys.exit(EXIT_PEER_LOST)
    sys.stderr.write(text)
    sys.exit(status if status >= 0 else 128 - status)


def lost_peer_message(log: str, process_id: int | None, num_processes: int | None) -> str:
    """One line from the coordination service's fatal log: which process was lost, and what to do."""
    me = "this process" if process_id is None else f"process {process_id}"
    restart = f"then restart all {num_processes} processes" if num_processes else "then restart the run"
    of = f" of {num_processes}" if num_processes else ""
    unhealthy = re.search(r"stopped sending heartbeats\):\s*\n(.*?)\n\s*The tasks", log, re.S)
    if unhealthy:
        ids = re.findall(r"(\d+)\s*$", unhealthy.group(1), re.M)
        lost = f"process{'es' if len(ids) > 1 else ''} {', '.join(ids)}"
        return (f"error: {lost}{of} stopped responding for {HEARTBEAT_TIMEOUT_S} s (killed, crashed, out of "
                f"memory or cut off), so {me} stopped too; find why in the output of {lost}, {restart}.")
    if "leader task" in log or "Failed to send RPC to coordination service" in log:
        return (f"error: lost the coordinator, process 0{of} (killed, crashed, out of memory or cut off), so {me} "
                f"stopped too; find why in the output of process 0, {restart}.")
    detail = re.search(r"absl::Status: (.*)", log)
    return (f"error: the JAX distributed service stopped {me}"
            f"{': ' + detail.group(1).strip() if detail else ''}; check the other processes' output, {restart}.")


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the supervisor dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)


def _cxx_stdout_to_stderr() -> None:
    """Points file descriptor 1 at stderr, keeping Python's sys.stdout on the real stdout."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(real_stdout, "w", encoding=sys.stdout.encoding, errors=sys.stdout.errors,
                      buffering=1 if sys.stdout.line_buffering else -1)


def _multi_process_cluster(env) -> bool:
    """Whether a launcher started several processes that jax.distributed can find on its own."""
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or len([h for h in hosts.split(",") if h]) > 1)
