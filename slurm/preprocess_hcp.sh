#!/bin/bash
# Preprocess all HCP subjects into HDF5 patch shards + manifest.json: one MPI job, rank 0 hands
# out subjects, every rank writes its own shards. Submit from the repository root:
#
#   UDEAN_DATA_ROOT=/data/HCP_1200 UDEAN_DATA=/scratch/$USER/udean-data sbatch slurm/preprocess_hcp.sh
#   sbatch -N 4 slurm/preprocess_hcp.sh data.mode=misaligned      # trailing args: config overrides
#   UDEAN_CONFIG=demo sbatch -N 1 --ntasks-per-node=8 slurm/preprocess_hcp.sh --hr hr --lr lr --out mine/data
#                                   # your own scans: every `udean preprocess` flag passes through
#                                   # (--hr --lr --val-hr --val-lr --test-hr --test-lr --dataset
#                                   # --voxel-size --register; README "Your own data")
#
#   UDEAN_DATA_ROOT  HCP root (subject folders), default: data.root of the config
#   UDEAN_DATA       output folder (manifest.json, shards/), default: data.out of the config
#   UDEAN_CONFIG     config file, or a shipped config: recommended|paper|demo|tiny (default
#                    recommended, as slurm/train_udean.sh: train with the config you preprocessed with)
# A rerun (or a requeue after preemption) skips subjects whose shards verify and redoes the rest.
# MPI: UDEAN_MPI_LAUNCH=srun (default; set UDEAN_SRUN_MPI to the site's PMI, e.g. pmix) or mpirun.
# Site variables: slurm/common.sh.
#SBATCH --job-name=udean-preprocess
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=32
#SBATCH --cpus-per-task=1
#SBATCH --time=06:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=udean-preprocess-%j.out
set -eo pipefail
source "${UDEAN_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
udean_setup
UDEAN_NEEDS_MPI=1  # the ranks must form one MPI world (udean_srun_mpi)

args=(--config "${UDEAN_CONFIG:-recommended}" --no-progress)
[[ -n "${UDEAN_DATA_ROOT:-}" ]] && args+=(--data-root "$UDEAN_DATA_ROOT")
[[ -n "${UDEAN_DATA:-}" ]] && args+=(--out "$UDEAN_DATA")

rc=0
udean_run udean preprocess "${args[@]}" "$@" || rc=$?
udean_finish "$rc"
