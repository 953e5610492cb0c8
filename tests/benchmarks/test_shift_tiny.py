"""benchmarks/shift.py --protocol tiny end to end (the CI smoke test of issues 19 and 30's harness):
real preprocessing at every level on the real-anatomy cohort (mni, 3 mm), every method trained by
udean.baselines.methods (UDEAN through `udean train`), scored by the one Evaluator on each level's
test volumes in every region (volume, head, brain); the mismatch case (HR of one anatomy, LR of
the other, through the own-data path) in both directions; a rerun resumes from the per-run
results and does nothing new; a work folder keeps one anatomy and one recipe."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
# CI runs two levels (a shift and none) and every method but UDEAN misaligned (which needs a
# second data set per level); every level's physics is tests/preprocessing/test_levels.py's, the
# misaligned data tests/preprocessing's.
LEVELS = ("truncation", "pf_noise")
METHODS = ("tricubic", "denoise", "sup_trunc", "oracle", "udean_unp", "cyclegan_unp", "dasr_unp")
# the mismatch case at one level, without sup_trunc (the registry path of the oracle with another
# degradation, and a truncation data set per direction more)
MISMATCH_METHODS = ("tricubic", "denoise", "oracle", "udean_unp")
ROW_KEYS = {"method", "level", "region", "data", "psnr_mean", "ssim_mean", "psnr_std", "ssim_std", "seeds"}
REGIONS = ("volume", "head", "brain")


def shift(tmp_path, *args, levels=LEVELS, methods=METHODS, results="results", work="work", check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "shift.py"), "--protocol", "tiny", "--jobs", "2",
                           "--work", str(tmp_path / work), "--results", str(tmp_path / results), *args,
                           "--levels", *levels, "--methods", *methods],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    if not check:
        return proc
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (doc,) = [json.loads(p.read_text()) for p in (tmp_path / results).glob("shift_*.json")]
    return proc.stdout, doc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shift")
    return tmp, *shift(tmp)


@pytest.fixture(scope="module")
def mismatch(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mismatch")
    return tmp, *shift(tmp, "--mismatch", levels=("pf_noise",), methods=MISMATCH_METHODS)


def test_every_level_method_and_region_has_a_row(tiny):
    from preprocessing.template import grid

    tmp, _, doc = tiny
    rows = doc["rows"]
    assert all(ROW_KEYS <= set(r) for r in rows)
    # the cohort is real anatomy with brain masks: every row in every region, the brain included
    assert doc["meta"]["anatomy"] == "mni"
    assert doc["meta"]["cohorts"] == {"mni": {"shape": list(grid(3.0)[0]), "voxel_mm": 3.0}}
    got = {(r["level"], r["method"], r["region"]) for r in rows}
    assert got == {(lv, m, reg) for lv in LEVELS for m in METHODS for reg in REGIONS}
    for r in rows:
        assert r["seeds"] == [0] and r["n"] == 2 and r["data"] == "synthetic"  # tiny: one seed, two test subjects
        assert all(math.isfinite(r[k]) for k in ("psnr_mean", "ssim_mean", "psnr_std", "ssim_std"))
    by = {(r["level"], r["method"], r["region"]): r["psnr_mean"] for r in rows}
    for lv, m, _ in got:  # three regions, three different sets of voxels
        assert len({by[lv, m, reg] for reg in REGIONS}) == 3
    prov = doc["meta"]["provenance"]
    assert prov["date"] and "benchmarks/shift.py --protocol tiny" in prov["command"] and prov["versions"]["dipy"]
    md = (tmp / "results" / "shift_tiny_mni.md").read_text()
    assert all(f"## {lv}" in md for lv in LEVELS) and "PSNR (head)" in md and "brain PSNR - tricubic" in md
    assert "anatomy: mni" in md and "Denoise (DIPY NLM, Rician) + tricubic" in md
    for files in doc["figures"].values():
        assert len(files) == 2 and all((REPO / f if not Path(f).is_absolute() else Path(f)).stat().st_size > 5_000
                                       for f in files)


def test_the_rows_follow_the_physics_of_the_levels(tiny):
    """Tricubic sees each level's own test LR: partial Fourier and noise make it worse than
    truncation alone everywhere; the harness's tricubic row is the Evaluator's on the level's test
    volumes, in the head and in the brain mask they store (the cohort's brainmask_fs)."""
    from preprocessing.manifest import load_manifest
    from preprocessing.shards import read_volume
    from udean.evaluate import Evaluator, tricubic

    tmp, _, doc = tiny
    tri = {(r["level"], r["region"]): r for r in doc["rows"] if r["method"] == "tricubic"}
    for region in REGIONS:
        assert tri["pf_noise", region]["psnr_mean"] < tri["truncation", region]["psnr_mean"] - 0.5
    test = [read_volume(p) for p in load_manifest(tmp / "work" / "data" / "pf_noise" / "unpaired").volume_paths("test")]
    assert all(v.brain is not None and 0 < v.brain.sum() < v.brain.size for v in test)
    (res,) = Evaluator({"t": lambda v: tricubic(v.lr, v.hr.shape)}, regions=("brain",)).run(test)
    for region in ("head", "brain"):
        assert tri["pf_noise", region]["psnr_mean"] == pytest.approx(res.stats(f"psnr_{region}")[0], abs=1e-9)


def test_one_model_on_truncated_lr_serves_every_level_and_udean_logs_its_fidelity(tiny):
    tmp, _, doc = tiny
    runs = {(r["method"], r["level"]): r for r in doc["runs"]}
    trunc = [runs["sup_trunc", lv] for lv in doc["meta"]["levels"]]
    assert len({json.dumps(r["info"], sort_keys=True) for r in trunc}) == 1  # the same training, scored per level
    # trained on truncation, sup_trunc is the oracle of the truncation level: the same pairs,
    # the same seeded start, the same steps -> the same scores
    rows = {(r["method"], r["level"], r["region"]): r for r in doc["rows"]}
    for region in REGIONS:
        assert rows["sup_trunc", "truncation", region]["psnr_mean"] == pytest.approx(
            rows["oracle", "truncation", region]["psnr_mean"], abs=1e-6)
    for lv in doc["meta"]["levels"]:
        fid = runs["udean_unp", lv]["info"]["fidelity"]
        assert fid and all({"noise_st", "noise_t", "profile_distance", "psnr_truth"} <= set(f) for f in fid)
        # the denoiser's strength is chosen on the paired val volume: the best of its val scores
        den = runs["denoise", lv]["info"]
        assert len(den["val_psnr_head"]) > 2
        assert den["val_psnr_head"][str(den["strength"])] == max(den["val_psnr_head"].values())


def test_the_fidelity_logs_move_with_adaptation_and_stay_without(tiny):
    """udean_fixed (every target-matching weight 0) against udean_unp at pf_noise: with the
    recipe's cycle_detach nothing moves its degradation, so its fidelity logs end where they
    began; the adapting run's do not. Both in the report's fidelity table."""
    tmp, _, doc = tiny
    out, fixed = shift(tmp, levels=("pf_noise",), methods=("udean_unp", "udean_fixed"), results="fixed")
    assert "1 run(s) to do" in out  # udean_unp is the cached run of the fixture
    runs = {r["method"]: r["info"]["fidelity"] for r in fixed["runs"]}
    for method, moves in (("udean_unp", True), ("udean_fixed", False)):
        fid = runs[method]
        assert [f["step"] for f in fid] == [1, 6]  # step 1 and the last (tiny: 6 steps)
        for key in ("psnr_truth", "noise_st", "profile_distance"):
            assert (abs(fid[-1][key] - fid[0][key]) > 1e-4) == moves, (method, key, fid)
    md = (tmp / "fixed" / "shift_tiny_mni.md").read_text()
    assert "| UDEAN, degradation not adapted, seed 0 | 6 |" in md and "| UDEAN, unpaired, seed 0 | 1 |" in md


def test_held_out_real_scans_are_scored_with_every_trained_model(tiny):
    """--real DIR: a folder of HR scans (here one cohort subject's NIfTI, as a user's held-out
    scan) is preprocessed at the level and scored with the cached models: rows of their own
    ("data": "real"; a flat folder has no brain masks: volume and head only), the synthetic rows
    unchanged, a table of its own in the report."""
    import shutil

    from preprocessing.manifest import load_manifest
    from udean.evaluate import Evaluator, tricubic

    tmp, _, doc = tiny
    real = tmp / "real"
    real.mkdir(exist_ok=True)
    shutil.copy(next((tmp / "work" / "cohort" / "mni").rglob("*_T1w_MPR1.nii.gz")), real / "scan.nii.gz")
    methods = ("tricubic", "sup_trunc", "udean_unp")
    out, got = shift(tmp, "--real", str(real), levels=("pf_noise",), methods=methods, results="real_results")
    assert "3 run(s) to do" in out  # every model cached: only the scoring of the real scan
    # the relaunch of `udean train` on the cached UDEAN run appended to its log, not over it
    (log,) = [p for p in (tmp / "work" / "weights").rglob("udean_unpaired.log") if p.read_text().count("$ ") == 2]
    first = log.read_text().split("$ ")[1]
    assert "resumed from" not in first and "done:" in first
    rows = {(r["method"], r["region"], r["data"]): r for r in got["rows"]}
    assert set(rows) == ({(m, reg, "synthetic") for m in methods for reg in REGIONS}
                         | {(m, reg, "real") for m in methods for reg in ("volume", "head")})
    for r in doc["rows"]:
        if r["level"] == "pf_noise" and r["method"] in methods:
            assert rows[r["method"], r["region"], "synthetic"]["psnr_mean"] == r["psnr_mean"]
    (vol,) = load_manifest(tmp / "work" / "real" / "pf_noise").volume_paths("test")
    (res,) = Evaluator({"t": lambda v: tricubic(v.lr, v.hr.shape)}).run([vol])
    assert rows["tricubic", "head", "real"]["psnr_mean"] == pytest.approx(res.stats("psnr_head")[0], abs=1e-9)
    assert got["meta"]["real"]["scans"] == 1
    md = (tmp / "real_results" / "shift_tiny_mni.md").read_text()
    assert "### pf_noise: real anatomy (held out)" in md and "held-out scan(s)" in md


def test_a_rerun_resumes_and_changes_nothing(tiny):
    tmp, _, doc = tiny
    out, again = shift(tmp)
    assert "0 run(s) to do" in out
    assert again["rows"] == doc["rows"]


def test_another_recipe_or_anatomy_in_the_same_work_folder_is_refused(tiny):
    """The per-run results are the work folder's recipe and anatomy: a rerun with another one
    must not report them as its own, nor write another anatomy's cohort beside them."""
    tmp, _, doc = tiny
    before = sorted(p.relative_to(tmp / "work") for p in (tmp / "work").rglob("*"))
    proc = shift(tmp, "loss.lambda_noise=0.5", results="other", check=False)
    assert proc.returncode != 0
    assert "another recipe or budget (differs in:" in proc.stderr and "lambda_noise" in proc.stderr, proc.stderr[-2000:]
    proc = shift(tmp, "--anatomy", "phantom", results="other", check=False)
    assert proc.returncode != 0
    assert "holds runs on the mni anatomy, this one is on phantom" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp / "other").exists() or not list((tmp / "other").glob("shift_*"))
    assert sorted(p.relative_to(tmp / "work") for p in (tmp / "work").rglob("*")) == before


