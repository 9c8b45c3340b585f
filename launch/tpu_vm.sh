#!/usr/bin/env bash
# Run a tunejax job on every worker of a Cloud TPU VM (pod slice).
#
#   launch/tpu_vm.sh create NAME ZONE ACCELERATOR [VERSION]   # e.g. v5litepod-16
#   launch/tpu_vm.sh setup  NAME ZONE                         # copy repo + install
#   launch/tpu_vm.sh run    NAME ZONE -- --config=configs/llama3_8b_tpu.py --workdir=gs://...
#   launch/tpu_vm.sh ssh    NAME ZONE [WORKER]
#   launch/tpu_vm.sh delete NAME ZONE
#
# Every worker runs the same command; `--distributed` makes each call
# jax.distributed.initialize(), which discovers the slice's coordinator.
# Check that a config fits before a long run: the same `run` with
# `--config.task=compile` compiles the step on the slice and prints the
# per-chip peak against the chip's memory (WORKDIR/compile.json).
set -euo pipefail
cmd=${1:?command}; name=${2:?tpu name}; zone=${3:?zone}; shift 3 || true
remote_dir='~/tunejax'
tpu() { gcloud compute tpus tpu-vm "$@" --zone="$zone"; }
case "$cmd" in
  create)
    accel=${1:?accelerator type}; version=${2:-tpu-ubuntu2204-base}
    tpu create "$name" --accelerator-type="$accel" --version="$version" ;;
  setup)
    tar czf /tmp/tunejax_src.tgz --exclude=.git --exclude='*.egg-info' .
    tpu scp /tmp/tunejax_src.tgz "$name":/tmp/ --worker=all
    tpu ssh "$name" --worker=all --command="mkdir -p $remote_dir && \
      tar xzf /tmp/tunejax_src.tgz -C $remote_dir && cd $remote_dir && \
      python3 -m pip install -q -e . 'jax[tpu]==0.10.2'" ;;
  run)
    [[ "${1:-}" == "--" ]] && shift
    args=$(printf ' %q' "$@")
    tpu ssh "$name" --worker=all --command="cd $remote_dir && \
      python3 -m tunejax.main --distributed $args" ;;
  ssh) tpu ssh "$name" --worker="${1:-0}" ;;
  delete) tpu delete "$name" --quiet ;;
  *) echo "unknown command: $cmd" >&2; exit 2 ;;
esac
