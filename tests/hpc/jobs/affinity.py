"""Write where this task runs and which CPUs it may use: OUT/task-<SLURM_PROCID>.json.

    python tests/hpc/jobs/affinity.py OUT
"""
import json
import os
import socket
import sys
from pathlib import Path

from hpc.atomic import atomic_write_text

out = Path(sys.argv[1])
rank = os.environ.get("SLURM_PROCID", "0")
atomic_write_text(out / f"task-{rank}.json", json.dumps({
    "host": socket.gethostname(), "cpus": sorted(os.sched_getaffinity(0)),
    "cpus_per_task": os.environ.get("SLURM_CPUS_PER_TASK"), "omp_threads": os.environ.get("OMP_NUM_THREADS")}))
