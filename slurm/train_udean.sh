#!/bin/bash
# Train UDEAN with DeepSpeed, resumed from its checkpoint after every requeue. No GPU is asked for
# by default, so the script runs on CPU-only partitions too; on GPUs ask for them, one task per GPU
# (--ntasks-per-node = --gpus-per-node). Submit from the repository root:
#
#   sbatch -N 2 --ntasks-per-node=4 --gpus-per-node=4 slurm/train_udean.sh    # GPUs, --config recommended
#   UDEAN_CONFIG=paper sbatch -N 2 --ntasks-per-node=4 --gpus-per-node=4 slurm/train_udean.sh train.out=runs/paper
#   sbatch -N 4 --ntasks-per-node=4 --gpus-per-node=4 -p gpu -A proj123 slurm/train_udean.sh train.out=runs/big
#   sbatch --cpus-per-task=16 slurm/train_udean.sh --config demo data.out=mine/data train.out=mine/run  # CPU
#
# Arguments are passed to `udean train` (config overrides key.sub=value, or --config PATH|NAME).
# UDEAN_CONFIG picks the config when no --config is given (default recommended: the paper's sizes
# with the switches the shift benchmark keeps; README "Which config"). Preprocess with the same
# config (slurm/preprocess_hcp.sh has the same default): the source patches must carry the margin
# the model needs. Site variables: slurm/common.sh.
#
# Node-local staging (docs/hpc.md): UDEAN_STAGE_DIR='$SLURM_TMPDIR' (quoted: expanded on each
# node) makes one task per node copy the shards there, checked by the manifest's sha256, before
# the first step; every task then reads its node's copy (train.stage_dir).
#
# Preemption: SLURM sends SIGUSR1 to this shell 120 s before the time limit (--signal=B:USR1@120),
# scancel/preemption send SIGTERM; both are forwarded to the tasks, which save a checkpoint and
# exit 75; this script then requeues the job, and the next run resumes where this one stopped.
#SBATCH --job-name=udean-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=udean-train-%j.out
set -eo pipefail
# sbatch runs a copy of this file from its spool folder: find common.sh from the submit folder
source "${UDEAN_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
udean_setup

config_args=()
[[ " $* " == *" --config "* || " $* " == *" --config="* ]] || config_args=(--config "${UDEAN_CONFIG:-recommended}")

if [[ -z "${SLURM_JOB_GPUS:-}" && "${SLURM_GPUS_ON_NODE:-0}" == 0 ]]; then
    udean_log "no GPU allocated: training on CPU, ${SLURM_NTASKS:-1} task(s) x ${SLURM_CPUS_PER_TASK:-1} CPUs" \
        "(GPUs: sbatch --gpus-per-node=N --ntasks-per-node=N)"
fi
stage_args=()
[[ -z "${UDEAN_STAGE_DIR:-}" ]] || stage_args=("train.stage_dir=$UDEAN_STAGE_DIR")

rc=0
udean_run udean train "${config_args[@]}" "${stage_args[@]}" "$@" || rc=$?
udean_finish "$rc"
