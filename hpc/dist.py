"""Distributed init and the few collectives the rest of the suite needs.

`init()` reads the launch environment (hpc.env), exports what torch.distributed and DeepSpeed
read, picks the backend (nccl with CUDA, gloo on CPU) and the GPU of this task, starts the
process group itself and hands it to DeepSpeed. It always starts one, also for a single
process: DeepSpeed engines need a process group even at world size 1.

GPU choice. Launchers disagree about GPU visibility: plain srun with --gpus-per-node and
torchrun show every GPU of the node (use device LOCAL_RANK); srun --gpus-per-task /
--gpu-bind=single and submitit's TorchDistributedEnvironment (CUDA_VISIBLE_DEVICES=local rank)
show one (use device 0). `device_index` handles both. Two DeepSpeed calls assume LOCAL_RANK is
the device: `deepspeed.init_distributed` (>= 0.17.3) starts the group with
`device_id=cuda:$LOCAL_RANK`, a device that does not exist for LOCAL_RANK > 0 when each task
sees one GPU, so `init` starts the group with our device first (DeepSpeed then adopts the
existing group: deepspeed/comm/comm.py, init_distributed); and `deepspeed.initialize` calls
set_device(LOCAL_RANK) unless given `args=dist.deepspeed_args()`.

A CPU build of torch on a node where SLURM allocated GPUs is an install mistake (docs/hpc.md,
"Installing on a cluster"), not a reason to train on CPU: `init` fails with one line.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
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


def process_group_options(backend: str, device: Any, rank: int, world_size: int, timeout: datetime.timedelta,
                          torch_version: str) -> dict[str, Any]:
    """torch.distributed.init_process_group keywords: env:// rendezvous, and for nccl the task's own
    GPU as device_id (eager NCCL init on the right device), under the conditions DeepSpeed 0.19
    uses (deepspeed/comm/torch.py): not at world size 1 (every later new_group would need a
    peer for ncclCommSplit) and not on torch 2.6.x-2.7.0, where device_id can hang."""
    from packaging.version import Version

    options: dict[str, Any] = dict(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                   timeout=timeout)
    if backend == "nccl" and world_size > 1 and not Version("2.6.0") < Version(torch_version) < Version("2.7.1"):
        options["device_id"] = device
    return options


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
    _exported: tuple | None = field(default=None, repr=False)  # (environ, values before): put back by shutdown

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

    def all_reduce_max(self, t):
        """`t` (a tensor on `device`) replaced in place by its element-wise max over the ranks and
        returned: one collective for several flags, and no host sync (the caller reads it once)."""
        if self.initialized and self.world_size > 1:
            self._torch_dist.all_reduce(t, op=self._torch_dist.ReduceOp.MAX)
        return t

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
        """End the process group and put back the launcher variables `init` exported."""
        try:
            if self.initialized:
                try:
                    self._torch_dist.barrier()
                finally:
                    self._torch_dist.destroy_process_group()
        finally:
            self._torch_dist = None
            if self._exported is not None:
                launch.unexport(self._exported[1], self._exported[0])
                self._exported = None


def _mpi_master_addr() -> str:
    """Multi-node mpirun outside SLURM: rank 0's hostname, told to every rank over MPI."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.bcast(socket.gethostname(), root=0)


STALE_BUILD_LOCK_S = 600  # a JIT build lock older than this is a killed build's (DeepSpeed's CPU op builds in < 1 min)


