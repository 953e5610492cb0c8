#!/bin/bash
# Train UDEAN with DeepSpeed: one task per GPU on every node, resumed from its checkpoint after
# every requeue. Submit from the repository root:
#
#   sbatch slurm/train_udean.sh                                   # --config recommended (shipped)
#   UDEAN_CONFIG=paper sbatch slurm/train_udean.sh train.out=runs/paper   # the paper as written
#   UDEAN_CONFIG=demo sbatch slurm/train_udean.sh train.lr=3e-4 train.out=runs/a
#   sbatch -N 4 -p gpu -A proj123 --time=24:00:00 slurm/train_udean.sh train.out=runs/big
#
# Arguments are passed to `udean train` (config overrides key.sub=value, or --config PATH|NAME).
# UDEAN_CONFIG picks the config when no --config is given (default recommended: the paper's sizes
# with the switches the shift benchmark keeps; README "Which config"). Preprocess with the same
# config (slurm/preprocess_hcp.sh has the same default): the source patches must carry the margin
# the model needs. Site variables: slurm/common.sh.
# Change --gpus-per-node and --ntasks-per-node together: one task per GPU.
#
# Node-local staging (docs/hpc.md): UDEAN_STAGE_DIR='$SLURM_TMPDIR' (quoted: expanded on each
# node) makes one task per node copy the shards there, checked by the manifest's sha256, before
# the first step; every task then reads its node's copy (train.stage_dir).
#
# Preemption: SLURM sends SIGUSR1 to this shell 120 s before the time limit (--signal=B:USR1@120),
# scancel/preemption send SIGTERM; both are forwarded to the tasks, which save a checkpoint and
# exit 75; this script then requeues the job, and the next run resumes where this one stopped.
#SBATCH --job-name=udean-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
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

stage_args=()
[[ -z "${UDEAN_STAGE_DIR:-}" ]] || stage_args=("train.stage_dir=$UDEAN_STAGE_DIR")

rc=0
udean_run udean train "${config_args[@]}" "${stage_args[@]}" "$@" || rc=$?
udean_finish "$rc"
