"""hpc.submit without a cluster: argument handling, and a real LocalExecutor job that is
preempted, requeued through submitit and resumes from its checkpoint."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc.submit import DEFAULTS, UdeanJob, build_parser, make_executor, parse_time, run_child, split_argv

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "hpc" / "jobs" / "preemptible.py"


@pytest.mark.parametrize("text, minutes", [
    ("30", 30), ("90:30", 91), ("1:00:00", 60), ("2-0", 2880), ("1-2:30", 1590), ("0-0:0:59", 1),
])
def test_parse_time(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("bad", ["", "1h", "0", "-5", "1:2:3:4"])
def test_parse_time_rejects(bad):
    with pytest.raises(ValueError):
        parse_time(bad)


def test_split_argv_and_commands():
    ours, rest = split_argv(["train", "--nodes", "2", "--", "--config", "tiny", "train.lr=1"])
    assert ours == ["train", "--nodes", "2"] and rest == ["--config", "tiny", "train.lr=1"]
    assert UdeanJob("regenerate", ["/data"]).argv() == ["shards", "regenerate", "/data"]
    assert UdeanJob("train", ["--config", "x"]).argv() == ["train", "--config", "x"]
    with pytest.raises(ValueError):
        UdeanJob("bench", []).argv()
    with pytest.raises(ValueError):
        UdeanJob("nope", [])


def test_checkpoint_resubmits_same_call_until_the_cap():
    job = UdeanJob("train", ["--config", "x"], max_requeues=2)
    first = job.checkpoint()
    assert first.function is job and job.requeues == 1
    job.checkpoint()
    assert job.checkpoint() is None  # third requeue refused: submitit ends the job


def test_local_executor_parameters(tmp_path):
    a = build_parser().parse_args(["train", "--local", "--tasks-per-node", "2", "--time", "5",
                                   "--job-dir", str(tmp_path)])
    executor, ntasks = make_executor(a)
    assert ntasks == 2 and executor.cluster == "local"
    with pytest.raises(ValueError, match="--nodes"):
        make_executor(build_parser().parse_args(["train", "--local", "--nodes", "2", "--job-dir", str(tmp_path)]))


@pytest.mark.parametrize("command", ["train", "preprocess", "regenerate", "bench"])
def test_help_per_job_shows_its_defaults(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    usage, text = " ".join(capsys.readouterr().out.split()).split("options:")
    assert usage.startswith(f"usage: python -m hpc.submit {command}")
    gpus, cpus = DEFAULTS[command]["gpus_per_node"], DEFAULTS[command]["cpus_per_task"]
    assert f"(default: {gpus})" in text.split("--gpus-per-node GPUS_PER_NODE")[1].split("--tasks")[0]
    assert f"(default: {cpus})" in text.split("--cpus-per-task CPUS_PER_TASK")[1].split("--mem-gb")[0]
    assert ("--srun-mpi" in text) == (command in ("preprocess", "regenerate"))


def test_train_defaults_follow_the_sbatch_script():
    # slurm/train_udean.sh asks for no GPU itself (CPU partitions run it too); its GPU line is one
    # task per GPU, 4 GPUs per node, and 8 CPUs per task: hpc.submit train's defaults
    script = (REPO / "slurm" / "train_udean.sh").read_text()
    assert "#SBATCH --gpus" not in script and "#SBATCH --cpus-per-task=8" in script
    assert "sbatch -N 2 --ntasks-per-node=4 --gpus-per-node=4 slurm/train_udean.sh" in script
    a = build_parser().parse_args(["train"])
    assert (a.gpus_per_node, a.cpus_per_task, a.tasks_per_node) == (4, 8, None)


@pytest.mark.skipif(not __import__("shutil").which("sbatch"), reason="needs sbatch on PATH (CI installs SLURM)")
def test_srun_gets_cpus_per_task(tmp_path):
    """srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05) and submitit's srun line
    does not carry it: the job gives it to both."""
    executor, _ = make_executor(build_parser().parse_args(
        ["train", "--cpus-per-task", "6", "--gpus-per-node", "2", "--job-dir", str(tmp_path)]))
    params = executor._executor.parameters
    assert params["cpus_per_task"] == 6 and "--cpus-per-task=6" in params["srun_args"]
    executor, _ = make_executor(build_parser().parse_args(
        ["preprocess", "--srun-mpi", "pmix", "--job-dir", str(tmp_path)]))
    assert executor._executor.parameters["srun_args"] == ["--cpus-per-task=1", "--mpi=pmix"]


def test_run_child_forwards_signals_and_returns_the_exit_code(tmp_path):
    ready = tmp_path / "ready"
    child = ("import pathlib, signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(75)); "
             f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")

    def signal_when_ready():
        deadline = time.time() + 30
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    before = signal.getsignal(signal.SIGUSR1)
    sender = __import__("threading").Thread(target=signal_when_ready)
    sender.start()
    start = time.time()
    assert run_child([sys.executable, "-c", child], forward=(signal.SIGUSR1,)) == 75
    sender.join()
    assert time.time() - start < 30 and signal.getsignal(signal.SIGUSR1) == before
    assert run_child([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"]) == 128 + 9


def test_local_job_preempted_requeued_resumed(tmp_path):
    """2 tasks under submitit's LocalExecutor; SIGTERM to the controller (forwarded to the tasks)
    -> checkpoint + exit 75 -> requeued by submitit -> resumes at the checkpointed step."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    client_log = tmp_path / "client.txt"
    with client_log.open("w") as f:  # not a pipe: the local controller inherits it and outlives the client
        rc = subprocess.run(
            [sys.executable, "-m", "hpc.submit", "bench", "--local", "--tasks-per-node", "2", "--time", "5",
             "--job-dir", str(tmp_path / "job"), "--", str(STANDIN), str(tmp_path), "60", "0.1"],
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=60).returncode
    assert rc == 0, client_log.read_text()
    controller = int(re.search(r"job (\d+)", client_log.read_text()).group(1))
    log0 = tmp_path / "events-rank0.jsonl"

    def steps() -> list[dict]:
        return [json.loads(x) for x in log0.read_text().splitlines()] if log0.is_file() else []

    deadline = time.time() + 120
    while not any(e["event"] == "step" and e["step"] >= 3 for e in steps()):
        assert time.time() < deadline, "the local job did not start"
        time.sleep(0.2)
    os.kill(controller, signal.SIGTERM)
    while not (tmp_path / "done.json").is_file():
        assert time.time() < deadline + 120, f"the local job did not finish: {steps()[-3:]}"
        time.sleep(0.3)
    ev = [e for e in steps() if e["event"] != "step"]
    stop = [e for e in ev if e["event"] == "preempted"]
    assert len(stop) == 1 and stop[0]["signal"] == "SIGTERM"
    starts = [e for e in ev if e["event"] == "start"]
    assert [s["step"] for s in starts] == [0, stop[0]["step"]] and all(s["world"] == 2 for s in starts)
    assert json.loads((tmp_path / "done.json").read_text()) == {"step": 60, "world": 2}
