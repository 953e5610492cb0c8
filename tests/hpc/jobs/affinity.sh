#!/bin/bash
# One task per node through slurm/common.sh's launcher, each writing its CPU affinity:
#   sbatch -N 2 --ntasks-per-node=1 --cpus-per-task=2 tests/hpc/jobs/affinity.sh OUT
#SBATCH --time=00:05:00
#SBATCH --output=affinity-%j.out
set -eo pipefail
source "${UDEAN_REPO:?}/slurm/common.sh"
udean_setup
rc=0
udean_run python tests/hpc/jobs/affinity.py "$1" || rc=$?
exit "$rc"
