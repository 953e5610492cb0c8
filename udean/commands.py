"""The suite's own commands as child processes (the demo's stages, the benchmarks' training and
preprocessing runs): which executable, which environment, one home for both."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def executable(name: str) -> str:
    """An executable of this Python's environment (udean, mpirun, torchrun), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH")
    return found


def environment(threads: int = 1, *, override: bool = False) -> dict[str, str]:
    """This process's environment for a child: `threads` OpenMP threads unless OMP_NUM_THREADS
    is already set (`override`: always), unbuffered Python output, this environment's bin/ first
    on PATH, and OpenMPI's consent to run as root where this is root (it refuses without both)."""
    env = dict(os.environ)
    if override:
        env["OMP_NUM_THREADS"] = str(max(1, threads))
    else:
        env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    return env


def mpirun(n: int) -> list[str]:
    """mpirun for `n` ranks on this machine (oversubscription allowed: fewer cores than ranks)."""
    return [executable("mpirun"), "--oversubscribe", "-n", str(n)]
