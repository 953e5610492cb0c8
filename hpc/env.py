"""Where am I? The one place that reads launcher environments.

Every launcher tells a process its rank in its own dialect:

- torchrun / the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
- OpenMPI: OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}; MPICH/Hydra and Intel MPI:
  PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS; PMIx launchers: PMIX_RANK
- SLURM (inside an srun step): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODELIST...

`detect` turns any of them into one `LaunchEnv`; `export` writes the torch.distributed names
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which is all that
torch.distributed's env:// init and DeepSpeed read (DeepSpeed reads no SLURM_* variable).
Both are pure functions of a mapping, so every dialect is unit-testable without a cluster.
"""
from __future__ import annotations

import itertools
import os
import re
import zlib
from dataclasses import dataclass
from typing import Mapping, MutableMapping

LAUNCHERS = ("slurm", "mpi", "torchrun", "single")
DEFAULT_PORT = 29500  # torch.distributed's own default
PORT_BASE, PORT_SPAN = 20000, 20000  # job-derived ports land in [20000, 40000): below the ephemeral range


@dataclass(frozen=True)
class LaunchEnv:
    """One process's place in a job, whatever started it."""

    launcher: str  # "slurm" | "mpi" | "torchrun" | "single"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str  # "" only when it cannot be known from the environment (multi-node mpirun)
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_rank(self) -> int:
        """Index of this node, assuming the same number of tasks on every node."""
        return self.rank // max(self.local_world_size, 1)


# ----------------------------------------------------------------------------- SLURM lists

