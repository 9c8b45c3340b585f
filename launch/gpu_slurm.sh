#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per GPU.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/gpu_slurm.sh \
#       --config=configs/llama3_8b_tpu.py --workdir=/shared/runs/x
#
#SBATCH --job-name=tunejax
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
set -euo pipefail
# jax.distributed.initialize() detects SLURM (coordinator = first node,
# process id = SLURM_PROCID, count = SLURM_NTASKS), so `--distributed` is all
# each task needs.
srun --kill-on-bad-exit=1 python -m tunejax.main --distributed "$@"
