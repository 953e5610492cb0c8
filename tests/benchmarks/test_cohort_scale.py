"""benchmarks/cohort_scale.py at a smoke size (the 1113-subject run is the benchmark, not a test):
every stage runs as a user runs it and the JSON's figures are there and consistent."""
import json
import os
import subprocess
import sys


def test_cohort_scale_smoke(repo, tmp_path):
    out = tmp_path / "cohort_scale.json"
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / "cohort_scale.py"), "--subjects", "16",
                           "--steps", "2", "--damage", "2", "--batches", "40", "--work", str(tmp_path), "--out", str(out)],
                          cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.with_suffix(".png").name], "work folder left"
    [c] = d["counts"]
    pre = c["preprocess"]
    assert c["subjects"] == pre["subjects"] == pre["used"] == pre["processed"] == 16 and pre["failed"] == 0
    assert pre["rank0_bookkeeping_ms"] > 0 and pre["dispatch_ms"] > 0 and pre["manifest_writes"] >= 2
    assert sum(pre["subjects_per_rank"].values()) == 16 and pre["peak"]["rank"]["processes"] == 2
    assert c["verify"]["rc"] == 0
    reg = c["regenerate"]
    assert (reg["deleted"], reg["corrupted"], reg["restored_byte_identical"]) == (2, 2, True) and reg["redone"] >= 2
    first, resumed = c["train"]["first"], c["train"]["resumed"]
    assert first["steps"] == 2 and first["data_check"]["hashed"] == first["data_check"]["files"] > 0
    assert len(first["data_check"]["hashed_per_rank"]) == 2 and max(first["data_check"]["hashed_per_rank"]) < \
        first["data_check"]["files"]  # no rank opens every shard
    assert resumed["data_check"]["hashed"] == 0  # unchanged since hashed: nothing read
    bounded, unbounded = c["loader"]["bounded"], c["loader"]["unbounded"]
    assert bounded["batches"] == unbounded["batches"] == 40 and bounded["shards"] == first["data_check"]["files"]
    proj = d["projection"]
    assert [r["ranks"] for r in proj["by_ranks"]] == [64, 128, 256]
    assert proj["ceiling_subjects_per_s"] > proj["ceiling_subjects_per_s_before"]
