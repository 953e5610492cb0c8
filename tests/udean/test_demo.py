"""`udean demo --quick`: the real pipeline (cohort, mpirun preprocessing, DeepSpeed training,
evaluation) on the smallest data; the outputs exist and are well formed. The full demo (and its
'SR beats tricubic' claim) is run by hand: `udean demo` (see README)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BIN = Path(sys.executable).parent


@pytest.mark.timeout(900)
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    proc = subprocess.run([str(BIN / "udean"), "demo", "--out", str(out), "--quick"], env=env,
                          capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # every stage left its output under --out
    assert (out / "config.yaml").is_file()
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert all(s["status"] == "ok" for s in manifest["subjects"]) and len(manifest["subjects"]) == 6
    assert (out / "run" / "best" / "generator.pt").is_file()

    doc = json.loads((out / "eval" / "results.json").read_text())
    names = [m["method"] for m in doc["methods"]]
    assert names[0] == "Tricubic interpolation" and names[-1] == "UDEAN (ours)"
    for m in doc["methods"]:
        assert m["n"] == 1 and np.isfinite(m["psnr_mean"]) and -1 <= m["ssim_mean"] <= 1
    md = (out / "eval" / "results.md").read_text()
    assert "| Tricubic interpolation |" in md and "| UDEAN (ours) |" in md
    figs = list((out / "eval").glob("fig_*.png"))
    assert len(figs) == 1 and figs[0].read_bytes()[:4] == b"\x89PNG"
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) >= {"cohort", "preprocess", "train", "evaluate", "total"}

    # where the results are is printed
    printed = " ".join(proc.stdout.split())
    assert "results.md" in printed and "fig_" in printed

    # geometry on the real preprocessed data: the SR affine of a test LR volume is its HR affine,
    # and `udean infer` on that LR as a NIfTI writes an SR volume on the HR grid
    import nibabel as nib

    from preprocessing.shards import read_volume
    from udean.infer import sr_affine

    v = read_volume(sorted((out / "data" / "volumes" / "test").glob("*.h5"))[0]).canonical
    np.testing.assert_allclose(sr_affine(v.lr_affine), v.hr_affine, atol=1e-9)
    nib.save(nib.Nifti1Image(v.lr, v.lr_affine), tmp_path / "lr.nii.gz")
    proc = subprocess.run([str(BIN / "udean"), "infer", "--checkpoint", str(out / "run"), str(tmp_path / "lr.nii.gz"),
                           str(tmp_path / "sr.nii.gz"), "--device", "cpu"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sr = nib.load(tmp_path / "sr.nii.gz")
    assert sr.shape == v.hr.shape
    np.testing.assert_allclose(sr.affine, v.hr_affine, atol=1e-5)

    # a rerun resumes: the cohort is kept, nothing is recomputed from scratch
    proc = subprocess.run([str(BIN / "udean"), "demo", "--out", str(out), "--quick"], env=env,
                          capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kept" in proc.stdout
