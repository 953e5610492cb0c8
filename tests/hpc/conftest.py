"""The two-node SLURM cluster (.ci/slurm-2node.sh) for tests/hpc/test_slurm_two_node.py: started
once per test session when a test asks for it, torn down at the end of the session (daemons, job
processes, network namespaces, links). One session at a time holds it (a lock file)."""
from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".ci" / "slurm-2node.sh"
CONF = "/run/udean-2node/slurm.conf"
LOCK = "/run/udean-2node.lock"  # beside the cluster's folder, which `down` removes
LOCK_WAIT_S = 900


@pytest.fixture(scope="session")
def two_node_cluster() -> dict[str, str]:
    """{'SLURM_CONF': ...}: the environment entry that points SLURM clients at the two-node cluster."""
    if os.geteuid() != 0:
        pytest.skip("the two-node cluster needs root (network namespaces, slurmd): CI runs as root")
    with open(LOCK, "w") as lock:
        deadline = time.time() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    pytest.fail(f"another test session held the two-node cluster ({LOCK}) for {LOCK_WAIT_S} s")
                time.sleep(2)
        up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=300)
        try:
            assert up.returncode == 0, f"{SCRIPT} up failed:\n{up.stdout}{up.stderr}"
            yield {"SLURM_CONF": CONF}
        finally:
            subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=120)
