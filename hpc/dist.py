"""Distributed init and the few collectives the rest of the suite needs.

`init()` reads the launch environment (hpc.env), exports what torch.distributed and DeepSpeed
read, picks the backend (nccl with CUDA, gloo on CPU) and the GPU of this task, and starts the
process group through DeepSpeed. It always starts one, also for a single process: DeepSpeed
engines need a process group even at world size 1.

GPU choice. Launchers disagree about GPU visibility: plain srun with --gpus-per-node and
torchrun show every GPU of the node (use device LOCAL_RANK); srun --gpus-per-task /
--gpu-bind=single and submitit's TorchDistributedEnvironment (CUDA_VISIBLE_DEVICES=local rank)
show one (use device 0). `device_index` handles both; pass `dist.deepspeed_args()` as
`deepspeed.initialize(args=...)` so DeepSpeed's own set_device agrees (it otherwise calls
set_device(LOCAL_RANK), which fails when each task sees one GPU).
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from hpc import env as launch

BACKENDS = ("auto", "gloo", "nccl", "mpi")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_index(local_rank: int, local_world_size: int, visible: int) -> int:
    """GPU index for a task given how many GPUs it can see.

    All of the node's GPUs visible -> local_rank; one visible (bound per task) -> 0.
    """
    if visible <= 0:
        raise ValueError("no CUDA device visible")
    if visible >= local_world_size:
        return local_rank
    if visible == 1:
        return 0
    raise ValueError(
        f"{local_world_size} tasks on this node but {visible} GPUs visible to each: run one task per GPU "
        "(srun --ntasks-per-node=G with --gpus-per-node=G)")


@dataclass
class Dist:
    """This process's view of the job: who am I, and the collectives every rank must share."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "single"
    backend: str = "gloo"
    device: Any = "cpu"  # torch.device
    device_rank: int = -1  # CUDA index of this task, -1 on CPU
    _torch_dist: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self._torch_dist is not None and self._torch_dist.is_initialized()

    # --- collectives: each is a no-op identity without a process group -------------------
    def barrier(self) -> None:
        if self.initialized:
            self._torch_dist.barrier()

    def _reduce(self, value: float, op: str) -> float:
        if not self.initialized or self.world_size == 1:
            return value
        import torch

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self._torch_dist.all_reduce(t, op=getattr(self._torch_dist.ReduceOp, op))
        return float(t.item())

    def all_reduce_flag(self, flag: bool) -> bool:
        """True on every rank if `flag` is True on any rank (stop, checkpoint, skip decisions)."""
        return self._reduce(1.0 if flag else 0.0, "MAX") > 0.0

    def all_reduce_sum(self, value: float) -> float:
        return self._reduce(float(value), "SUM")

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank."""
        if not self.initialized or self.world_size == 1:
            return obj
        box = [obj]
        self._torch_dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_object(self, obj: Any, dst: int = 0) -> list | None:
        """[obj of rank 0, obj of rank 1, ...] on rank `dst`, None elsewhere."""
        if not self.initialized or self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        # gather_object with nccl needs the current device set; init() did that
        self._torch_dist.gather_object(obj, out, dst=dst)
        return out

    def deepspeed_args(self) -> argparse.Namespace | None:
        """`args` for deepspeed.initialize so its set_device uses our GPU choice; None on CPU,
        where DeepSpeed would read device_rank -1 as "not distributed" (world size 1)."""
        if self.device_rank < 0:
            return None
        return argparse.Namespace(local_rank=self.local_rank, device_rank=self.device_rank)

    def shutdown(self) -> None:
        if self.initialized:
            try:
                self._torch_dist.barrier()
            finally:
                self._torch_dist.destroy_process_group()
        self._torch_dist = None


def _mpi_master_addr() -> str:
    """Multi-node mpirun outside SLURM: rank 0's hostname, told to every rank over MPI."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.bcast(socket.gethostname(), root=0)


def init(backend: str = "auto", timeout_s: float | None = None, environ: dict | None = None) -> Dist:
    """Detect the launcher, export its variables, pick device + backend, start the process group.

    backend: "auto" (nccl if CUDA is available, else gloo), "gloo", "nccl" or "mpi".
    timeout_s: collective timeout (default: DeepSpeed's, 30 min, or $DEEPSPEED_TIMEOUT minutes).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed values are {', '.join(BACKENDS)}")
    import torch
    import torch.distributed as torch_dist

    environ = os.environ if environ is None else environ
    env = launch.detect(environ)
    if env.launcher == "single" and not environ.get("MASTER_PORT"):
        # two single-process jobs on one machine must not collide on 29500
        env = launch.LaunchEnv(**{**env.__dict__, "master_port": free_port()})
    if not env.master_addr:
        env = launch.LaunchEnv(**{**env.__dict__, "master_addr": _mpi_master_addr()})
    launch.export(env, environ)

    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
        if not cuda and env.rank == 0:  # said once, plainly: a GPU job that landed on CPU is slow, not broken
            print("hpc.dist: no CUDA device visible: running on CPU with the gloo backend", file=sys.stderr, flush=True)
    if backend == "nccl" and not cuda:
        raise ValueError("backend=nccl needs CUDA, and no CUDA device is available: use backend=gloo")
    device, device_rank = torch.device("cpu"), -1
    if cuda:
        device_rank = device_index(env.local_rank, env.local_world_size, torch.cuda.device_count())
        torch.cuda.set_device(device_rank)
        device = torch.device("cuda", device_rank)

    import deepspeed

    kwargs: dict[str, Any] = dict(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                  rank=env.rank, world_size=env.world_size)
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(**kwargs)
    return Dist(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                local_world_size=env.local_world_size, launcher=env.launcher, backend=backend,
                device=device, device_rank=device_rank, _torch_dist=torch_dist)


def main(argv: list[str] | None = None) -> int:
    """`python -m hpc.dist`: print what this process sees (a launcher smoke test)."""
    env = launch.detect()
    dist = init(backend=(argv or sys.argv[1:] or ["auto"])[0])
    total = dist.all_reduce_sum(1.0)
    ranks = dist.gather_object(dist.rank)
    if dist.is_main:
        print(f"launcher={env.launcher} world={dist.world_size} backend={dist.backend} "
              f"sum={total:g} ranks={ranks} master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
              flush=True)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
