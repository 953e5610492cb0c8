"""hpc.dist under real launchers: one process, mpirun -n 2, torchrun --nproc-per-node 2."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc.dist import STALE_BUILD_LOCK_S, Dist, clear_stale_build_locks, device_index, free_port, process_group_options
from hpc.env import allocated_gpus


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line for line in out.stdout.splitlines() if line.startswith("launcher=")][0]


def test_single_process_has_a_process_group():
    line = run([sys.executable, "-m", "hpc.dist", "gloo"])
    assert line.startswith("launcher=single world=1 backend=gloo sum=1 ranks=[0]")


def test_mpirun_two_ranks():
    line = run(["mpirun", "-n", "2", sys.executable, "-m", "hpc.dist", "gloo"])
    assert line.startswith("launcher=mpi world=2 backend=gloo sum=2 ranks=[0, 1]")


def test_torchrun_two_ranks():
    line = run(["torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "hpc.dist", "gloo"])
    assert line.startswith("launcher=torchrun world=2 backend=gloo sum=2 ranks=[0, 1]")


def test_a_killed_builds_lock_does_not_hang_the_start(tmp_path):
    """torch's JIT build lock left by a killed build made every later start wait forever (seen:
    the suite hung 10 min in deepspeed.init_distributed). The start removes it and goes on."""
    ext = tmp_path / "ext"
    src = Path(os.environ["TORCH_EXTENSIONS_DIR"])  # tests/conftest.py: the op built once per venv
    shutil.copytree(src, ext, symlinks=True) if src.is_dir() else ext.mkdir()
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(exist_ok=True)
    lock.touch()
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(lock, (old, old))
    out = subprocess.run([sys.executable, "-m", "hpc.dist", "gloo"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)})
    assert out.returncode == 0 and "launcher=single world=1" in out.stdout, out.stdout + out.stderr
    assert f"removed {lock}" in out.stderr


def test_only_old_build_locks_are_removed(tmp_path):
    now = time.time()
    for name, age in (("old", STALE_BUILD_LOCK_S + 1), ("fresh", 5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "lock").touch()
        os.utime(tmp_path / name / "lock", (now - age, now - age))
    (tmp_path / "py311_cpu" / "nested").mkdir(parents=True)
    (tmp_path / "py311_cpu" / "nested" / "lock").touch()
    os.utime(tmp_path / "py311_cpu" / "nested" / "lock", (now - 2 * STALE_BUILD_LOCK_S,) * 2)
    removed = clear_stale_build_locks(str(tmp_path), now=now)
    assert sorted(removed) == sorted([str(tmp_path / "old" / "lock"), str(tmp_path / "py311_cpu" / "nested" / "lock")])
    assert (tmp_path / "fresh" / "lock").exists()


def test_shutdown_puts_back_the_launcher_variables_it_exported():
    """An in-process job (udean.train.train(cfg) in a notebook or a test) left RANK, MASTER_PORT,
    ... in os.environ: every child process started afterwards then bound that job's port and
    failed with EADDRINUSE (seen in CI). shutdown puts them back; a second job in the same
    process works."""
    code = (
        "import os, sys; from hpc.dist import init; from hpc.env import EXPORTED\n"
        "os.environ['MASTER_ADDR'] = '127.0.0.1'\n"
        "for _ in range(2):\n"
        "    d = init('gloo'); assert os.environ['MASTER_PORT'] and d.all_reduce_sum(1.0) == 1.0; d.shutdown()\n"
        "    left = {k: os.environ.get(k) for k in EXPORTED if k in os.environ}\n"
        "    assert left == {'MASTER_ADDR': '127.0.0.1'}, left\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                           "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_uninitialized_dist_is_an_identity():
    d = Dist()
    assert d.all_reduce_flag(True) and not d.all_reduce_flag(False)
    assert d.all_reduce_sum(2.5) == 2.5 and d.broadcast_object({"a": 1}) == {"a": 1} and d.gather_object(3) == [3]


@pytest.mark.parametrize("local_rank, local_world, visible, expected", [
    (3, 4, 4, 3),  # srun --gpus-per-node / torchrun: every GPU visible, pick by local rank
    (3, 4, 8, 3),
    (3, 4, 1, 0),  # --gpus-per-task / submitit's CUDA_VISIBLE_DEVICES=local rank: the one visible GPU
])
def test_device_index(local_rank, local_world, visible, expected):
    assert device_index(local_rank, local_world, visible) == expected


def test_device_index_rejects_ambiguous_visibility():
    with pytest.raises(ValueError, match="one task per GPU"):
        device_index(3, 4, 2)


def test_process_group_binds_the_tasks_own_gpu_not_local_rank():
    """--gpus-per-task=1: LOCAL_RANK 3 sees one GPU, cuda:0. DeepSpeed's own init would pass
    device_id=cuda:3; ours passes the device init() chose."""
    import datetime

    import torch

    t = datetime.timedelta(minutes=1)
    device = torch.device("cuda", device_index(local_rank=3, local_world_size=4, visible=1))
    opts = process_group_options("nccl", device, rank=7, world_size=8, timeout=t, torch_version="2.13.0")
    assert opts == dict(backend="nccl", init_method="env://", rank=7, world_size=8, timeout=t,
                        device_id=torch.device("cuda", 0))
    # gloo (CPU) never binds a device; nor does nccl at world size 1 or on torch 2.6.x-2.7.0
    assert "device_id" not in process_group_options("gloo", torch.device("cpu"), 7, 8, t, "2.13.0")
    assert "device_id" not in process_group_options("nccl", device, 0, 1, t, "2.13.0")
    assert "device_id" not in process_group_options("nccl", device, 7, 8, t, "2.7.0")


GROUP_ORDER = """
import deepspeed.comm.comm as ds_comm, torch.distributed as td
from hpc.dist import init
assert not td.is_initialized() and ds_comm.cdb is None
started = []
original = td.init_process_group
td.init_process_group = lambda *a, **k: (started.append(k), original(*a, **k))[1]
dist = init("gloo")
# one group, started by hpc.dist with its own keywords (DeepSpeed's would carry no init_method)
assert len(started) == 1 and started[0]["init_method"] == "env://", started
assert ds_comm.cdb is not None and ds_comm.cdb.is_initialized() and td.get_backend() == "gloo"
world = td.group.WORLD
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")   # what deepspeed.initialize does: adopts ours
assert td.group.WORLD is world and len(started) == 1
print("ok", dist.rank, dist.world_size)
dist.shutdown()
"""


def test_our_process_group_exists_before_deepspeed_and_is_adopted():
    out = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m",
                          "tests.hpc.run_code", GROUP_ORDER], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(line for line in out.stdout.splitlines() if line.startswith("ok")) == ["ok 0 2", "ok 1 2"]


GPU_JOB = {"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1",
           "SLURM_LOCALID": "0", "SLURM_NODELIST": "n1"}


def test_gpus_allocated_but_no_cuda_fails_in_one_line():
    import torch

    gpus = {"SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_GPUS": "0,1,2,3"}
    assert not torch.cuda.is_available(), "this test is about a CPU-only torch"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_", "MASTER_", "LOCAL_"))}
    out = subprocess.run([sys.executable, "-m", "hpc.dist"], env={**env, **GPU_JOB, **gpus},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "SLURM allocated GPUs" in errors[0] and "CPU-only build" in errors[0], out.stderr
    assert "SLURM_JOB_GPUS=0,1,2,3" in errors[0]


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_GPUS_PER_NODE": "0"}, None),  # sbatch --gpus-per-node=0 (the CPU test jobs)
    ({"SLURM_GPUS_PER_NODE": "a100:0", "SLURM_JOB_GPUS": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "0"}, None),  # exported from a login shell: not an allocation
    ({"SLURM_GPUS_ON_NODE": "2"}, "SLURM_GPUS_ON_NODE=2"),
    ({"SLURM_JOB_GPUS": "0"}, "SLURM_JOB_GPUS=0"),  # GPU index 0, not a count of 0
    ({"SLURM_STEP_GPUS": "2,3", "SLURM_JOB_GPUS": "0,1,2,3"}, "SLURM_STEP_GPUS=2,3"),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, "SLURM_GPUS_PER_NODE=a100:4"),
    ({"SLURM_GPUS_PER_TASK": "1"}, "SLURM_GPUS_PER_TASK=1"),
])
def test_allocated_gpus(env, expected):
    assert allocated_gpus({"SLURM_JOB_ID": "1", **env}) == expected
    assert allocated_gpus(env) is None  # outside a SLURM job nothing counts
