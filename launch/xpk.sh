#!/usr/bin/env bash
# Run `dreamjax train` as an xpk workload on a GKE TPU cluster (one or more slices; xpk sets the TPU and, for
# several slices, the MEGASCALE environment that jax.distributed.initialize() reads).
#
#   launch/xpk.sh CLUSTER WORKLOAD v5p-128 1 configs/dreamllm_7b.py:stage2 gs://bucket/runs/s2 [--config.key=value ...]
#   launch/xpk.sh CLUSTER WORKLOAD v5p-128 2 configs/dreamllm_7b.py:stage2 gs://bucket/runs/s2 --config.mesh.preset=2xv5p-128
#
# The image is built by xpk from this directory (--base-docker-image + --script-dir); set DOCKER_IMAGE to run a
# prebuilt one instead. Needs `xpk` (pip install xpk) and a cluster made with `xpk cluster create`.
set -euo pipefail
if [ $# -lt 6 ]; then
  echo "usage: $0 CLUSTER WORKLOAD TPU_TYPE NUM_SLICES CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
CLUSTER=$1 WORKLOAD=$2 TPU_TYPE=$3 NUM_SLICES=$4 CONFIG=$5 WORKDIR=$6
shift 6
EXTRA=$(printf ' %q' "$@")
COMMAND="make install && DREAMJAX_DISTRIBUTED=1 .venv/bin/dreamjax train --config $CONFIG --workdir $WORKDIR --no-progress$EXTRA"
if [ -n "${DOCKER_IMAGE:-}" ]; then
  IMAGE_FLAGS=(--docker-image "$DOCKER_IMAGE")
else
  IMAGE_FLAGS=(--base-docker-image python:3.11-slim --script-dir "$(cd "$(dirname "$0")/.." && pwd)")
fi
xpk workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --tpu-type "$TPU_TYPE" \
  --num-slices "$NUM_SLICES" "${IMAGE_FLAGS[@]}" --command "$COMMAND"
