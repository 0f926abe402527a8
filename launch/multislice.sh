#!/usr/bin/env bash
# Multi-slice training on Cloud TPU VMs without GKE: N slices of one type as a queued resource, joined over the
# data-centre network (DCN). The TPU runtime sets the MEGASCALE environment on every host, so
# jax.distributed.initialize() sees all slices; the preset `Nx<slice>` puts the batch over DCN ('data' across
# slices) and FSDP inside each slice (rule set `dcn_fsdp`).
#
#   launch/multislice.sh create NAME ZONE v5p-128 2            # once: ask for 2 slices
#   launch/multislice.sh train  NAME ZONE configs/dreamllm_7b.py:stage2 gs://bucket/runs/s2 [--config.key=value ...]
#
# `train` clones nothing: the repository must be at ~/dreamjax with `make install` done on every host, e.g.
# gcloud alpha compute tpus queued-resources ssh NAME --zone ZONE --node=all --worker=all \
#   --command "git clone https://github.com/.../dreamjax ~/dreamjax && make -C ~/dreamjax install"
set -euo pipefail
usage() { echo "usage: $0 create NAME ZONE TPU_TYPE NUM_SLICES | train NAME ZONE CONFIG WORKDIR [--config.key=value ...]" >&2; exit 2; }
[ $# -ge 5 ] || usage
ACTION=$1 NAME=$2 ZONE=$3
case "$ACTION" in
  create)
    TPU_TYPE=$4 NUM_SLICES=$5
    gcloud alpha compute tpus queued-resources create "$NAME" --zone "$ZONE" --accelerator-type "$TPU_TYPE" \
      --runtime-version "${RUNTIME_VERSION:-v2-alpha-tpuv5}" --node-count "$NUM_SLICES" --node-prefix "$NAME"
    ;;
  train)
    CONFIG=$4 WORKDIR=$5
    shift 5
    SLICES=$(gcloud alpha compute tpus queued-resources describe "$NAME" --zone "$ZONE" \
      --format='value(tpu.nodeSpec.len())' 2>/dev/null || echo "")
    TYPE=$(gcloud alpha compute tpus queued-resources describe "$NAME" --zone "$ZONE" \
      --format='value(tpu.nodeSpec[0].node.acceleratorType)')
    PRESET="--config.mesh.preset=${SLICES:-2}x${TYPE}"
    EXTRA=$(printf ' %q' "$PRESET" "$@")
    gcloud alpha compute tpus queued-resources ssh "$NAME" --zone "$ZONE" --node=all --worker=all --command \
      "cd ~/dreamjax && DREAMJAX_DISTRIBUTED=1 .venv/bin/dreamjax train --config $CONFIG --workdir $WORKDIR --no-progress$EXTRA"
    ;;
  *) usage ;;
esac