def clear_stale_build_locks(root: str | None = None, max_age_s: float = STALE_BUILD_LOCK_S,
                            now: float | None = None) -> list[str]:
    """Remove torch JIT-extension build locks (`<root>/<ext>/lock`, `<root>/<py..>/<ext>/lock`)
    older than `max_age_s`, saying so on stderr; returns the removed paths. torch's build lock
    (cpp_extension's FileBaton) is a bare file: a build killed mid-way (scancel, kill -9, OOM)
    leaves it, and every later start then waits for it forever in a silent sleep loop, inside
    `deepspeed.init_distributed` (its CPU shared-memory op). root: $TORCH_EXTENSIONS_DIR, else
    torch's default build root."""
    import glob
    import time

    if root is None:
        from torch.utils.cpp_extension import get_default_build_root
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    now = time.time() if now is None else now
    removed = []
    for lock in glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")):
        try:
            age = now - os.stat(lock).st_mtime
            if age > max_age_s:
                os.remove(lock)
                removed.append(lock)
                print(f"hpc.dist: removed {lock}, a torch extension build lock {int(age)} s old (a killed "
                      "build's: it would block this start forever)", file=sys.stderr, flush=True)
        except OSError:  # another process removed or rebuilt it: not ours to judge
            continue
    return removed


def init(backend: str = "auto", timeout_s: float | None = None, environ: dict | None = None) -> Dist:
    """Detect the launcher, export its variables, pick device + backend, start the process group.

    backend: "auto" (nccl if CUDA is available, else gloo), "gloo", "nccl" or "mpi".
    timeout_s: collective timeout (default: DeepSpeed's, 10 min, or $DEEPSPEED_TIMEOUT minutes).
    Raises ValueError when SLURM allocated GPUs but torch sees no CUDA device.
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
    before = launch.export(env, environ)

    cuda = torch.cuda.is_available()
    if not cuda and (given := launch.allocated_gpus(environ)):
        build = (f"a CUDA {torch.version.cuda} build, but no device is usable: check the driver (nvidia-smi)"
                 if torch.version.cuda else "a CPU-only build: install a CUDA build of torch "
                 "(./install.sh --gpu, docs/hpc.md \"Installing on a cluster\")")
        raise ValueError(f"SLURM allocated GPUs to this task ({given}) but torch {torch.__version__} sees no "
                         f"CUDA device: {build}")
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

    quiet_deepspeed()
    import deepspeed
    from deepspeed.constants import default_pg_timeout

    if not torch_dist.is_initialized():
        timeout = default_pg_timeout if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        torch_dist.init_process_group(**process_group_options(backend, device, env.rank, env.world_size, timeout,
                                                              torch.__version__))
    if env.local_rank == 0:  # one process per node looks; the build itself happens inside init_distributed
        clear_stale_build_locks()
    # DeepSpeed adopts the group that exists (its comm backend, cdb) instead of starting its own;
    # on CPU it prints that it built its shared-memory op, in every command: kept off the console
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    for line in said.getvalue().splitlines():
        if line.strip() and "built successfully" not in line:
            print(line, flush=True)
    return Dist(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                local_world_size=env.local_world_size, launcher=env.launcher, backend=backend,
                device=device, device_rank=device_rank, _torch_dist=torch_dist, _exported=(environ, before))


def quiet_deepspeed() -> None:
    """Before DeepSpeed is imported: where torch sees no CUDA device, name DeepSpeed's accelerator
    (DS_ACCELERATOR=cpu, what it detects itself there and what this process runs on), so that it
    does not warn "Setting accelerator to CPU" in every command. A value already set wins."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    """`python -m hpc.dist`: print what this process sees (a launcher smoke test)."""
    env = launch.detect()
    try:
        dist = init(backend=(argv or sys.argv[1:] or ["auto"])[0])
    except ValueError as exc:
        print(f"hpc.dist: error: {exc}", file=sys.stderr, flush=True)
        return 2
    total = dist.all_reduce_sum(1.0)
    ranks = dist.gather_object(dist.rank)
    places = dist.gather_object(f"{socket.gethostname()}:{dist.local_rank}/{dist.local_world_size}")
    if dist.is_main:
        print(f"launcher={env.launcher} world={dist.world_size} backend={dist.backend} "
              f"sum={total:g} ranks={ranks} master={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
              f"local={','.join(places)}", flush=True)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
