"""hpc.dist under real launchers: one process, mpirun -n 2, torchrun --nproc-per-node 2."""
import subprocess
import sys

import pytest

from hpc.dist import Dist, device_index, free_port


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
