"""Preemption flag: a real signal sets it, the handler never raises, reset clears it."""
import os
import signal

from hpc.signals import REQUEUE_EXIT_CODE, Preemption


def test_signal_sets_flag_and_name():
    before = signal.getsignal(signal.SIGUSR1)
    preempt = Preemption.install()
    try:
        assert not preempt.requested and preempt.signal_name is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.requested and preempt.signal_name == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first name, still no exception
        assert preempt.signal_name == "SIGUSR1"
        preempt.reset()
        assert not preempt.requested and preempt.signal_name is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempt.signal_name == "SIGTERM"
    finally:
        preempt.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before  # uninstall restores the previous handler


def test_requeue_code_is_not_a_signal_or_timeout_code():
    assert REQUEUE_EXIT_CODE not in (0, 1, 2, 124, 137, 143) and REQUEUE_EXIT_CODE < 128


def _loader_through_sigterm(worker_init_fn) -> list[int]:
    """Iterate a 2-worker DataLoader; halfway, SIGTERM every worker (what slurmstepd does to all
    processes of the step on scancel / preemption); return what the main process got."""
    import time

    import torch
    from torch.utils.data import DataLoader

    class Slow(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, i):
            time.sleep(0.01)
            return i

    got = []
    it = iter(DataLoader(Slow(), batch_size=2, num_workers=2, worker_init_fn=worker_init_fn))
    for batch in it:
        got += batch.tolist()
        if len(got) == 10:
            for w in it._workers:
                os.kill(w.pid, signal.SIGTERM)
            time.sleep(0.5)  # let the signal land before the next fetch
    return got


def test_loader_workers_survive_the_preemption_signal():
    from hpc.signals import ignore_in_worker

    assert _loader_through_sigterm(ignore_in_worker) == list(range(40))


def test_without_it_torch_workers_die_on_sigterm():
    """What ignore_in_worker is for: torch's own worker handler exits on SIGTERM."""
    import pytest

    with pytest.raises(RuntimeError, match="DataLoader worker"):
        _loader_through_sigterm(None)
