#!/bin/bash
# Verify the shards of a preprocessing output against its manifest and regenerate the missing
# or corrupt ones (same config, same bytes), under MPI. Submit from the repository root:
#
#   UDEAN_DATA=/scratch/$USER/udean-data sbatch slurm/regenerate_shards.sh
#
# As an array job, one shard group per array task (UDEAN_GROUPS, default "source target val
# test"); %1 runs them one after another, since each task rewrites the one manifest:
#
#   UDEAN_DATA=... sbatch --array=0-3%1 slurm/regenerate_shards.sh
#
# Exit 0 when every shard verifies at the end. Site variables: slurm/common.sh.
#SBATCH --job-name=udean-regenerate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=16
#SBATCH --cpus-per-task=1
#SBATCH --time=02:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=udean-regenerate-%A_%a.out
set -eo pipefail
source "${UDEAN_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
udean_setup
UDEAN_NEEDS_MPI=1  # the ranks must form one MPI world (udean_srun_mpi)

out=${1:-${UDEAN_DATA:?set UDEAN_DATA (or pass the output folder as the first argument)}}
group_args=()
if [[ -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    read -r -a groups <<< "${UDEAN_GROUPS:-source target val test}"
    group=${groups[$SLURM_ARRAY_TASK_ID]:?array index $SLURM_ARRAY_TASK_ID has no group in UDEAN_GROUPS}
    group_args=(--group "$group")
    udean_log "array task $SLURM_ARRAY_TASK_ID: group $group"
fi

rc=0
udean shards verify "$out" "${group_args[@]}" || rc=$?
if (( rc == 0 )); then
    udean_log "all shards verify: nothing to regenerate"
    exit 0
fi
rc=0
udean_run udean shards regenerate "$out" --no-progress "${group_args[@]}" || rc=$?
(( rc == 0 )) || udean_finish "$rc"
udean shards verify "$out" "${group_args[@]}"