# --------------------------------------------------------------------------- the mismatch case
def test_mismatch_data_are_made_as_specified(mismatch):
    """Per direction, through the own-data path: HR scans of one anatomy (byte copies of its
    cohort), LR and paired test scans of the other at the same voxel size, the LR the level's
    k-space degradation of the LR anatomy's scan (x2 coarser, LR affine = HR affine @ diag(2, 2,
    2, 1), noisy); no paired val; the template's HR skull-stripped, the phantom's full heads."""
    import nibabel as nib

    from benchmarks.shift import DIRECTIONS
    from preprocessing.manifest import load_manifest
    from preprocessing.shards import read_volume

    tmp, _, doc = mismatch
    work = tmp / "work"
    meta = doc["meta"]
    assert meta["anatomy"] == "mismatch" and meta["mismatch"] == {c: dict(zip(("hr", "lr"), a)) for c, a in DIRECTIONS.items()}
    assert {a: c["voxel_mm"] for a, c in meta["cohorts"].items()} == {"mni": 3.0, "phantom": 3.0}  # same voxel size
    outside = {}
    for case, (hr_anatomy, lr_anatomy) in DIRECTIONS.items():
        m = load_manifest(work / "data" / case / "pf_noise" / "unpaired")
        assert m.config["own"]["hr"] and m.config["degradation"]["level"] == "pf_noise"
        groups = {g: [r for r in m.subjects if r.group == g] for g in ("source", "target", "test")}
        assert [len(groups[g]) for g in ("source", "target", "test")] == [2, 2, 2]  # tiny counts 2/2/-/2
        assert all(r.id.startswith(f"{hr_anatomy}-") for r in groups["source"])
        assert all(r.id.startswith(f"{lr_anatomy}-") for r in groups["target"] + groups["test"])
        val = [read_volume(p) for p in m.volume_paths("val")]  # LR-only val volumes: no paired val
        assert val and all(v.hr is None for v in val)
        for r in groups["source"]:  # the HR anatomy's own scans, as the cohort wrote them
            sid = r.id.split("-")[1]
            cohort = work / "cohort" / hr_anatomy / sid / "unprocessed/3T/T1w_MPR1" / f"{sid}_3T_T1w_MPR1.nii.gz"
            assert Path(r.input).read_bytes() == cohort.read_bytes()
            vol = np.asarray(nib.load(r.input).dataobj, dtype=np.float32)
            brain = np.asarray(nib.load(work / "cohort" / hr_anatomy / sid / "T1w/brainmask_fs.nii.gz").dataobj) > 0
            bright = vol > 0.3 * vol[brain].mean()  # tissue, not background noise
            outside.setdefault(hr_anatomy, []).append((bright & ~brain).sum() / bright.sum())
        for r in groups["test"]:
            hr, lr = nib.load(r.input), nib.load(r.lr_input)
            assert Path(r.input).parent.name == "test_hr" and Path(r.lr_input).parent.name == "test_lr"
            assert tuple(hr.header.get_zooms()) == (3.0,) * 3 and tuple(lr.header.get_zooms()) == (6.0,) * 3
            assert lr.shape == tuple(n // 2 for n in hr.shape)
            np.testing.assert_allclose(lr.affine, hr.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    # the tissue of the HR scans: template brains (skull-stripped: all inside the brain mask) in one
    # direction, full heads (scalp, fat, skull: much of it outside) in the other
    assert max(outside["mni"]) < 0.05 and min(outside["phantom"]) > 0.25, outside


def test_mismatch_lr_is_the_levels_kspace_degradation(mismatch):
    """A target LR scan is the pf_noise degradation (partial Fourier, elliptical k-space, Rician
    noise with the subject's draws) of its HR scan, scaled as the data set scales HR."""
    import nibabel as nib

    from preprocessing import kspace, nifti
    from preprocessing.config import DataConfig
    from preprocessing.manifest import load_manifest
    from preprocessing.subject import STREAM_NOISE, subject_degradation, subject_rng

    tmp, _, _ = mismatch
    m = load_manifest(tmp / "work" / "data" / "hr_mni" / "pf_noise" / "unpaired")
    data = DataConfig(**m.config)
    (r, *_) = [r for r in m.subjects if r.group == "target"]
    sid = r.id.split("-")[1]
    hr_path = tmp / "work" / "cohort" / "phantom" / sid / "unprocessed/3T/T1w_MPR1" / f"{sid}_3T_T1w_MPR1.nii.gz"
    hr = kspace.even_crop(nifti.load_scan(hr_path, nifti.scan_spec(data, "HR")).data, (2, 2, 2))
    lr = np.asarray(nib.load(r.input).dataobj, dtype=np.float32)
    want = kspace.degrade(hr, subject_degradation(data, r.id), subject_rng(data.seed, r.id, STREAM_NOISE), 0)
    np.testing.assert_array_equal(lr, want)
    clean = kspace.degrade(hr, subject_degradation(data, r.id), None, 0, noise=False)
    assert 0.005 < np.std(lr - clean) < 0.02  # pf_noise's sigma 0.01, Rician


def test_mismatch_test_volumes_carry_the_cohorts_brain_masks(mismatch):
    """The own-data test volumes get their cohort brain mask on the HR grid by world
    coordinates: the same voxels as the cohort's mask where the grids coincide; the phantom's
    full heads have a head mask well beyond the brain, the template brains not."""
    import nibabel as nib

    from benchmarks.shift import DIRECTIONS, test_volumes
    from preprocessing.manifest import load_manifest
    from preprocessing.patches import canonical_affine
    from udean.evaluate import head_mask

    tmp, _, doc = mismatch
    work = tmp / "work"
    ratios: dict[str, list] = {}
    for case, (_, lr_anatomy) in DIRECTIONS.items():
        m = load_manifest(work / "data" / case / "pf_noise" / "unpaired")
        masks = {r.id: str(work / "cohort" / lr_anatomy / r.id.split("-")[1] / "T1w/brainmask_fs.nii.gz")
                 for r in m.subjects if r.group == "test"}
        cfg = json.loads((work / f"results_{case}" / "pf_noise" / "config.json").read_text())["configs"]["unpaired"]
        vols = test_volumes(cfg, masks)
        assert len(vols) == 2
        for v in vols:
            img = nib.load(masks[v.subject])
            cohort = np.asarray(img.dataobj) > 0
            canon = v.to_canonical(v.brain).astype(bool)
            to_cohort = np.linalg.inv(img.affine) @ canonical_affine(v.hr_affine, v.slice_axis)
            np.testing.assert_allclose(to_cohort[:3, :3], np.eye(3), atol=1e-6)  # the cohort's grid, shifted
            lo = np.rint(to_cohort[:3, 3]).astype(int)
            np.testing.assert_array_equal(canon, cohort[tuple(slice(a, a + n) for a, n in zip(lo, canon.shape))])
            ratios.setdefault(lr_anatomy, []).append(head_mask(v.hr).sum() / v.brain.sum())
    # the dilated head mask around a brain (3 mm voxels: about 1.6 x the brain) is far smaller
    # than around a full head (about 2.8 x)
    assert max(ratios["mni"]) < 2.0 < min(ratios["phantom"]), ratios


def test_mismatch_rows_score_each_direction_in_the_brain_and_head(mismatch):
    """Rows per direction in every region; the tricubic row is the Evaluator's on the same
    volumes with their brain masks; no paired val: the denoiser keeps DIPY's estimate (k = 1)
    and UDEAN's best/ is its last step (train.best_by auto: an LR-only val volume scores no PSNR)."""
    from benchmarks.shift import DIRECTIONS, test_volumes
    from udean.evaluate import Evaluator, tricubic

    tmp, _, doc = mismatch
    work = tmp / "work"
    rows = {(r["data"], r["method"], r["region"]): r for r in doc["rows"]}
    assert set(rows) == {(c, m, reg) for c in DIRECTIONS for m in MISMATCH_METHODS for reg in REGIONS}
    for case, (_, lr_anatomy) in DIRECTIONS.items():
        cfg = json.loads((work / f"results_{case}" / "pf_noise" / "config.json").read_text())["configs"]["unpaired"]
        masks = {}
        for p in (work / "mismatch" / case / "test_hr").iterdir():
            sid = p.name.split(".")[0]
            masks[sid] = str(work / "cohort" / lr_anatomy / sid.split("-")[1] / "T1w/brainmask_fs.nii.gz")
        (res,) = Evaluator({"t": lambda v: tricubic(v.lr, v.hr.shape)}, regions=("brain",)).run(test_volumes(cfg, masks))
        for region in ("head", "brain"):
            assert rows[case, "tricubic", region]["psnr_mean"] == pytest.approx(res.stats(f"psnr_{region}")[0], abs=1e-9)
    runs = {(r["data"], r["method"]): r for r in doc["runs"]}
    for case in DIRECTIONS:
        den = runs[case, "denoise"]["info"]
        assert den["strength"] == 1.0 and den["val_psnr_head"] == {} and "no paired val" in den["note"]
    (best, *_) = [json.loads(p.read_text()) for p in (work / "weights").rglob("udean_unpaired/best/best.json")]
    assert best["by"] == "last" and best["step"] == 6  # tiny: 6 steps
    md = (tmp / "results" / "shift_tiny_mismatch.md").read_text()
    assert "## pf_noise: HR template brains (skull-stripped), LR phantom full heads (`hr_mni`)" in md
    assert "## pf_noise: HR phantom full heads, LR template brains (skull-stripped) (`hr_phantom`)" in md
    assert "brain PSNR - tricubic" in md and "no paired val" in md


def test_denoise_without_dipy_is_refused_before_any_work(monkeypatch, capsys):
    """The DIPY row used to fail after every other run had trained: now the arguments are refused."""
    from benchmarks.shift import parse

    monkeypatch.setitem(sys.modules, "dipy.denoise.nlmeans", None)  # import fails as if DIPY were absent
    with pytest.raises(SystemExit) as exc:
        parse(["--methods", "tricubic", "denoise"])
    assert exc.value.code == 2 and "needs DIPY: pip install -e '.[bench]'" in capsys.readouterr().err
    assert parse(["--methods", "tricubic", "udean_unp"]).methods == ["tricubic", "udean_unp"]