def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM node list {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced '[' in SLURM node list {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, whole: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'], keeping each range's zero padding."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"bad range {item!r} in SLURM node list {whole!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in SLURM node list {whole!r}")
        width = len(lo)  # SLURM pads to the width of the low end: gpu[08-10] -> gpu08, gpu09, gpu10
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list, as `scontrol show hostnames` does, without calling scontrol.

    'gpu[01-03,07],cpu5' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5'];
    'rack[1-2]-n[1-2]' -> ['rack1-n1', 'rack1-n2', 'rack2-n1', 'rack2-n2'].
    """
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        # literal text and [ranges] alternate; several bracket groups form a cartesian product
        pieces = re.split(r"\[([^\]]*)\]", part)
        choices = [[p] if i % 2 == 0 else _expand_range(p, nodelist) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE / SLURM_STEP_TASKS_PER_NODE: '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"bad SLURM tasks-per-node value {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


# ----------------------------------------------------------------------------- helpers

def _int(environ: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for name in names:
        value = environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    if default is None:
        raise ValueError(f"none of {', '.join(names)} is set")
    return default


def slurm_port(job_id: int | str) -> int:
    """A port every task of a SLURM job agrees on without talking: 20000 + job_id % 20000."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def _hashed_port(key: str) -> int:
    return PORT_BASE + zlib.crc32(key.encode()) % PORT_SPAN


def _port(environ: Mapping[str, str]) -> int:
    """MASTER_PORT wins; else one derived from the job id (SLURM) or the MPI job's namespace."""
    if environ.get("MASTER_PORT"):
        return _int(environ, "MASTER_PORT")
    if environ.get("SLURM_JOB_ID"):
        return slurm_port(_int(environ, "SLURM_JOB_ID"))
    for key in ("PMIX_NAMESPACE", "OMPI_MCA_ess_base_jobid", "PMI_JOBID", "PMI_KVSNAME"):
        if environ.get(key):  # same for all ranks of one mpirun, different between two
            return _hashed_port(environ[key])
    return DEFAULT_PORT


def _slurm_nodes(environ: Mapping[str, str]) -> list[str]:
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(key):
            return expand_nodelist(environ[key])
    return []


def in_slurm_step(environ: Mapping[str, str] | None = None) -> bool:
    """True inside an srun step (one process per task); False in the batch script itself,
    where SLURM_PROCID=0 is set but the other tasks do not exist yet."""
    environ = os.environ if environ is None else environ
    if "SLURM_PROCID" not in environ:
        return False
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", ""))
    # the batch script runs as step "batch" (shown as 4294967294 = SLURM_BATCH_SCRIPT)
    return step not in ("", "batch", "extern", "4294967294", "4294967295")


# SLURM's GPU variables: lists of device indices ("0,1") or counts, optionally typed ("a100:4")
GPU_INDEX_VARS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
GPU_COUNT_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS")


def allocated_gpus(environ: Mapping[str, str] | None = None) -> str | None:
    """'NAME=VALUE' of the first SLURM variable that says this job or step was given GPUs, else None.

    CUDA_VISIBLE_DEVICES alone does not count: sbatch exports the submitting shell's environment,
    so a value set on a login node can reach a CPU job."""
    environ = os.environ if environ is None else environ
    if not environ.get("SLURM_JOB_ID"):
        return None
    for name in GPU_INDEX_VARS:
        value = environ.get(name, "").strip()
        if value and value.lower() not in ("nodevfiles", "none"):
            return f"{name}={value}"
    for name in GPU_COUNT_VARS:
        value = environ.get(name, "").strip()
        counts = [m.group(1) for item in value.split(",") if (m := re.search(r"(?:^|:)(\d+)$", item.strip()))]
        if any(int(c) > 0 for c in counts):
            return f"{name}={value}"
    return None


# ----------------------------------------------------------------------------- detect / export

def _detect_torchrun(environ: Mapping[str, str]) -> LaunchEnv:
    world = _int(environ, "WORLD_SIZE")
    return LaunchEnv(
        launcher="torchrun",
        rank=_int(environ, "RANK"),
        world_size=world,
        local_rank=_int(environ, "LOCAL_RANK", default=0),
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE", default=world if "LOCAL_RANK" not in environ else 1),
        master_addr=environ["MASTER_ADDR"],
        master_port=_int(environ, "MASTER_PORT", default=DEFAULT_PORT),
    )


def _slurm_tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
    """Tasks of this step (or job) on this node: SLURM_STEP_TASKS_PER_NODE[SLURM_NODEID]."""
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = expand_tasks_per_node(per_node)
        node = _int(environ, "SLURM_NODEID", default=0)
        if node < len(counts):
            return counts[node]
    return None


def _detect_mpi(environ: Mapping[str, str]) -> LaunchEnv:
    rank = _int(environ, "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
    world = _int(environ, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    local_rank = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PALS_LOCAL_RANKID",
                      "SLURM_LOCALID", default=rank)
    local_world = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PALS_LOCAL_SIZE", default=0)
    if not local_world:
        # srun --mpi=pmix|pmi2 sets only PMIX_RANK / PMI_RANK+PMI_SIZE: inside the step SLURM
        # knows this node's share; without it (a bare PMI launcher) assume one node
        slurm = _slurm_tasks_on_this_node(environ) if in_slurm_step(environ) else None
        local_world = slurm or (world if local_rank == rank else 1)
    if environ.get("MASTER_ADDR"):
        addr = environ["MASTER_ADDR"]
    elif "SLURM_JOB_ID" in environ and _slurm_nodes(environ):
        # mpirun inside an allocation places rank 0 on the allocation's first node
        addr = _slurm_nodes(environ)[0]
    elif local_world == world:
        addr = "127.0.0.1"
    else:
        addr = ""  # multi-node mpirun outside SLURM: hpc.dist asks rank 0 for its hostname over MPI
    return LaunchEnv("mpi", rank, world, local_rank, local_world, addr, _port(environ))


def _detect_slurm(environ: Mapping[str, str]) -> LaunchEnv:
    rank = _int(environ, "SLURM_PROCID")
    world = _int(environ, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    local_rank = _int(environ, "SLURM_LOCALID", default=0)
    local_world = _slurm_tasks_on_this_node(environ) or _int(environ, "SLURM_NTASKS_PER_NODE", default=world)
    nodes = _slurm_nodes(environ)
    addr = environ.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1")
    return LaunchEnv("slurm", rank, world, local_rank, local_world, addr, _port(environ))


def detect(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank, world and master from `environ` (default os.environ); never modifies it.

    Precedence: torchrun-style variables (RANK + WORLD_SIZE + MASTER_ADDR, also what the
    deepspeed launcher and `export` set) > OpenMPI/MPICH/PMI (mpirun, or srun --mpi=pmix/pmi2)
    > SLURM inside an srun step > a single process.
    """
    environ = os.environ if environ is None else environ
    if all(environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR")):
        env = _detect_torchrun(environ)
    elif any(environ.get(k) for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")) and any(
        environ.get(k) for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
    ):
        env = _detect_mpi(environ)
    elif in_slurm_step(environ):
        env = _detect_slurm(environ)
    else:
        env = LaunchEnv("single", 0, 1, 0, 1, environ.get("MASTER_ADDR") or "127.0.0.1", _port(environ))
    if not (0 <= env.rank < env.world_size and 0 <= env.local_rank < max(env.local_world_size, 1)):
        raise ValueError(f"inconsistent launch environment: {env}")
    return env


EXPORTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def export(env: LaunchEnv, environ: MutableMapping[str, str] | None = None) -> dict[str, str | None]:
    """Write the variables torch.distributed (env://) and DeepSpeed read (`EXPORTED`); returns
    their values before, for `unexport`."""
    environ = os.environ if environ is None else environ
    before = {k: environ.get(k) for k in EXPORTED}
    environ.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })
    return before


def unexport(before: dict[str, str | None], environ: MutableMapping[str, str] | None = None) -> None:
    """Put back what `export` replaced: a process that starts a job, ends it and then starts
    child processes (or another job) does not hand them this job's rank and port."""
    environ = os.environ if environ is None else environ
    for key, value in before.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
