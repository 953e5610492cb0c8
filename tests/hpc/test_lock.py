"""hpc.lock: one writer per output folder; a second is refused naming the holder; the lock of
a job killed with SIGKILL is taken over by the next one."""
import os
import signal
import subprocess
import sys
import time

import pytest

from hpc.lock import FolderLocked, folder_lock

HOLD = "import sys, time; from hpc.lock import folder_lock\n" \
       "with folder_lock(sys.argv[1], 'holder job'):\n    print('held', flush=True); time.sleep(60)"


def _holder(folder):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_ones_lock_is_taken_over(tmp_path, capfd):
    p = _holder(tmp_path)
    try:
        with pytest.raises(FolderLocked, match=rf"being written by holder job \(pid {p.pid} on .*lock file"):
            with folder_lock(tmp_path, "second job"):
                pass
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with folder_lock(tmp_path, "third job") as path:  # the kernel dropped the dead job's flock
        assert f'"pid": {os.getpid()}' in path.read_text()
    assert f"taking over the stale lock of holder job (pid {p.pid}" in capfd.readouterr().err
    with folder_lock(tmp_path, "fourth job"):  # released on exit: no stale-lock message this time
        pass
    assert "stale" not in capfd.readouterr().err
