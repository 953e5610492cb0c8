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
    for zero in (0, 1):  # benchmarks/train_step.py at each ZeRO stage x cudnn.benchmark, saying which it used
        for bench in ("on", "off"):
            step = json.loads((tmp_path / "zero_cudnn" / f"zero{zero}_cudnn_{bench}.json").read_text())
            assert (step["settings"]["zero_stage"], step["settings"]["cudnn_benchmark"]) == (zero, bench == "on")
            engine_rows = [r for r in step["runs"] if not r["baseline"]]
            assert engine_rows and all(r["status"] == "ok" and r["zero_stage"] == zero for r in engine_rows)
    run = json.loads((tmp_path / "train_run.json").read_text())
    assert run["stopped_by_signal"] and run["steps"] > 0  # stopped by SIGUSR1 through the preemption path
    for name in ("train_step.json", "infer.json"):
        assert (tmp_path / name).is_file()
