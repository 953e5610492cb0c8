"""`python -m hpc.submit {train,preprocess,regenerate,bench} ...`: the same jobs as slurm/*.sh,
submitted from Python with submitit (MAE/DINO style: this file only describes resources and
calls the same command line the shell scripts run).

    python -m hpc.submit train --nodes 2 --gpus-per-node 4 --partition gpu --time 24:00:00 \\
        -- --config configs/paper.yaml train.out=runs/paper
    python -m hpc.submit preprocess --nodes 2 --tasks-per-node 32 --time 6:00:00 \\
        -- --config configs/paper.yaml --data-root /data/HCP_1200 --out /scratch/udean-data
    python -m hpc.submit regenerate --tasks-per-node 16 -- /scratch/udean-data
    python -m hpc.submit bench --nodes 4 --gpus-per-node 4 -- benchmarks/scaling.py --out x.json
    python -m hpc.submit train --local --tasks-per-node 2 -- --config configs/tiny.yaml

Everything after `--` goes to the command (`udean train`, `udean preprocess`, `udean shards
regenerate`, or a Python script for `bench`). Each task runs it in-process, so the preemption
handler of `udean train` (hpc.signals) is the one that receives the signal.

Preemption and time-out. The job gets SIGUSR1 `--signal-delay-s` seconds before its time limit
(submitit's signal is set to USR1 here, the same as slurm/*.sh) and SIGTERM on preemption. A
command that saves a checkpoint and exits with REQUEUE_EXIT_CODE (75) is requeued through
submitit (`UdeanJob.checkpoint` returns the same call; `udean train` resumes from train.out by
itself). Commands that do not handle signals (preprocess, regenerate) get submitit's handler:
checkpoint() then requeue at once; they resume by skipping finished shards.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import runpy
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
MPI_COMMANDS = ("preprocess", "regenerate")  # mpi4py inside: under srun they need the site's PMI
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
    """The callable submitit runs in every task: one command line, run in-process.

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

    def __call__(self) -> int:
        import submitit

        job = submitit.JobEnvironment()
        self._prepare_environment(job)
        if self.command in MPI_COMMANDS and self.mpi_launch == "mpirun":
            rc = self._run_mpirun(job)
        else:
            rc = self._run_in_process()
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

    def _run_in_process(self) -> int:
        argv = self.argv()
        if self.command == "bench":
            return _run_script(argv)
        cli = importlib.import_module("udean.cli")  # by name: hpc is below udean (STYLE.md)
        return int(cli.main(argv) or 0)

    def _run_mpirun(self, job: Any) -> int:
        """UDEAN_MPI_LAUNCH=mpirun: one submitit task per job starts the MPI world itself."""
        if job.global_rank != 0:
            return 0
        cmd = ["mpirun", "-n", str(self.mpi_ntasks), *shlex.split(os.environ.get("UDEAN_MPIRUN_ARGS", "")),
               "udean", *self.argv()]
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


def _run_script(argv: list[str]) -> int:
    script = argv[0]
    if not Path(script).is_file():
        raise FileNotFoundError(f"bench script {script!r} not found (run from the repository root)")
    old_argv = sys.argv
    sys.argv = list(argv)
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = old_argv
    return 0


# ----------------------------------------------------------------------------- client side

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpc.submit",
        description="Submit a UDEAN job to SLURM with submitit (or run it locally with --local); "
                    "requeues itself after preemption or time-out.",
        epilog="arguments after -- go to the command, e.g. -- --config configs/demo.yaml train.lr=3e-4",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("command", choices=tuple(COMMANDS))
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="default: one per GPU for train/bench, 1 otherwise (CPU train: set it)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem-gb", type=float, default=None)
    p.add_argument("--partition", default=os.environ.get("SBATCH_PARTITION"))
    p.add_argument("--account", default=os.environ.get("SBATCH_ACCOUNT"))
    p.add_argument("--qos", default=os.environ.get("SBATCH_QOS"))
    p.add_argument("--constraint", default=None)
    p.add_argument("--time", default="60", help="time limit: minutes or [D-]HH:MM:SS")
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="SIGUSR1 this many seconds before the time limit (checkpoint window)")
    p.add_argument("--max-requeues", type=int, default=int(os.environ.get("UDEAN_MAX_REQUEUES", 50)))
    p.add_argument("--job-dir", default="runs/submitit/%j", help="submitit folder: pickles and logs (%%j: job id)")
    p.add_argument("--name", default=None, help="job name (default udean-COMMAND)")
    p.add_argument("--mpi-launch", choices=("srun", "mpirun"), default=os.environ.get("UDEAN_MPI_LAUNCH", "srun"),
                   help="preprocess/regenerate: MPI through srun tasks (set --srun-mpi) or one task running mpirun")
    p.add_argument("--srun-mpi", default=os.environ.get("UDEAN_SRUN_MPI"), help="srun --mpi=VALUE (pmix, pmi2)")
    p.add_argument("--setup", action="append", default=[], help="shell line run before the job (module load ...)")
    p.add_argument("--local", action="store_true", help="run with submitit's LocalExecutor on this machine")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit with its status")
    return p


def make_executor(a: argparse.Namespace) -> Any:
    import submitit

    if not a.local and not _has_sbatch():
        raise ValueError("no sbatch on PATH: submit from a SLURM login node, or run with --local")
    kwargs = {} if a.local else {"slurm_max_num_timeout": a.max_requeues}
    executor = submitit.AutoExecutor(folder=a.job_dir, cluster="local" if a.local else "slurm", **kwargs)
    tasks = a.tasks_per_node or (max(a.gpus_per_node, 1) if a.command in ("train", "bench") else 1)
    mpirun_inside = a.command in MPI_COMMANDS and a.mpi_launch == "mpirun"
    params: dict[str, Any] = dict(
        name=a.name or f"udean-{a.command}",
        timeout_min=parse_time(a.time),
        nodes=a.nodes,
        tasks_per_node=1 if (mpirun_inside and a.local) else tasks,
        gpus_per_node=a.gpus_per_node,
    )
    if a.cpus_per_task:
        params["cpus_per_task"] = a.cpus_per_task
    if a.mem_gb:
        params["mem_gb"] = a.mem_gb
    if a.local:
        if a.nodes != 1:
            raise ValueError("--local runs on this machine: --nodes must be 1")
    else:
        srun_args = [f"--mpi={a.srun_mpi}"] if a.srun_mpi and a.command in MPI_COMMANDS else []
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
        job_fn = UdeanJob(a.command, rest, mpi_launch=a.mpi_launch, max_requeues=a.max_requeues, mpi_ntasks=ntasks)
        job_fn.argv()  # fail here, not in the queue
    except ValueError as exc:
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
