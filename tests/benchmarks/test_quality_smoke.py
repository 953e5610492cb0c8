"""benchmarks/quality.py --protocol tiny end to end (the CI smoke test): the real-anatomy cohort
(mni, 3 mm), real preprocessing (three data sets), every method trained (UDEAN through `udean
train` / DeepSpeed), every method scored by udean.evaluate's Evaluator on the same test volumes
(brain mask included), tables + figures written. The methods are trained by
udean.baselines.methods (the registry), the protocol is the script's."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quality_tiny_protocol_writes_both_tables_and_the_shift_study(tmp_path):
    res = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--protocol", "tiny",
                           "--out", str(tmp_path / "work"), "--results", str(res), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from benchmarks import quality

    doc = json.loads((res / "quality_tiny.json").read_text())
    # the real-anatomy cohort by default (the template's brain box at 3 mm), scored in its brain masks too
    from preprocessing.template import grid

    assert (doc["meta"]["anatomy"], doc["meta"]["voxel_mm"], doc["meta"]["shape"]) == ("mni", 3.0, list(grid(3.0)[0]))
    assert all("psnr_brain_mean" in r for r in doc["table_i"] + doc["table_ii"])
    assert [r["key"] for r in doc["table_i"]] == quality.TABLE_I
    assert [r["key"] for r in doc["table_ii"]] == quality.TABLE_II
    assert [r["key"] for r in doc["shift"]] == [k for k, _ in quality.SHIFT]
    for r in doc["table_i"] + doc["table_ii"]:
        assert r["n"] == 2 and all(math.isfinite(r[k]) for k in ("ssim_mean", "psnr_mean", "ssim_std", "psnr_std"))
        p = quality.PAPER[r["key"]]
        assert (r["paper"]["ssim_mean"], r["paper"]["psnr_mean"]) == (p[0], p[2])
    # every method scored on the same two test subjects
    subjects = {tuple(s["subject"] for s in r["subjects"]) for r in doc["table_i"] + doc["table_ii"]}
    assert len(subjects) == 1
    # the shift study really changes the test LR (realistic acquisition != k-space truncation)
    tri = next(r for r in doc["shift"] if r["key"] == "tricubic")
    assert tri["kspace"]["psnr_mean"] != tri["realistic"]["psnr_mean"]
    # benchmark 2's registration moved the HR closer to the truth; benchmark 1 had pairs
    reg = doc["methods"]["b2"]["registration"]
    assert reg and all(r["mae_registered"] < r["mae_moved"] for r in reg)
    assert doc["methods"]["b1"]["pairs"] > 0 and doc["methods"]["b1"]["steps"] == doc["meta"]["budget"]["steps"]
    prov = doc["meta"]["provenance"]
    assert prov["versions"]["torch"] and prov["date"] and "benchmarks/quality.py --protocol tiny" in prov["command"]
    assert str(REPO) not in prov["command"]  # paths inside the repository are written relative to it
    md = (res / "quality_tiny.md").read_text()
    assert "Table I" in md and "Table II" in md and "0.9247 ± 0.0097" in md and "Degradation shift" in md
    assert "anatomy: mni" in md and "PSNR (brain)" in md
    for f in doc["figures"]:
        assert Path(f).stat().st_size > 10_000
