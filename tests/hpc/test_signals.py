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
