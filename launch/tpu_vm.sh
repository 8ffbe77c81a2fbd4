#!/usr/bin/env bash
# Run a jaxalign job on every worker of a Cloud TPU VM (one host or a pod slice).
#
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a launch/tpu_vm.sh -- \
#       --config=configs/llama3_8b.py:pod --config.workdir=gs://bucket/runs/llama3_8b
#
# Steps: (1) pack this checkout (working tree, without .git, runs/ and virtualenvs), (2) copy it to every worker,
# (3) unpack it and `pip install -e . jax[tpu]` there, (4) run `python3 -m jaxalign.main ARGS` on all workers at
# once (--worker=all). JAX finds the other workers through the TPU metadata server, so no variables are passed.
# Re-running the same command resumes from the workdir's latest checkpoint (use a gs:// workdir: workers do not
# share a disk). A maintenance event's SIGTERM makes every worker save at the same step and exit 0.
#
# Environment:
#   TPU_NAME, ZONE   required: the TPU VM and its zone
#   PROJECT          GCP project (default: gcloud's configured one)
#   REMOTE_DIR       directory under each worker's home (default: jaxalign)
#   PYTHON           interpreter on the workers (default: python3)
#   SKIP_INSTALL=1   skip steps 1-3 (code already installed)
#   DRY_RUN=1 or -n  print the commands, one per line, instead of running them
set -euo pipefail

usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

# Prints a command so that a shell reads it back as the same words.
quote() {
  local out=() w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=("$w")
    else
      out+=("'${w//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    quote "$@"
  else
    "$@"
  fi
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n | --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || { echo "tpu_vm.sh: give the jaxalign.main arguments after --" >&2; usage; }
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
REMOTE_DIR=${REMOTE_DIR:-jaxalign}
PYTHON=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARBALL=${TMPDIR:-/tmp}/jaxalign-${TPU_NAME}.tar.gz

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--worker=all "--zone=${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then
  WHERE+=("--project=${PROJECT}")
fi

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  run tar -C "$ROOT" -czf "$TARBALL" --exclude-vcs --exclude=./runs --exclude=./.venv --exclude=__pycache__ .
  run "${GCLOUD[@]}" scp "$TARBALL" "${TPU_NAME}:${REMOTE_DIR}.tar.gz" "${WHERE[@]}"
  install="mkdir -p $(quote "$REMOTE_DIR") && tar -xzf $(quote "${REMOTE_DIR}.tar.gz") -C $(quote "$REMOTE_DIR")"
  install+=" && cd $(quote "$REMOTE_DIR") && $(quote "$PYTHON") -m pip install -q -e . 'jax[tpu]'"
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" "--command=${install}"
fi
job="cd $(quote "$REMOTE_DIR") && $(quote "$PYTHON" -m jaxalign.main "$@")"
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${WHERE[@]}" "--command=${job}"
