#!/usr/bin/env bash
# Run `dreamjax train` on every host of a Cloud TPU VM pod slice (JAX multi-controller: each host runs the
# same program; jax.distributed.initialize() reads the TPU environment).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/tiny.py gs://bucket/runs/tiny [--config.key=value ...]
#
# The repository must already be on every host at ~/dreamjax with `make install` done (e.g. via
# `gcloud compute tpus tpu-vm ssh --worker=all --command "git clone ... && cd dreamjax && make install"`).
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
EXTRA=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/dreamjax && DREAMJAX_DISTRIBUTED=1 .venv/bin/dreamjax train --config $CONFIG --workdir $WORKDIR --no-progress$EXTRA"
