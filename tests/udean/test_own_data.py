"""Your own data, end to end (README "Your own data"): an HR folder (1 mm, some off-grid) and a
folder of authentic 2 mm LR scans made by a degradation the code does not implement (Gaussian
PSF + 2 mm sampling + Rician noise; tests/preprocessing/test_roles.py), in LPS / PIR / oblique
orientations, int16, different fields of view, with bad files among them ->
`mpirun -n 2 udean preprocess --hr --lr` -> `udean train` (real DeepSpeed) -> `udean infer` on
the LR folder, `udean export`, `udean evaluate`."""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from preprocessing.manifest import load_manifest
from tests.conftest import BIN
from tests.preprocessing.test_roles import write_scan

GOOD_LR = {"l0": dict(shape=(24, 26, 22)), "l1": dict(shape=(26, 28, 20), axcodes="LPS"),
           "l2": dict(shape=(22, 24, 24), rotation=(0.1, -0.05, 0.08)), "l3": dict(shape=(24, 24, 22), axcodes="PIR")}
BAD = {"l_4mm": "2.00x off the LR grid of 2 mm", "l_4d": "expected a 3D image, got 4D",
       "hr_as_lr": "an HR scan given as LR", "dup": "unique across roles"}


def udean(args, cwd, ranks=1, timeout=300):
    cmd = [str(BIN / "udean"), *map(str, args)]
    if ranks > 1:
        cmd = [str(BIN / "mpirun"), "--oversubscribe", "-n", str(ranks), "-x", "OMP_NUM_THREADS=1", *cmd]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def ok(r) -> str:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return " ".join((r.stdout + r.stderr).split())  # rich wraps long lines


def cli(args, cwd, capsys) -> tuple[int, str]:
    """`udean ARGS` in this process (no start-up cost: commands that start no process group)."""
    from udean.cli import main

    here = os.getcwd()
    os.chdir(cwd)
    try:
        rc = main([str(a) for a in args])
    finally:
        os.chdir(here)
    out = capsys.readouterr()
    return rc, " ".join(re.sub("[\u2500-\u257f]", " ", out.out + out.err).split())  # without table borders


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Path:
    """The scans, preprocessed with 2 MPI ranks, and a short training run with validation."""
    root = tmp_path_factory.mktemp("own")
    for i, shape in enumerate([(48, 52, 44), (46, 50, 42), (50, 52, 46), (44, 48, 40)]):
        write_scan(root / "hr" / f"h{i}.nii.gz", shape, 1.0, seed=i)
    write_scan(root / "hr" / "h_12.nii.gz", (40, 44, 36), 1.2, axcodes="LPS")  # resampled to 1 mm
    write_scan(root / "hr" / "h_aniso.nii.gz", (48, 52, 30), (1.0, 1.0, 1.5))  # resampled to 1 mm
    write_scan(root / "hr" / "dup.nii.gz", (48, 52, 44), 1.0)
    for i, (name, kw) in enumerate(GOOD_LR.items()):
        write_scan(root / "lr" / f"{name}.nii.gz", voxel=2.0, lr=True, seed=10 + i, **kw)
    write_scan(root / "lr" / "l_4mm.nii.gz", (12, 13, 11), 4.0, lr=True)  # 4 x the HR voxel
    write_scan(root / "lr" / "hr_as_lr.nii.gz", (48, 52, 44), 1.0)
    write_scan(root / "lr" / "dup.nii.gz", (24, 26, 22), 2.0, lr=True)
    nib.save(nib.Nifti1Image(np.ones((24, 26, 22, 2), np.int16), np.diag([2.0, 2, 2, 1])), str(root / "lr" / "l_4d.nii.gz"))

    # no --voxel-size: the grid comes from the scans (1 mm HR, 2 mm LR; preprocessing/plan.py)
    r = udean(["preprocess", "--config", "tiny", "--hr", "hr", "--lr", "lr", "--out", "data", "--no-progress"], root,
              ranks=2)
    # failed subjects make the exit code 1 (docs/data-format.md "Commands"); the manifest says which
    assert r.returncode == 1 and f"{len(BAD)} of " in r.stderr and "subjects failed" in r.stderr, r.stderr[-3000:]
    (root / "preprocess.log").write_text(" ".join(r.stderr.split()))
    train = ok(udean(["train", "--config", "tiny", "data.out=data", "train.out=run", "train.epochs=2",
                      "train.steps_per_epoch=2"], root))
    (root / "train.log").write_text(train)
    return root


