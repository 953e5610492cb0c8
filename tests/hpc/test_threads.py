"""hpc.threads: torch's thread count from the CPUs this process may use, not the machine's."""
import os

from hpc import threads

MASK = len(os.sched_getaffinity(0))
STEP = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}


def test_the_affinity_mask_is_shared_by_the_local_ranks():
    assert threads.cpus_available(1, {})[0] == MASK
    assert threads.cpus_available(2, {})[0] == max(1, MASK // 2)
    assert threads.cpus_available(64, {})[0] == 1


def test_a_slurm_task_uses_its_own_cpus_capped_by_the_mask():
    assert threads.cpus_available(4, {**STEP, "SLURM_CPUS_PER_TASK": "1"})[0] == 1
    assert threads.cpus_available(4, {**STEP, "SLURM_CPUS_PER_TASK": "512"})[0] == MASK
    # in the batch script (no step yet) the variable describes the tasks to come, not this process
    assert threads.cpus_available(1, {"SLURM_PROCID": "0", "SLURM_CPUS_PER_TASK": "1"})[0] == MASK


def test_loader_workers_get_a_cpu_each_and_omp_num_threads_wins():
    assert threads.plan(1, 0, {}).threads == MASK
    assert threads.plan(1, MASK + 3, {}).threads == 1
    assert threads.plan(1, 0, {**STEP, "SLURM_CPUS_PER_TASK": "1"}).threads == 1
    assert threads.plan(1, 0, {"OMP_NUM_THREADS": "3"}) is None


def test_udean_makes_waiting_openmp_threads_sleep_before_torch_loads():
    """Two runs on one machine must not spin against each other (issue 27; benchmarks/concurrency.py):
    every `udean` command sets OMP_WAIT_POLICY=PASSIVE before torch (libgomp reads it once, at
    load), unless the user chose a wait policy."""
    import subprocess
    import sys

    assert threads.share_cores(env := {}) and env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        assert not threads.share_cores(env := dict(chosen)) and env == chosen
    code = ("import os, sys, udean.cli; assert 'torch' not in sys.modules; "
            "udean.cli.main(['train', '--config', 'tiny', 'train.lr=-1']); import torch; "
            "print('policy', os.environ.get('OMP_WAIT_POLICY'))")
    for preset, want in (({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")):
        env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_KEYS}
        out = subprocess.run([sys.executable, "-c", code], env={**env, **preset}, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and f"policy {want}" in out.stdout, out.stderr[-2000:]
