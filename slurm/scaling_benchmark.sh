#!/bin/bash
# Training scaling benchmark: one job per node count, each measuring one point with the real
# UDEAN step (benchmarks/scaling.py train), one task per GPU. From the repository root:
#
#   UDEAN_DATA=/scratch/$USER/udean-data bash slurm/scaling_benchmark.sh 1 2 4 8 [-- BENCH ARGS]
#
# run with bash (not sbatch) it submits one job per node count (sbatch -N n, the rest of the
# options from the #SBATCH lines below or the command line of sbatch via SBATCH_* variables);
# when every job is done, `python benchmarks/scaling.py report` merges the points (give it the
# same `--config` for the projection's gradient bytes: its default is paper).
# Submitted directly (`sbatch -N 4 slurm/scaling_benchmark.sh`) it measures one point.
#
#   UDEAN_DATA         preprocessed data (holds manifest.json), required
#   UDEAN_CONFIG       model/train config, default recommended (as slurm/train_udean.sh); paper: the
#                      paper as written (the data in UDEAN_DATA must be preprocessed with the same one)
#   UDEAN_BENCH_MODE   weak (fixed per-GPU batch, default) or strong (fixed global batch)
#   UDEAN_BENCH_OUT    results folder, default benchmarks/results
# Site variables: slurm/common.sh.
#SBATCH --job-name=udean-scaling
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=00:30:00
#SBATCH --exclusive
#SBATCH --output=udean-scaling-%j.out
set -eo pipefail

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    counts=()
    while (( $# )) && [[ "$1" != "--" ]]; do counts+=("$1"); shift; done
    [[ "${1:-}" == "--" ]] && shift
    (( ${#counts[@]} )) || { echo "usage: bash $0 NODES... [-- BENCH ARGS]" >&2; exit 2; }
    : "${UDEAN_DATA:?set UDEAN_DATA to the preprocessed data folder}"
    for n in "${counts[@]}"; do
        [[ "$n" =~ ^[0-9]+$ ]] || { echo "node count '$n' is not a number" >&2; exit 2; }
        sbatch --nodes="$n" --job-name="udean-scaling-n$n" "$0" "$@"
    done
    exit 0
fi

source "${UDEAN_REPO:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/slurm/common.sh"
udean_setup
: "${UDEAN_DATA:?set UDEAN_DATA to the preprocessed data folder}"

rc=0
udean_run python benchmarks/scaling.py train --data "$UDEAN_DATA" --config "${UDEAN_CONFIG:-recommended}" \
    --mode "${UDEAN_BENCH_MODE:-weak}" --out "${UDEAN_BENCH_OUT:-benchmarks/results}" "$@" || rc=$?
exit "$rc"
