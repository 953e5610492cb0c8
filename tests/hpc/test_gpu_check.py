"""benchmarks/gpu_check.sh --smoke: every stage of the one-shot GPU check runs on CPU (tiny
model and data) and writes its JSON; the full check is for a GPU machine (docs/hpc.md)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log")))
    assert out.returncode == 0, out.stderr[-3000:] + logs
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["correctness", "train_step", "zero_cudnn", "train_run", "infer"]
    assert summary["passed"] and summary["smoke"]
    check = json.loads((tmp_path / "correctness.json").read_text())
    assert check["passed"] and check["worst"] <= check["bound_rel"] and set(check["losses"]) == {"fp32", "bf16"}
    rows = json.loads((tmp_path / "zero_cudnn.json").read_text())["rows"]
    assert {(r["zero_stage"], r["cudnn_benchmark"]) for r in rows} == {(0, False), (0, True), (1, False), (1, True)}
    run = json.loads((tmp_path / "train_run.json").read_text())
    assert run["stopped_by_signal"] and run["steps"] > 0  # stopped by SIGUSR1 through the preemption path
    for name in ("train_step.json", "infer.json"):
        assert (tmp_path / name).is_file()
