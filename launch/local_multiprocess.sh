#!/usr/bin/env bash
# N JAX processes on this host, joined by jax.distributed over 127.0.0.1 (CPU collectives over gloo).
# The multi-host code path without a cluster: what tests/test_multihost.py runs.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS [COMMAND ...]
#
# COMMAND (default: python -m mixtral_jax.sample) gets
#   --coordinator_address 127.0.0.1:PORT --num_processes N --process_id I
# appended, and DEVICES_PER_PROCESS virtual CPU devices. Process 0 writes to this
# terminal; the others to $LOG_DIR/process_I.log (default: a fresh temp dir). If any
# process fails, the others are stopped and the exit status is the failure's.
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

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill -- "-$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT
trap 'exit 143' INT TERM

for ((i = 0; i < num_processes; i++)); do
  args=(--coordinator_address "127.0.0.1:${port}" --num_processes "${num_processes}" --process_id "$i")
  if [[ $i -eq 0 ]]; then
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
      "${command[@]}" "${args[@]}" &
  else
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
      "${command[@]}" "${args[@]}" > "${log_dir}/process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done

# Wait for all; the first failure stops the rest (they would hang on their peers otherwise).
for ((done = 0; done < num_processes; done++)); do
  status=0
  wait -n || status=$?
  if [[ $status -ne 0 ]]; then
    echo "a process failed (exit ${status}); stopping the others. Logs of processes 1..: ${log_dir}" >&2
    for ((i = 1; i < num_processes; i++)); do
      tail -n 20 "${log_dir}/process_${i}.log" >&2 || true
    done
    exit "$status"
  fi
done
