#!/usr/bin/env bash
# N JAX processes on this host, joined by jax.distributed over 127.0.0.1 (CPU collectives over gloo).
# The multi-host code path without a cluster: what tests/test_multihost.py runs.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS [COMMAND ...]
#
# COMMAND (default: python -m mixtral_jax.sample) gets
#   --coordinator_address 127.0.0.1:PORT --num_processes N --process_id I
# appended, and DEVICES_PER_PROCESS virtual CPU devices (added to $XLA_FLAGS). Process 0 writes to this
# terminal; the others to $LOG_DIR/process_I.log (default: a fresh temp dir).
# No process outlives this script: if one fails, the others are stopped and the exit
# status is the failure's; Ctrl-C, SIGTERM or SIGHUP stop them all; and on Linux each
# process also gets SIGKILL if this script is killed outright (setpriv --pdeathsig).
# Example (8 devices in all, a mesh spanning both processes):
#   launch/local_multiprocess.sh 2 4 python -m mixtral_jax.sample --mesh expert=4,tensor=2 --prompt_ids 1,2,3 --json
set -euo pipefail
set -m  # job control: each process gets its own process group, so stopping it stops its children too

if [[ $# -lt 2 ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [COMMAND ...]" >&2
  exit 2
fi
num_processes=$1
devices=$2
shift 2
command=("$@")
if [[ ${#command[@]} -eq 0 ]]; then
  command=(python -m mixtral_jax.sample)
fi
port=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d)}
tie=()
if command -v setpriv > /dev/null && setpriv --pdeathsig KILL true 2> /dev/null; then
  tie=(setpriv --pdeathsig KILL --)
fi

pids=()
stop_all() {
  trap '' INT TERM HUP
  exec 2> /dev/null  # the processes keep their own stderr; this hides bash's "Terminated" job notices
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2> /dev/null || true
  done
  # Five seconds to exit, then SIGKILL for any process (group) that is still there.
  for _ in {1..50}; do
    local alive=0
    for pid in "${pids[@]}"; do
      if kill -0 -- "-$pid" 2> /dev/null; then alive=1; fi
    done
    [[ $alive -eq 0 ]] && return
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    kill -KILL -- "-$pid" 2> /dev/null || true
  done
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# The caller's XLA flags stay; the device count given here comes last, and the last one counts.
xla_flags="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
for ((i = 0; i < num_processes; i++)); do
  args=(--coordinator_address "127.0.0.1:${port}" --num_processes "${num_processes}" --process_id "$i")
  if [[ $i -eq 0 ]]; then
    JAX_PLATFORMS=cpu XLA_FLAGS="${xla_flags}" \
      ${tie[@]+"${tie[@]}"} "${command[@]}" "${args[@]}" &
  else
    JAX_PLATFORMS=cpu XLA_FLAGS="${xla_flags}" \
      ${tie[@]+"${tie[@]}"} "${command[@]}" "${args[@]}" > "${log_dir}/process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done

# Wait for all; the first failure stops the rest (they would wait for their lost peer otherwise).
declare -A index_of
for i in "${!pids[@]}"; do index_of[${pids[$i]}]=$i; done
for ((n = 0; n < num_processes; n++)); do
  status=0
  done_pid=
  if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)); then
    wait -n -p done_pid 2> /dev/null || status=$?  # -p names the process that ended (bash 5.1+)
  else
    wait -n 2> /dev/null || status=$?
  fi
  if [[ $status -ne 0 ]]; then
    failed=${index_of[${done_pid:-none}]:-"?"}
    why=""
    if [[ $status -gt 128 ]]; then why=", killed by signal $((status - 128))"; fi
    echo "process ${failed} failed (exit ${status}${why}); stopping the others. Logs of processes 1..: ${log_dir}" >&2
    if [[ $failed != "?" && $failed -gt 0 ]]; then
      tail -n 20 "${log_dir}/process_${failed}.log" >&2 || true
    fi
    exit "$status"
  fi
done
