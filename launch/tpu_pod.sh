#!/usr/bin/env bash
# One command on every worker of a Cloud TPU VM slice (v4-32, v5p-16, v5e-64, ...).
# Every worker runs the same `python3 -m mixtral_jax.sample FLAGS...`; JAX joins the
# hosts itself on TPU, so no coordinator flags are needed. Process 0 prints the results.
#
#   launch/tpu_pod.sh TPU_NAME ZONE [SAMPLE FLAGS...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b --checkpoint /mnt/ckpt/8x7b \
#       --mesh expert=8,tensor=2 --chat --prompt "Explain expert parallelism"
#
# Environment:
#   REPO_DIR  where the repository is on every worker (default: mixtral_jax in the home dir)
#   SETUP=1   first copy this checkout to every worker and `pip install -e . "jax[tpu]"` there
#   PROJECT   gcloud project (default: gcloud's configured one)
# Plan the mesh first on any machine: python -m mixtral_jax.sample --config 8x7b --dry_run --mesh ...
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 TPU_NAME ZONE [SAMPLE FLAGS...]" >&2
  exit 2
fi
tpu=$1
zone=$2
shift 2
repo_dir=${REPO_DIR:-mixtral_jax}
gcloud_args=(compute tpus tpu-vm)
target=("$tpu" --zone "$zone" --worker=all)
if [[ -n ${PROJECT:-} ]]; then
  target+=(--project "$PROJECT")
fi

if [[ ${SETUP:-0} == 1 ]]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  gcloud "${gcloud_args[@]}" scp --recurse "$here" "${tpu}:${repo_dir}" "${target[@]:1}"
  gcloud "${gcloud_args[@]}" ssh "${target[@]}" \
    --command "cd ${repo_dir} && python3 -m pip install -q -e . 'jax[tpu]'"
fi

# Every worker runs the command in the foreground of its ssh session and records its pid, so that an
# interrupted launch (Ctrl-C, SIGTERM, SIGHUP) can stop it: without a terminal, a remote process would
# outlive a closed ssh connection.
pid_file="/tmp/mixtral_jax-${USER:-user}-$$-$(date +%s).pid"
ssh_pid=
stop_workers() {
  trap '' INT TERM HUP
  kill -TERM "$ssh_pid" 2> /dev/null || true
  echo "stopping mixtral_jax on every worker of ${tpu} ..." >&2
  gcloud "${gcloud_args[@]}" ssh "${target[@]}" \
    --command "if [ -f ${pid_file} ]; then kill -TERM \$(cat ${pid_file}); rm -f ${pid_file}; fi" || true
}
trap 'stop_workers; exit 130' INT
trap 'stop_workers; exit 143' TERM
trap 'stop_workers; exit 129' HUP

# printf %q keeps prompts with spaces and quotes intact through ssh.
gcloud "${gcloud_args[@]}" ssh "${target[@]}" \
  --command "cd ${repo_dir} && echo \$\$ > ${pid_file} && exec python3 -m mixtral_jax.sample $(printf '%q ' "$@")" &
ssh_pid=$!
wait "$ssh_pid"  # in the background, so that a signal runs the traps at once