def test_preprocess_by_role_every_bad_file_fails_alone_naming_it(own):
    m = load_manifest(own / "data")
    rows = {r.id: r for r in m.subjects}
    log = (own / "preprocess.log").read_text()
    # the grid planned from the scans, said before any work; failures are not counted as processed
    assert m.config["voxel_size_mm"] == 1.0 and m.config["own"]["grid"] == "planned"
    assert "plan: HR grid 1 mm, LR grid 2 mm (planned from the 6 HR scans" in log
    assert f"preprocess: 10 processed, 0 reused, {len(BAD)} failed" in log
    for sid, text in BAD.items():
        assert rows[sid].status == "failed" and text in rows[sid].error, rows[sid]
        assert rows[sid].input in rows[sid].error and not rows[sid].shards
        assert f"subject {sid} failed" in log
    assert str(own / "hr" / "dup.nii.gz") in rows["dup"].error and str(own / "lr" / "dup.nii.gz") in rows["dup"].error
    good = [r for r in m.subjects if r.id not in BAD]
    assert len(good) == 10 and all(r.status == "ok" for r in good)
    assert {r.id for r in good if r.group == "target"} == set(GOOD_LR)
    assert all(r.lr_source == "acquired" and r.scans["lr"]["voxel_mm"] == [2.0] * 3 for r in good if r.group == "target")
    held = [r for r in good if r.group in ("val", "test")]
    assert sorted(r.group for r in held) == ["test", "val"] and all(r.lr_source == "synthetic" for r in held)
    # off-grid HR scans: resampled, recorded per subject, said once in the log
    for sid, vox in (("h_12", [1.2] * 3), ("h_aniso", [1.0, 1.0, 1.5])):
        rec = rows[sid].scans["hr"]
        assert rec["resampled"] and rec["input_voxel_mm"] == pytest.approx(vox) and rec["voxel_mm"] == pytest.approx([1.0] * 3)
        assert log.count(f"subject {sid}: HR scan resampled") == 1
    assert not rows["h0"].scans["hr"]["resampled"] and rows["h0"].scans["hr"]["intensity"]["method"] == "percentile"
    # patches: source HR from the HR scans, target LR from the LR scans as acquired; an LR-only val volume
    assert len(m.shard_paths("target")) == 4 and len(m.shard_paths("source")) == 4
    vals = m.volume_paths("val")
    assert len(vals) == 2 and len(m.volume_paths("test")) == 1


