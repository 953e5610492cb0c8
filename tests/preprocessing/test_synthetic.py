"""Synthetic HCP-like cohort: determinism, NIfTI layout, anatomy, folding, CLI, preview."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from preprocessing.cohort import cohort_ready, preview, write_cohort
from preprocessing.discover import HCP_T1W
from preprocessing.synthetic import CSF, DEEP_GM, GM, LABEL_NAMES, SCALP, SKULL, VENTRICLES, WM, synth_subject

SMALL = (96, 96, 80)
ODD = (65, 72, 47)


@pytest.fixture(scope="module")
def subject():
    return synth_subject(7, SMALL, return_labels=True)


def test_same_seed_same_arrays_other_seed_differs():
    a, aff_a = synth_subject(3, ODD)
    b, aff_b = synth_subject(3, ODD)
    c, _ = synth_subject(4, ODD)
    assert a.shape == ODD and a.dtype == np.int16
    assert np.array_equal(a, b) and np.array_equal(aff_a, aff_b)
    assert not np.array_equal(a, c)


def test_affine_is_07mm_centred(subject):
    vol, aff, labels = subject
    assert labels.shape == vol.shape == SMALL and labels.dtype == np.uint8
    assert np.allclose(np.abs(np.diag(aff)[:3]), 0.7)
    centre = aff @ np.array([(n - 1) / 2 for n in SMALL] + [1.0])
    assert np.allclose(centre[:3], 0.0, atol=0.7)


def test_cohort_files_byte_identical_for_same_seed(tmp_path):
    a = write_cohort(tmp_path / "a", 2, SMALL, seed=11, progress=False)
    b = write_cohort(tmp_path / "b", 2, SMALL, seed=11, progress=False)
    c = write_cohort(tmp_path / "c", 2, SMALL, seed=12, progress=False)
    for pa, pb, pc in zip(a, b, c):
        assert Path(pa).read_bytes() == Path(pb).read_bytes()
        assert Path(pa).read_bytes() != Path(pc).read_bytes()
    # ids are six digits and the files sit where HCP puts them
    for p in a:
        sid = Path(p).parents[3].name
        assert len(sid) == 6 and sid.isdigit()
        assert Path(p) == tmp_path / "a" / HCP_T1W.format(subject=sid)
    # a rerun recognises a cohort of this size and shape (and only that)
    assert cohort_ready(tmp_path / "a", 2, SMALL)
    assert not cohort_ready(tmp_path / "a", 3, SMALL) and not cohort_ready(tmp_path / "a", 2, ODD)
    # a cohort's first subjects do not depend on its size
    d = write_cohort(tmp_path / "d", 1, SMALL, seed=11, progress=False)
    assert Path(d[0]).read_bytes() == Path(a[0]).read_bytes()
    # overwriting leaves no temp files behind
    write_cohort(tmp_path / "a", 2, SMALL, seed=11, progress=False)
    assert not [p for p in (tmp_path / "a").rglob("*") if p.name.startswith(".")]


def test_nifti_loads_with_affine_as_sform_and_qform(tmp_path):
    import nibabel as nib

    (path,) = write_cohort(tmp_path, 1, SMALL, seed=5, progress=False)
    img = nib.load(path)
    vol, aff = synth_subject(int(np.random.SeedSequence(5, spawn_key=(0,)).generate_state(1, np.uint64)[0]), SMALL)
    assert img.shape == SMALL
    assert img.get_data_dtype() == np.int16
    assert np.allclose(img.header.get_zooms(), (0.7, 0.7, 0.7))
    assert np.allclose(img.affine, aff)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert np.allclose(img.get_qform(), aff, atol=1e-5)
    assert np.array_equal(np.asarray(img.dataobj), vol)


def test_cli_writes_cohort_at_hcp_path(tmp_path):
    out = tmp_path / "cohort"
    udean = Path(sys.executable).parent / "udean"
    res = subprocess.run([str(udean), "cohort", "--anatomy", "phantom", "--n", "3", "--shape", *map(str, SMALL),
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    files = sorted(out.glob(HCP_T1W.format(subject="*")))
    assert len(files) == 3
    assert str(out.resolve()) in res.stdout.replace("\n", "")


@pytest.mark.parametrize("argv, message", [
    (["--n", "0", "--out", "x"], "at least 1"),
    (["--n", "2", "--out", "x", "--anatomy", "phantom", "--shape", "16", "96", "80"], "at least 32"),
    (["--n", "2", "--out", "x", "--shape", "64", "64", "48"], "--shape is the phantom's"),  # mni: the template's box
    (["--n", "2", "--out", "x", "--voxel-mm", "0"], "--voxel-mm must be positive"),
    (["--n", "2"], "--out"),
])
def test_cli_bad_arguments_fail_with_a_clear_message(tmp_path, monkeypatch, capsys, argv, message):
    from udean.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["cohort", *argv]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err
    assert not (tmp_path / "x").exists()


def test_api_rejects_bad_values():
    with pytest.raises(ValueError, match="at least 32"):
        synth_subject(0, (96, 31, 80))
    with pytest.raises(ValueError, match="at least 1"):
        write_cohort("unused", 0, SMALL)


def test_every_tissue_present_with_plausible_fractions(subject):
    vol, _, labels = subject
    counts = np.bincount(labels.ravel(), minlength=8)
    assert all(counts[k] > 0 for k in LABEL_NAMES), counts
    brain = counts[GM] + counts[WM] + counts[DEEP_GM]
    head = counts[1:].sum()
    assert 0.25 < brain / head < 0.7
    assert 0.25 < counts[GM] / brain < 0.65
    assert 0.005 < counts[DEEP_GM] / brain < 0.1
    assert counts[VENTRICLES] / brain < 0.08
    assert counts[SCALP] / head > 0.1 and counts[SKULL] / head > 0.05


def test_t1w_contrast_order(subject):
    vol, _, labels = subject
    mean = {k: vol[labels == k].mean() for k in LABEL_NAMES}
    assert mean[WM] > mean[DEEP_GM] > mean[GM] > mean[CSF] > mean[SKULL]
    assert mean[CSF] > 0 and mean[VENTRICLES] < mean[GM]
    assert 600 < mean[WM] < 1400  # realistic int16 scale (bias field and noise included)
    assert vol[labels == 0].mean() < 0.1 * mean[WM]  # Rician background


THETA = np.linspace(0, 2 * np.pi, 360, endpoint=False)
LATERAL = np.abs(np.cos(THETA)) > 0.3  # rays away from the interhemispheric fissure


def _boundary_radii(inside: np.ndarray, centre):
    """Outermost radius (voxels) of `inside` along rays in the axial plane through `centre`."""
    theta = THETA
    r = np.arange(0, max(inside.shape), 0.25)
    x = np.rint(centre[0] + np.cos(theta)[:, None] * r).astype(int)
    y = np.rint(centre[1] + np.sin(theta)[:, None] * r).astype(int)
    ok = (x >= 0) & (x < inside.shape[0]) & (y >= 0) & (y < inside.shape[1])
    hit = np.zeros_like(ok)
    hit[ok] = inside[x[ok], y[ok], int(centre[2])]
    return np.array([r[np.nonzero(h)[0].max()] if h.any() else 0.0 for h in hit])


def _high_pass_std(radii, window=9):
    """Spread of the radii about their 9-degree moving average, lateral rays only."""
    pad = np.concatenate([radii[-window:], radii, radii[:window]])
    smooth = np.convolve(pad, np.ones(window) / window, "same")[window:-window]
    return float(np.std((radii - smooth)[LATERAL]))


def test_cortex_is_folded(subject):
    vol, _, labels = subject
    brain = np.isin(labels, (GM, WM, DEEP_GM, VENTRICLES))
    centre = np.argwhere(brain).mean(0)
    centre[2] += 0.2 * (np.argwhere(brain)[:, 2].max() - centre[2])  # above the deep nuclei
    wm = _boundary_radii(labels == WM, centre)
    pial = _boundary_radii(brain, centre)
    intracranial = _boundary_radii(brain | (labels == CSF), centre)  # smooth by construction
    # the GM/WM boundary wiggles within a few degrees (gyri, sulci); a smooth surface does not
    assert _high_pass_std(wm) > 2 * _high_pass_std(intracranial)
    assert _high_pass_std(wm) > 0.8  # voxels
    thickness = (pial - wm)[LATERAL]  # GM (+ sulcal CSF) depth above the WM varies a lot
    assert thickness.std() / thickness.mean() > 0.3


def test_preview_png_has_three_panels(tmp_path):
    import matplotlib.pyplot as plt

    (path,) = write_cohort(tmp_path / "c", 1, SMALL, seed=2, progress=False)
    subject_dir = Path(path).parents[3]
    png = preview(subject_dir, tmp_path / "p.png")
    img = plt.imread(png)
    h, w = img.shape[:2]
    assert w > 2.4 * h
    grey = img[..., :3].mean(-1)
    for third in np.array_split(grey, 3, axis=1):
        assert third.max() > 0.5  # every panel holds a bright head
    assert preview(path, tmp_path / "q.png").exists()  # a NIfTI file works too
    with pytest.raises(FileNotFoundError):
        preview(tmp_path / "missing", tmp_path / "r.png")
