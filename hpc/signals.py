"""Preemption: a signal sets a flag; the training loop polls it, checkpoints and exits.

SLURM warns a job before it kills it: `#SBATCH --signal=B:USR1@120` sends SIGUSR1 to the batch
shell 120 s before the time limit (slurm/common.sh forwards it to the tasks), submitit sends
SIGUSR1 to its tasks, and `scancel`/preemption send SIGTERM. The handler only sets a flag;
it never raises into the middle of a collective or a checkpoint write. The loop does

    stop = dist.all_reduce_flag(preempt.requested)   # every rank must agree, or some hang
    if stop: save checkpoint; return REQUEUE_EXIT_CODE

and the launcher (slurm/common.sh, or hpc.submit's checkpoint()) requeues the job on that
exit code; the requeued job resumes from the checkpoint it finds.

DataLoader workers. On `scancel` and on preemption (PreemptMode=REQUEUE) slurmstepd signals
every process of the step, loader workers included; torch's workers die on SIGTERM, and the main
process then raises "DataLoader worker (pid N) is killed by signal: Terminated" before it can
checkpoint. `ignore_in_worker` (a DataLoader worker_init_fn) makes workers ignore the
preemption signals; the main process checkpoints, then ends them as usual.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Iterable

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry". Not 124
# (timeout(1)), not 128+N (killed by signal N), not 1/2 (errors, usage): a job that exits 75
# has saved a checkpoint and wants to be requeued; any other non-zero code is a real failure.
REQUEUE_EXIT_CODE = 75

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
WORKER_IGNORED = (*DEFAULT_SIGNALS, signal.SIGINT)  # Ctrl-C reaches the whole process group too


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader(worker_init_fn=ignore_in_worker): the worker ignores SIGUSR1/SIGTERM/SIGINT
    (replacing torch's SIGTERM handler, which exits), so a preemption signal sent to every process
    of the step reaches only the main process's Preemption flag. Workers still end when the
    loader is closed, or by SIGKILL after SLURM's KillWait."""
    for sig in WORKER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)


class Preemption:
    """A flag set by SIGUSR1/SIGTERM (or any signals given to `install`).

    >>> preempt = Preemption.install()
    >>> preempt.requested        # False until a signal arrives
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @classmethod
    def install(cls, signals: Iterable[int] = DEFAULT_SIGNALS) -> "Preemption":
        """Create a Preemption and make it the handler of `signals` (main thread only)."""
        self = cls()
        for sig in signals:
            self._previous[int(sig)] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # async-signal context: set state only; no I/O, no locks that the main thread may hold
        if self._signal_name is None:
            try:
                self._signal_name = signal.Signals(signum).name
            except ValueError:
                self._signal_name = str(signum)
        self._event.set()

    @property
    def requested(self) -> bool:
        """True once a preemption signal has arrived (until `reset`)."""
        return self._event.is_set()

    @property
    def signal_name(self) -> str | None:
        """Name of the first signal received ('SIGUSR1', 'SIGTERM'), or None."""
        return self._signal_name

    def request(self, name: str = "manual") -> None:
        """Set the flag from code (tests, a wall-clock budget) as if a signal had arrived."""
        if self._signal_name is None:
            self._signal_name = name
        self._event.set()

    def reset(self) -> None:
        self._signal_name = None
        self._event.clear()

    def uninstall(self) -> None:
        """Restore the handlers that were in place before `install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()
