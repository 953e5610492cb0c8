"""How many CPU threads this process should use: the CPUs it may run on, not the machine's.

torch starts one intra-op thread per core of the machine. A task that owns 8 cores of a
64-core node (SLURM --cpus-per-task=8), or one of 2 ranks on a 2-core machine, then runs more
spinning OpenMP threads than it has cores, and a busy machine makes it crawl (issue 18 measured
1.1 patches/s against 33 with one thread; docs/performance.md, "Threads"). The budget:

- `SLURM_CPUS_PER_TASK` inside a SLURM step: this task's own CPUs (capped by the affinity mask);
- else the affinity mask (`os.sched_getaffinity`, what taskset / cgroups / mpirun binding allow),
  shared by the ranks of this node (`local_world_size`: torchrun and unbound mpirun ranks see
  the same mask);
- minus one CPU per DataLoader worker (each works with one thread) while more than one is left.

An explicit `OMP_NUM_THREADS` always wins: the caller keeps torch's setting.

Sharing a machine (`share_cores`, set by `udean` before torch loads): an OpenMP thread that
waits at the end of a parallel region spins first (GNU libgomp, torch's runtime on Linux: up
to 300000 polls) and keeps its core. Two trainings on one 2-core machine, each sized to the
whole affinity mask, then spend their time spinning against each other: issue 27 measured 1.30
and 1.32 steps/s against 7.99 alone, 16 % each. With OMP_WAIT_POLICY=PASSIVE a waiting thread
sleeps at once and gives its core to the other run (benchmarks/concurrency.py, docs/performance.md
"Threads"). The thread count stays what `plan` says: it does not follow the load, so a run's
numerics (reduction order) do not depend on what else ran beside it. A value of
OMP_WAIT_POLICY or GOMP_SPINCOUNT the user set wins.
"""
from __future__ import annotations

import os
from typing import Mapping, NamedTuple

from hpc.env import in_slurm_step


class ThreadPlan(NamedTuple):
    threads: int  # intra-op threads for this process
    cpus: int  # CPUs this process may use
    reason: str  # where the numbers come from, for the log


def cpus_available(local_world_size: int = 1, environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """CPUs this process may use, and where the number comes from."""
    environ = os.environ if environ is None else environ
    mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0 and in_slurm_step(environ):
        return max(1, min(int(per_task), mask)), f"SLURM_CPUS_PER_TASK={per_task}, affinity mask {mask}"
    n = max(1, mask // max(local_world_size, 1))
    return n, f"affinity mask {mask} CPUs / {local_world_size} local rank(s)"


def plan(local_world_size: int = 1, workers: int = 0, environ: Mapping[str, str] | None = None) -> ThreadPlan | None:
    """The intra-op thread count for a process with `workers` loader workers; None when
    OMP_NUM_THREADS is set (the user chose)."""
    environ = os.environ if environ is None else environ
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    cpus, why = cpus_available(local_world_size, environ)
    threads = max(1, cpus - workers)
    return ThreadPlan(threads, cpus, f"{why}, {workers} loader worker(s)")


WAIT_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def share_cores(environ: dict[str, str] | None = None) -> bool:
    """OMP_WAIT_POLICY=PASSIVE in `environ` (default os.environ) unless the user set a wait policy
    (WAIT_KEYS); True when it set it. Call before torch is imported: libgomp reads it once, at load."""
    environ = os.environ if environ is None else environ
    if any(environ.get(k, "").strip() for k in WAIT_KEYS):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
