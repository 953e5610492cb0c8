"""benchmarks/gpu_check.sh --smoke: every stage of the one-shot GPU check runs on CPU (tiny
model and data) and writes its JSON; the full check is for a GPU machine (docs/hpc.md), and
without CUDA it stops before anything with one line and exit 3."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def test_gpu_check_smoke(tmp_path):
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=1800)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(tmp_path.glob("*.log")))
    assert out.returncode == 0, out.stderr[-3000:] + logs
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the default recipe first: its bf16 vs fp32 agreement, then its host cost
    assert [s["stage"] for s in summary["stages"]] == ["correctness", "host_cost", "train_run", "train_step", "infer"]
    assert summary["passed"] and summary["smoke"]
    check = json.loads((tmp_path / "correctness.json").read_text())
    assert check["passed"] and check["worst"] <= check["bound_rel"] and set(check["losses"]) == {"fp32", "bf16"}
    assert {"g.spectrum", "g.noise", "g.da"} <= set(check["first_step_loss_rel"])  # the recommended recipe's terms
    cost = json.loads((tmp_path / "host_cost.json").read_text())
    rows = {(r["precision"], r["zero_stage"]): r for r in cost["rows"]}
    assert set(rows) == {("bf16", 1), ("fp32", 0)}
    assert all(r["ops"] > 0 and r["syncs_ours"] == 1 and r["label"] == "gpu_check" for r in rows.values())
    run = json.loads((tmp_path / "train_run.json").read_text())
    assert run["stopped_by_signal"] and run["steps"] > 0  # stopped by SIGUSR1 through the preemption path
    for name in ("train_step.json", "infer.json"):
        assert (tmp_path / name).is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA (CI has none)")
def test_without_cuda_the_full_check_stops_at_once_with_one_line(tmp_path):
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path / "gc")],
                         cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device (torch ") and "--smoke" in lines[0]
    assert not (tmp_path / "gc").exists()  # nothing ran, nothing written


def test_a_python_without_torch_is_one_line_and_exit_3(tmp_path):
    fake = tmp_path / "python"  # a python whose `import torch` fails
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path / "gc")],
                         cwd=REPO, env={**ENV, "PYTHON": str(fake)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == (f"gpu_check: {fake} cannot import torch: run it in the suite's environment "
                                            "(PYTHON=.venv/bin/python, after ./install.sh)"), lines
    assert not (tmp_path / "gc").exists()
