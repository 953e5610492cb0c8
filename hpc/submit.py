"""`python -m hpc.submit {train,preprocess,regenerate,bench} ...`: the same jobs as slurm/*.sh,
submitted from Python with submitit (MAE/DINO style: this file only describes resources and
calls the same command line the shell scripts run).

    python -m hpc.submit preprocess --nodes 2 --tasks-per-node 32 --time 6:00:00 \\
        -- --data-root /data/HCP_1200 --out /scratch/udean-data
    python -m hpc.submit train --nodes 2 --gpus-per-node 4 --partition gpu --time 24:00:00 \\
        -- data.out=/scratch/udean-data train.out=runs/udean
    python -m hpc.submit train --nodes 2 --gpus-per-node 4 \\
        -- --config paper data.out=/scratch/udean-data-paper train.out=runs/paper   # preprocessed with paper too
    python -m hpc.submit regenerate --tasks-per-node 16 -- /scratch/udean-data
    python -m hpc.submit bench --nodes 4 --gpus-per-node 4 -- benchmarks/scaling.py --out x.json
    python -m hpc.submit train --local --tasks-per-node 2 -- --config tiny

Everything after `--` goes to the command (`udean train`, `udean preprocess`, `udean shards
regenerate`, or a Python script for `bench`); without --config, `udean` uses the shipped
`recommended` config (README "Which config"; `--config paper`: the paper as written).
`python -m hpc.submit COMMAND --help` lists the resources of that job with their defaults
(train and bench: 4 GPUs and 8 CPUs per task, as slurm/train_udean.sh; pass --gpus-per-node 0
for a CPU job).

Each task runs the command as a child process (`python -m udean ...`: hpc imports nothing from
udean or preprocessing, STYLE.md) and forwards SIGUSR1/SIGTERM/SIGINT to it, so the preemption
handler of `udean train` (hpc.signals) is the one that acts on the signal; the child's exit
code is the task's.

Preemption and time-out. The job gets SIGUSR1 `--signal-delay-s` seconds before its time limit
(submitit's signal is set to USR1 here, the same as slurm/*.sh) and SIGTERM on preemption. A
command that saves a checkpoint and exits with REQUEUE_EXIT_CODE (75) is requeued through
submitit (`UdeanJob.checkpoint` returns the same call; `udean train` resumes from train.out by
itself). Commands that do not handle signals (preprocess, regenerate) get submitit's handler:
checkpoint() then requeue at once; they resume by skipping finished shards.

CPUs. srun no longer inherits --cpus-per-task from the allocation (SLURM 22.05), and submitit
writes its srun line without it: the job passes --cpus-per-task to sbatch and to srun, so a
task bound to cores gets all of its CPUs, not one.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from hpc import env as launch
from hpc.signals import REQUEUE_EXIT_CODE

# submitit reads this when imported (client: sbatch --signal; job: which signal it handles)
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")

COMMANDS = {
    "train": ["train"],
    "preprocess": ["preprocess"],
    "regenerate": ["shards", "regenerate"],
    "bench": None,  # a Python script: bench -- benchmarks/scaling.py ARGS
}
HELP = {
    "train": "udean train: DeepSpeed training, one task per GPU; checkpoints and requeues on SIGUSR1/SIGTERM",
    "preprocess": "udean preprocess: NIfTI -> HDF5 shards over MPI ranks; a requeue skips finished subjects",
    "regenerate": "udean shards regenerate: redo missing or corrupt shards over MPI ranks",
    "bench": "a benchmark script (-- benchmarks/SCRIPT.py ARGS), one task per GPU",
}
# per job, as the sbatch scripts ask (slurm/train_udean.sh, preprocess_hcp.sh, regenerate_shards.sh)
DEFAULTS = {
    "train": {"gpus_per_node": 4, "cpus_per_task": 8},
    "bench": {"gpus_per_node": 4, "cpus_per_task": 8},
    "preprocess": {"gpus_per_node": 0, "cpus_per_task": 1},
    "regenerate": {"gpus_per_node": 0, "cpus_per_task": 1},
}
MPI_COMMANDS = ("preprocess", "regenerate")  # mpi4py inside: under srun they need the site's PMI
SELF_CHECKPOINTING = ("train", "bench")  # handle SIGUSR1/SIGTERM themselves (hpc.signals) and exit 75
FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def parse_time(text: str) -> int:
    """SLURM time formats -> whole minutes: 'M', 'M:S', 'H:M:S', 'D-H', 'D-H:M', 'D-H:M:S'."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise ValueError(f"--time {text!r}: use minutes or [D-]HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        secs = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        secs = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        secs = a * 60 + b
    else:
        secs = a * 60
    if secs <= 0:
        raise ValueError(f"--time {text!r}: must be positive")
    return -(-secs // 60)


class UdeanJob:
    """The callable submitit runs in every task: one command line, run as a child process.

    Checkpointable (it has `checkpoint`): on requeue the same call is resubmitted; the command
    finds its own checkpoint (train.out, the manifest), so no state travels in the pickle except
    the requeue count.
    """

    def __init__(self, command: str, args: Sequence[str], mpi_launch: str = "srun", max_requeues: int = 50,
                 mpi_ntasks: int = 1):
        if command not in COMMANDS:
            raise ValueError(f"command {command!r}: allowed values are {', '.join(COMMANDS)}")
        self.command = command
        self.args = list(args)
        self.mpi_launch = mpi_launch
        self.max_requeues = max_requeues
        self.mpi_ntasks = mpi_ntasks  # ranks mpirun starts (mpi_launch == "mpirun")
        self.requeues = 0

    def argv(self) -> list[str]:
        if self.command == "bench":
            if not self.args:
                raise ValueError("bench needs a script: hpc.submit bench ... -- benchmarks/SCRIPT.py ARGS")
            return list(self.args)
        return [*COMMANDS[self.command], *self.args]

    def command_line(self) -> list[str]:
        """What one task runs: `python -m udean ARGS`, or `python SCRIPT ARGS` for bench."""
        argv = self.argv()
        if self.command == "bench":
            if not Path(argv[0]).is_file():
                raise FileNotFoundError(f"bench script {argv[0]!r} not found (run from the repository root)")
            return [sys.executable, *argv]
        return [sys.executable, "-m", "udean", *argv]

    def __call__(self) -> int:
        import submitit

        job = submitit.JobEnvironment()
        self._prepare_environment(job)
        if self.command in MPI_COMMANDS and self.mpi_launch == "mpirun":
            rc = self._run_mpirun(job)
        else:
            # preprocess/regenerate keep submitit's handler (requeue at once); train/bench checkpoint first
            rc = run_child(self.command_line(), FORWARDED_SIGNALS if self.command in SELF_CHECKPOINTING else ())
        if rc == REQUEUE_EXIT_CODE:
            self._requeue(job)
        if rc != 0:
            raise RuntimeError(f"{' '.join(self.argv())} exited with code {rc}")
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Resubmit the same call (submitit calls this on the signal, or `_requeue` does)."""
        from submitit.helpers import DelayedSubmission

        if self.requeues >= self.max_requeues:
            return None  # submitit then ends the job with "checkpoint function returned None"
        self.requeues += 1
        return DelayedSubmission(self, *args, **kwargs)

    # --- inside the job -------------------------------------------------------------------
    def _prepare_environment(self, job: Any) -> None:
        if job.cluster == "local":
            # LocalExecutor tasks carry only SUBMITIT_LOCAL_* variables: say it in torch's words
            launch.export(launch.LaunchEnv(
                "single" if job.num_tasks == 1 else "torchrun", job.global_rank, job.num_tasks,
                job.local_rank, job.num_tasks // max(job.num_nodes, 1), "127.0.0.1",
                launch.slurm_port(job.job_id)))
        else:
            # an srun task: RANK/MASTER_* leaked from the submitting shell would win over SLURM_*
            for key in TORCH_VARS:
                if key != "MASTER_PORT":
                    os.environ.pop(key, None)

    def _run_mpirun(self, job: Any) -> int:
        """UDEAN_MPI_LAUNCH=mpirun: one submitit task per job starts the MPI world itself."""
        if job.global_rank != 0:
            return 0
        cmd = ["mpirun", "-n", str(self.mpi_ntasks), *shlex.split(os.environ.get("UDEAN_MPIRUN_ARGS", "")),
               *self.command_line()]
        print("hpc.submit: " + " ".join(cmd), flush=True)
        return subprocess.call(cmd)

    def _requeue(self, job: Any) -> None:
        """The command checkpointed and asks to run again: requeue through submitit."""
        if job.global_rank != 0:
            if job.cluster == "local":
                return  # the local controller waits for every task, then requeues
            # rank 0 requeues the whole job, which ends this task too; returning would leave a
            # "success" result file that makes the client think this task is done
            time.sleep(300)
            return
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import DelayedSubmission

        delayed = DelayedSubmission.load(job.paths.submitted_pickle)
        # submitit's own handler: checkpoint() -> dump the resubmission -> scontrol requeue -> exit
        SignalHandler(job, job.paths, delayed).checkpoint_and_try_requeue(signal.SIGUSR1)


def run_child(cmd: list[str], forward: Sequence[int] = ()) -> int:
    """Run `cmd`, passing the signals in `forward` on to it while it runs; its exit code
    (128 + N when signal N ended it). A signal that arrives before the child exists is sent
    as soon as it does."""
    child: subprocess.Popen | None = None
    pending: list[int] = []

    def relay(signum: int, frame: Any) -> None:
        if child is None:
            pending.append(signum)
        else:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, relay) for sig in forward}
    try:
        child = subprocess.Popen(cmd)
        for signum in pending:
            child.send_signal(signum)
        rc = child.wait()  # retried after each relayed signal (PEP 475)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - rc if rc < 0 else rc


# ----------------------------------------------------------------------------- client side

class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' unless the help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpc.submit",
        description="Submit a UDEAN job to SLURM with submitit (or run it locally with --local); "
                    "requeues itself after preemption or time-out. `python -m hpc.submit COMMAND --help`: "
                    "the resources of one job and their defaults.",
        epilog="arguments after -- go to the command, e.g. -- --config demo train.lr=3e-4",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, text in HELP.items():
        _add_job_options(sub.add_parser(
            command, help=text, description=text, formatter_class=_DefaultsShown,
            epilog="arguments after -- go to the command" + (
                ", e.g. -- benchmarks/scaling.py train --data DIR" if command == "bench" else
                ", e.g. -- train.out=runs/a (no --config: recommended)" if command == "train" else "")),
            command)
    return p


def _add_job_options(p: argparse.ArgumentParser, command: str) -> None:
    gpu_job = command in ("train", "bench")
    d = DEFAULTS[command]
    p.add_argument("--nodes", type=int, default=1, help="nodes")
    p.add_argument("--gpus-per-node", type=int, default=d["gpus_per_node"],
                   help="GPUs per node" + (" (as slurm/train_udean.sh); 0 for a CPU job" if gpu_job else ""))
    if gpu_job:
        p.add_argument("--tasks-per-node", type=int, default=None,
                       help="tasks per node (default: one per GPU, 1 with --gpus-per-node 0)")
    else:
        p.add_argument("--tasks-per-node", type=int, default=1, help="MPI ranks per node")
    p.add_argument("--cpus-per-task", type=int, default=d["cpus_per_task"],
                   help="CPUs per task, given to sbatch and srun (loader workers and threads run in them)")
    p.add_argument("--mem-gb", type=float, default=None, help="memory per node (default: the partition's)")
    p.add_argument("--partition", default=os.environ.get("SBATCH_PARTITION"), help="(default: $SBATCH_PARTITION, now %(default)s)")
    p.add_argument("--account", default=os.environ.get("SBATCH_ACCOUNT"), help="(default: $SBATCH_ACCOUNT, now %(default)s)")
    p.add_argument("--qos", default=os.environ.get("SBATCH_QOS"), help="(default: $SBATCH_QOS, now %(default)s)")
    p.add_argument("--constraint", default=None, help="sbatch --constraint (node features)")
    p.add_argument("--time", default="60", help="time limit: minutes or [D-]HH:MM:SS")
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="SIGUSR1 this many seconds before the time limit (checkpoint window)")
    p.add_argument("--max-requeues", type=int, default=int(os.environ.get("UDEAN_MAX_REQUEUES", 50)),
                   help="stop requeueing after this many restarts ($UDEAN_MAX_REQUEUES)")
    p.add_argument("--job-dir", default="runs/submitit/%j", help="submitit folder: pickles and logs (%%j: job id)")
    p.add_argument("--name", default=f"udean-{command}", help="job name")
    if command in MPI_COMMANDS:
        p.add_argument("--mpi-launch", choices=("srun", "mpirun"), default=os.environ.get("UDEAN_MPI_LAUNCH", "srun"),
                       help="MPI through srun tasks (set --srun-mpi) or one task running mpirun ($UDEAN_MPI_LAUNCH)")
        p.add_argument("--srun-mpi", default=os.environ.get("UDEAN_SRUN_MPI"),
                       help="srun --mpi=VALUE: pmix, pmi2 (default: $UDEAN_SRUN_MPI, now %(default)s; unset: the site's MpiDefault)")
    p.add_argument("--setup", action="append", default=[], help="shell line run before the job (module load ...)")
    p.add_argument("--local", action="store_true", help="run with submitit's LocalExecutor on this machine")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")


def make_executor(a: argparse.Namespace) -> Any:
    import submitit

    if not a.local and not _has_sbatch():
        raise ValueError("no sbatch on PATH: submit from a SLURM login node, or run with --local")
    kwargs = {} if a.local else {"slurm_max_num_timeout": a.max_requeues}
    executor = submitit.AutoExecutor(folder=a.job_dir, cluster="local" if a.local else "slurm", **kwargs)
    tasks = a.tasks_per_node or (max(a.gpus_per_node, 1) if a.command in ("train", "bench") else 1)
    mpirun_inside = a.command in MPI_COMMANDS and a.mpi_launch == "mpirun"
    if a.cpus_per_task < 1:
        raise ValueError(f"--cpus-per-task {a.cpus_per_task}: must be at least 1")
    params: dict[str, Any] = dict(
        name=a.name,
        timeout_min=parse_time(a.time),
        nodes=a.nodes,
        tasks_per_node=1 if (mpirun_inside and a.local) else tasks,
        gpus_per_node=a.gpus_per_node,
        cpus_per_task=a.cpus_per_task,
    )
    if a.mem_gb:
        params["mem_gb"] = a.mem_gb
    if a.local:
        if a.nodes != 1:
            raise ValueError("--local runs on this machine: --nodes must be 1")
    else:
        # srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05), and submitit's srun line lacks it
        srun_args = [f"--cpus-per-task={a.cpus_per_task}"]
        if a.command in MPI_COMMANDS and a.srun_mpi:
            srun_args.append(f"--mpi={a.srun_mpi}")
        extra: dict[str, Any] = {"requeue": True}
        params.update(
            slurm_partition=a.partition, slurm_account=a.account, slurm_qos=a.qos, slurm_constraint=a.constraint,
            slurm_signal_delay_s=a.signal_delay_s,
            slurm_srun_args=srun_args, slurm_setup=list(a.setup), slurm_additional_parameters=extra,
        )
        if mpirun_inside:
            # the job function runs once, in the batch shell, and mpirun starts every rank of the
            # allocation itself (srun would start one copy per task)
            params["slurm_use_srun"] = False
        params = {k: v for k, v in params.items() if v is not None}
    executor.update_parameters(**params)
    return executor, a.nodes * tasks


def _has_sbatch() -> bool:
    from shutil import which

    return which("sbatch") is not None


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    ours, rest = split_argv(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(ours)
    try:
        executor, ntasks = make_executor(a)
        job_fn = UdeanJob(a.command, rest, mpi_launch=getattr(a, "mpi_launch", "srun"), max_requeues=a.max_requeues,
                          mpi_ntasks=ntasks)
        job_fn.command_line()  # fail here, not in the queue
    except (ValueError, FileNotFoundError) as exc:
        print(f"hpc.submit: error: {exc}", file=sys.stderr)
        return 2
    job = executor.submit(job_fn)
    print(f"submitted {a.command} job {job.job_id}: logs in {job.paths.folder} "
          f"({Path(job.paths.stdout).name}, {Path(job.paths.stderr).name})", flush=True)
    if not a.wait:
        return 0
    try:
        job.results()
    except Exception as exc:  # submitit re-raises the job's failure here
        print(f"hpc.submit: job {job.job_id} failed: {exc}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} done", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