def test_training_validates_without_paired_hr_and_writes_best_and_last(own, capsys):
    val = [json.loads(line) for line in (own / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [v for v in val if v.get("kind") == "val"]
    assert len(val) == 2 and all(np.isfinite(v["lr_psnr"]) and np.isfinite(v["psnr"]) for v in val)
    assert all(v["volumes"] == 2 and v["hr_volumes"] == 1 for v in val)  # one synthetic pair, one LR-only
    assert all(isinstance(v["volumes"], int) for v in val) and "volumes 2 hr_volumes 1" in (own / "train.log").read_text()
    best = json.loads((own / "run" / "best" / "best.json").read_text())
    assert best["input"]["intensity"] == "percentile" and best["input"]["voxel_mm"] == 2.0
    # the held-out pair's LR is k-space truncation, not the target's degradation: best/ is not chosen by
    # its PSNR but by the held-out HR degraded with the model's own learned degradation, each step
    # against the previous best rescored on that same LR; the run says so
    assert best["by"] == "learned" and "learned degradation" in best["criterion"]
    assert "best_learned_psnr" not in val[0] and all(np.isfinite(v["learned_psnr"]) for v in val)
    chosen = val[0]["step"]
    for v in val[1:]:
        if v["learned_psnr"] > v["best_learned_psnr"]:
            chosen = v["step"]
    assert best["step"] == chosen and best["value"] == next(v["learned_psnr"] for v in val if v["step"] == chosen)
    log = (own / "train.log").read_text()
    assert "best/ is chosen by learned" in log and f"best/ is step {chosen}, chosen by learned" in log
    last = json.loads((own / "run" / "last" / "last.json").read_text())
    assert last["step"] == 4 and last["input"] == best["input"]
    # the evaluator's tables say where the LR came from
    rc, out = cli(["evaluate", "--config", "tiny", "--checkpoint", "run", "--data", "data", "--group", "val",
                   "--out", "eval", "--figures", "0", "--device", "cpu"], own, capsys)
    assert rc == 0, out
    doc = json.loads((own / "eval" / "results.json").read_text())
    assert doc["lr_sources"] == {"acquired": 1, "synthetic": 1} and "acquired" in out
    ours = doc["methods"][-1]
    assert ours["n"] == 2 and ours["n_hr"] == 1 and np.isfinite(ours["lr_psnr_mean"])
    assert {s["lr_source"] for s in ours["subjects"]} == {"acquired", "synthetic"}
    assert "1 acquired (authentic scans), 1 synthetic" in (own / "eval" / "results.md").read_text()


def test_infer_a_folder_of_clinical_scans(own, capsys):
    rc, text = cli(["infer", "--config", "tiny", "--checkpoint", "run", "lr", "sr", "--device", "cpu"], own, capsys)
    assert rc == 1, text  # bad files among the scans: reported, skipped, the exit code says so
    assert sorted(p.name for p in (own / "sr").iterdir()) == sorted(f"{n}.nii.gz" for n in [*GOOD_LR, "dup"])
    for name in ("l_4mm", "l_4d", "hr_as_lr"):
        assert f"skipped: {own / 'lr' / name}.nii.gz" in text or f"skipped: lr/{name}.nii.gz" in text
    assert "5 of 8 scans super-resolved, 3 failed" in text
    for name in GOOD_LR:
        src, sr = nib.load(own / "lr" / f"{name}.nii.gz"), nib.load(own / "sr" / f"{name}.nii.gz")
        assert sr.shape == tuple(2 * n for n in src.shape) and sr.get_data_dtype() == np.float32
        np.testing.assert_allclose(sr.header.get_zooms(), np.asarray(src.header.get_zooms()) / 2, atol=1e-5)
        assert nib.aff2axcodes(sr.affine) == nib.aff2axcodes(src.affine)  # the input's orientation
        # the convention (udean/infer.py): canonical SR voxel i at canonical LR voxel i / 2; the first
        # voxels (canonical order) at the same world position, obliquity kept
        cs, cl = nib.as_closest_canonical(sr), nib.as_closest_canonical(src)
        np.testing.assert_allclose(cs.affine, cl.affine @ np.diag([0.5, 0.5, 0.5, 1.0]), atol=1e-4)
        np.testing.assert_allclose(cs.affine[:3, 3], cl.affine[:3, 3], atol=1e-4)
        # the input's intensity units: within its range, reaching its bright tissue, the same level
        x, y = np.asarray(src.dataobj, dtype=np.float32), sr.get_fdata()
        assert x.min() - 1e-3 <= y.min() and y.max() <= x.max() + 1e-3
        assert y.max() > 0.85 * np.percentile(x, 99.9), (y.max(), x.max())
        head_x, head_y = x[x > x.mean()], y[y > y.mean()]
        assert abs(np.median(head_y) - np.median(head_x)) < 0.1 * np.median(head_x)


def test_export_and_every_checkpoint_form(own, capsys):
    rc, text = cli(["export", "run", "--step", "2"], own, capsys)
    assert rc == 0 and "run/export/step_00000002/generator.pt" in text, text
    exported = own / "run" / "export" / "step_00000002"
    assert json.loads((exported / "export.json").read_text())["step"] == 2
    lr = own / "lr" / "l1.nii.gz"
    outs = {}
    for name, ckpt in (("step", own / "run" / "checkpoints" / "step_00000004"), ("last", own / "run" / "last"),
                       ("pt", own / "run" / "last" / "generator.pt"), ("export2", exported)):
        rc, text = cli(["infer", "--config", "tiny", "--checkpoint", ckpt, lr, f"{name}.nii.gz", "--device", "cpu"],
                       own, capsys)
        assert rc == 0, text
        outs[name] = nib.load(own / f"{name}.nii.gz").get_fdata()
    # the training checkpoint of the last step, read through export, is last/
    np.testing.assert_array_equal(outs["step"], outs["last"])
    np.testing.assert_array_equal(outs["pt"], outs["last"])
    a = torch.load(exported / "generator.pt", weights_only=True)
    assert set(a) == set(torch.load(own / "run" / "last" / "generator.pt", weights_only=True))
    rc, text = cli(["export", "run", "--step", "3"], own, capsys)
    assert rc == 2 and "no complete training checkpoint of step 3" in text


def test_a_run_without_validation_still_has_best_and_last(own):
    ok(udean(["train", "--config", "tiny", "data.out=data", "train.out=noval", "train.val_every=0",
              "train.steps_per_epoch=2"], own))
    best = json.loads((own / "noval" / "best" / "best.json").read_text())
    assert best["by"].startswith("none") and best["step"] == 2
    a = torch.load(own / "noval" / "best" / "generator.pt", weights_only=True)
    b = torch.load(own / "noval" / "last" / "generator.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_folder_errors_are_one_line_before_any_work(tmp_path, capsys):
    write_scan(tmp_path / "hr" / "a.nii.gz", (40, 40, 36), 1.0)
    (tmp_path / "empty").mkdir()
    rc, err = cli(["preprocess", "--config", "tiny", "--hr", "hr", "--lr", "empty", "--out", "data", "--no-progress"],
                  tmp_path, capsys)
    assert rc == 2 and f"data.own.lr {tmp_path / 'empty'}: no NIfTI files" in err and "Traceback" not in err
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_lr_consistency_is_a_score_that_needs_no_hr():
    """`lr_psnr`: the prediction decimated back with the model's own decimation vs the LR. A
    prediction off the HR whose decimation is the LR by a constant c scores exactly
    -20 log10(c) dB (the decimation kernel sums to 1). An LR-only volume gets only this score,
    and the tables say its LR was acquired."""
    from preprocessing.shards import VolumePair
    from udean import evaluate
    from udean.models.layers import downsample2

    rng = np.random.default_rng(0)
    hr = torch.nn.functional.avg_pool3d(torch.as_tensor(rng.random((1, 1, 16, 40, 36)), dtype=torch.float32), 3, 1,
                                        1)[0, 0].numpy()
    lr = downsample2(torch.as_tensor(hr)[None])[0].numpy()
    only = VolumePair(None, lr, None, np.diag([0.5, 0.5, 0.5, 1]), np.eye(4), "x", "val", lr_source="acquired")
    paired = VolumePair(hr, lr, np.ones(hr.shape, np.uint8), np.eye(4), np.diag([2.0, 2, 2, 1]), "p", "val")
    res = {r.name: r for r in evaluate.Evaluator({"near": lambda v: hr + 0.01, "off": lambda v: hr + 0.1}).run(
        [only, paired])}
    off, near = res["off"], res["near"]
    assert [s["lr_source"] for s in off.subjects] == ["acquired", "synthetic"]
    assert set(off.subjects[0]) == {"subject", "lr_source", "lr_psnr"} and "psnr" in off.subjects[1]
    assert off.mean("lr_psnr") == pytest.approx(20.0, abs=1e-3) and near.mean("lr_psnr") == pytest.approx(40.0, abs=1e-2)
    assert off.mean("psnr") == pytest.approx(20.0, abs=1e-3)  # over the one volume with HR
    d = off.to_dict()
    assert d["n"] == 2 and d["n_hr"] == 1 and d["lr_sources"] == {"acquired": 1, "synthetic": 1}
    md = evaluate.markdown(list(res.values()), {"group": "val"})
    assert "| x | acquired | – | – |" in md and "1 acquired (authentic scans), 1 synthetic" in md


def test_a_bright_outlier_survives_inference_within_the_input_range(own, capsys):
    """Voxels above the percentile scaling's bright bound (a contrast-enhanced vessel) are not
    clipped on the way back to the input's units: the SR reaches the outlier's level, never
    beyond the input's own range, and leaves the rest of the scan as it was."""
    src = nib.load(own / "lr" / "l0.nii.gz")
    x = np.asarray(src.dataobj, dtype=np.float32)
    bright = x.copy()
    c = tuple(n // 2 for n in x.shape)
    # a thin vessel, 3 voxels at 3x the scan's max: far fewer than the 0.5 % of head voxels above the
    # percentile bound, so the bound stays at the tissue's level and the vessel lies beyond it
    bright[c[0], c[1], c[2] - 1:c[2] + 2] = 3 * x.max()
    (own / "bright").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(bright, src.affine, src.header), own / "bright" / "b.nii.gz")
    for name, scan in (("b", own / "bright" / "b.nii.gz"), ("plain", own / "lr" / "l0.nii.gz")):
        rc, text = cli(["infer", "--config", "tiny", "--checkpoint", "run", scan, f"{name}_sr.nii.gz", "--device", "cpu"],
                       own, capsys)
        assert rc == 0, text
    y, plain = (nib.load(own / f"{n}_sr.nii.gz").get_fdata() for n in ("b", "plain"))
    assert 0.9 * bright.max() <= y.max() <= bright.max() + 1e-3, (y.max(), bright.max(), plain.max())
    assert y.min() >= bright.min() - 1e-3
    # away from the vessel (the network's context: a few LR voxels) the SR is the plain scan's, up to the
    # percentile bounds the vessel moved a little
    far = np.ones(y.shape, bool)
    far[2 * c[0] - 12:2 * c[0] + 14, 2 * c[1] - 12:2 * c[1] + 14, 2 * c[2] - 12:2 * c[2] + 14] = False
    assert np.median(np.abs(y[far] - plain[far])) < 0.02 * np.percentile(x, 99)
