"""hpc.mpi.world under real launchers: mpirun -n 2 is one world of 2; a launcher that says 2
ranks while MPI initialises a singleton (srun --mpi=pmi2 with OpenMPI 5) is an error, not two
jobs writing the same files."""
import os
import subprocess
import sys

CODE = "from hpc.mpi import world; c = world(); print('size', c.Get_size())"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_COMM", "PMI", "PMIX", "SLURM_"))}
    return {**env, **extra}


def test_mpirun_world_of_two():
    out = subprocess.run(["mpirun", "-n", "2", sys.executable, "-c", CODE], env=clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split().count("2") == 2


def test_singleton_under_a_multi_rank_launcher_is_an_error():
    # what srun --mpi=pmi2 gives each task: PMI-2 variables an OpenMPI 5 process cannot use
    out = subprocess.run([sys.executable, "-c", CODE], env=clean_env(PMI_RANK="1", PMI_SIZE="2", PMI_JOBID="9.0"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "size" not in out.stdout
    assert "the launcher started 2 ranks but MPI sees a world of 1" in out.stderr and "--mpi=pmix" in out.stderr


def test_plain_srun_tasks_without_mpi_are_an_error():
    # what `srun -n 2` with MpiDefault=none gives each task: a step of 2 tasks, no PMI at all
    step = dict(SLURM_JOB_ID="7", SLURM_STEP_ID="0", SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="2", SLURM_MPI_TYPE="none")
    out = subprocess.run([sys.executable, "-c", CODE], env=clean_env(**step), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "size" not in out.stdout
    assert "srun started 2 tasks without an MPI plugin (--mpi=none)" in out.stderr
    # one task in a step, or the batch script itself (no step): one rank, as before
    for env in ({**step, "SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}, {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0"}):
        out = subprocess.run([sys.executable, "-c", CODE], env=clean_env(**env), capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and out.stdout.split() == ["size", "1"], out.stderr
