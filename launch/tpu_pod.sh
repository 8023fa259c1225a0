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

# printf %q keeps prompts with spaces and quotes intact through ssh.
gcloud "${gcloud_args[@]}" ssh "${target[@]}" \
  --command "cd ${repo_dir} && python3 -m mixtral_jax.sample $(printf '%q ' "$@")"
