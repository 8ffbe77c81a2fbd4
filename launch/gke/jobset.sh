#!/usr/bin/env bash
# Run a jaxalign job on GKE TPU slices as a JobSet (one pod per TPU host), or print/run the equivalent XPK command.
#
#   IMAGE=us-docker.pkg.dev/proj/repo/jaxalign:v1 launch/gke/jobset.sh -- \
#       --config=configs/llama3_8b.py:pod --config.workdir=gs://bucket/runs/llama3_8b
#   IMAGE=... CLUSTER=my-cluster launch/gke/jobset.sh --xpk -- --config=... --config.workdir=gs://...
#
# The first renders the manifest (launch/gke/jobset.yaml is its rendering for the defaults below) and pipes it to
# `kubectl apply -f -`; the second runs `xpk workload create` with the same image, slices and command. IMAGE is an
# image with this repository installed (`pip install -e . 'jax[tpu]'`) as its working directory.
# GKE's TPU webhook gives every pod TPU_WORKER_ID and TPU_WORKER_HOSTNAMES, from which JAX's own GKE detection
# starts the distributed runtime; with NUM_SLICES > 1 the pods also get the MEGASCALE_* variables that join the
# slices over the data-center network (process ids run slice by slice; put the `data` mesh axis over slices).
# Kubernetes sends SIGTERM on preemption or eviction: every process saves at the same step and exits 0, within
# terminationGracePeriodSeconds. JobSet restarts the whole set (up to MAX_RESTARTS) and the run resumes.
#
# Environment:
#   IMAGE              required: the container image
#   JOB_NAME           JobSet / workload name (default: jaxalign)
#   TPU_ACCELERATOR    GKE accelerator label (default: tpu-v5p-slice)
#   TPU_TOPOLOGY       chips per slice as a topology (default: 4x4x4, 64 chips, a v5p-128)
#   CHIPS_PER_HOST     TPU chips per host / pod (default: 4)
#   NUM_SLICES         slices (default: 1)
#   MAX_RESTARTS       JobSet restarts after a failure or preemption (default: 3)
#   TPU_TYPE           XPK's name of the slice (default: v5p-128); CLUSTER (required with --xpk), PROJECT, ZONE
#   DRY_RUN=1 or -n    print the manifest and the command instead of running them
set -euo pipefail

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

XPK=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n | --dry-run) DRY_RUN=1; shift ;;
    --xpk) XPK=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "jobset.sh: give the jaxalign.main arguments after --" >&2
  exit 2
fi
: "${IMAGE:?set IMAGE to a container image with jaxalign installed}"
JOB_NAME=${JOB_NAME:-jaxalign}
TPU_ACCELERATOR=${TPU_ACCELERATOR:-tpu-v5p-slice}
TPU_TOPOLOGY=${TPU_TOPOLOGY:-4x4x4}
CHIPS_PER_HOST=${CHIPS_PER_HOST:-4}
NUM_SLICES=${NUM_SLICES:-1}
MAX_RESTARTS=${MAX_RESTARTS:-3}
TPU_TYPE=${TPU_TYPE:-v5p-128}

chips=$((${TPU_TOPOLOGY//x/*}))
if ((chips % CHIPS_PER_HOST)); then
  echo "jobset.sh: TPU_TOPOLOGY=${TPU_TOPOLOGY} (${chips} chips) is not a multiple of CHIPS_PER_HOST=${CHIPS_PER_HOST}" >&2
  exit 2
fi
hosts=$((chips / CHIPS_PER_HOST))
command=(python -m jaxalign.main "$@")

if [[ "$XPK" == 1 ]]; then
  : "${CLUSTER:?set CLUSTER to the GKE cluster name for xpk}"
  cmd=(xpk workload create "--cluster=${CLUSTER}" "--workload=${JOB_NAME}" "--docker-image=${IMAGE}"
    "--tpu-type=${TPU_TYPE}" "--num-slices=${NUM_SLICES}" "--max-restarts=${MAX_RESTARTS}"
    "--command=$(quote "${command[@]}")")
  [[ -z "${PROJECT:-}" ]] || cmd+=("--project=${PROJECT}")
  [[ -z "${ZONE:-}" ]] || cmd+=("--zone=${ZONE}")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    quote "${cmd[@]}"
  else
    exec "${cmd[@]}"
  fi
  exit 0
fi

# The container command as a YAML flow list of single-quoted strings.
args_yaml=""
for w in "${command[@]}"; do
  args_yaml+="${args_yaml:+, }'${w//\'/\'\'}'"
done

megascale=""
if ((NUM_SLICES > 1)); then
  # JobSet names pod <jobset>-<replicated job>-<job index>-<pod index> in the subdomain <jobset>: the first
  # host of slice 0 coordinates.
  megascale="
                    - name: MEGASCALE_NUM_SLICES
                      value: '${NUM_SLICES}'
                    - name: MEGASCALE_SLICE_ID
                      valueFrom:
                        fieldRef:
                          fieldPath: metadata.labels['jobset.sigs.k8s.io/job-index']
                    - name: MEGASCALE_COORDINATOR_ADDRESS
                      value: '${JOB_NAME}-slice-0-0.${JOB_NAME}'"
fi

manifest="apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: ${JOB_NAME}
  annotations:
    # One slice (replicated job) per TPU node pool.
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: ${MAX_RESTARTS}
  replicatedJobs:
    - name: slice
      replicas: ${NUM_SLICES}
      template:
        spec:
          parallelism: ${hosts}
          completions: ${hosts}
          backoffLimit: 0
          template:
            spec:
              restartPolicy: Never
              # Time for the preemption save after SIGTERM.
              terminationGracePeriodSeconds: 600
              nodeSelector:
                cloud.google.com/gke-tpu-accelerator: ${TPU_ACCELERATOR}
                cloud.google.com/gke-tpu-topology: ${TPU_TOPOLOGY}
              containers:
                - name: jaxalign
                  image: ${IMAGE}
                  command: [${args_yaml}]
                  ports:
                    - containerPort: 8471
                    - containerPort: 8080
                    - containerPort: 8476
                  env:
                    - name: PYTHONUNBUFFERED
                      value: '1'${megascale}
                  resources:
                    limits:
                      google.com/tpu: ${CHIPS_PER_HOST}"

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "$manifest"
  echo "---"
  echo "# kubectl apply -f -"
else
  kubectl apply -f - <<<"$manifest"
fi
