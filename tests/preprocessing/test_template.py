"""The real-anatomy cohort (preprocessing/template.py, `udean cohort --anatomy mni`): real anatomy
from the ICBM152 template, distinct subjects, deterministic files, brain masks on the scan's grid
that preprocessing stores and the evaluator scores. At 3 mm (coarse, anti-aliased) for speed."""
from __future__ import annotations

import dataclasses

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocessing.cohort import cohort_ready, cohort_shape, subject_path, write_cohort
from preprocessing.discover import HCP_BRAINMASK, HCP_T1W
from preprocessing.template import grid, load_template, template_subject

VOX = 3.0


@pytest.fixture(scope="module")
def two():
    return template_subject(1, VOX), template_subject(2, VOX)


def _template_on(shape, affine) -> np.ndarray:
    """The undeformed template T1 resampled onto a subject grid (what every subject derives from)."""
    from scipy import ndimage

    tpl = load_template()
    m = np.linalg.inv(tpl.affine) @ affine
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    coords = m[:3, :3] @ ijk + m[:3, 3:4]
    return ndimage.map_coordinates(ndimage.gaussian_filter(tpl.t1, 0.4 * VOX), coords, order=1).reshape(shape)


def test_subjects_are_deterministic_real_anatomy_and_differ(two):
    (a, aff_a, brain_a), (b, aff_b, brain_b) = two
    again, aff_again, brain_again = template_subject(1, VOX)
    assert np.array_equal(a, again) and np.array_equal(aff_a, aff_again) and np.array_equal(brain_a, brain_again)
    assert a.dtype == np.int16 and brain_a.dtype == np.uint8 and a.shape == brain_a.shape == grid(VOX)[0]
    assert np.allclose(np.diag(aff_a)[:3], VOX) and np.array_equal(aff_a, aff_b)  # one grid for every subject
    tpl = _template_on(a.shape, aff_a)
    inside = brain_a > 0

    def dice(x, y):
        return 2 * (x & y).sum() / (x.sum() + y.sum())

    # real anatomy: every subject is the template, moved and deformed (a few mm, a few degrees) ...
    assert min(dice(m > 0, tpl > 0.05) for m in (brain_a, brain_b)) > 0.88
    for v, m in ((a, brain_a), (b, brain_b)):  # ... its intensities the template's, not a mirror's
        i = m > 0
        c = np.corrcoef(v[i].astype(np.float64), tpl[i])[0, 1]
        assert c > np.corrcoef(v[i].astype(np.float64), tpl[:, :, ::-1][i])[0, 1] + 0.1, c
    # ... but not the same brain twice: deformation, contrast, bias and noise differ
    assert not np.array_equal(a, b) and dice(brain_a > 0, brain_b > 0) < 0.95
    # the brain mask holds the brain: bright inside, dark (background noise) outside
    assert 0.2 < inside.mean() < 0.6
    assert np.median(a[inside]) > 10 * np.median(a[~inside])


def test_bad_voxel_and_missing_nilearn_are_one_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="voxel_mm must be >= the template's 1.0 mm"):
        template_subject(0, 0.5)
    with pytest.raises(ValueError, match="--shape is the phantom's"):
        cohort_shape("mni", (64, 64, 48))
    import importlib.util

    from preprocessing import template

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install nilearn"):
        template.template_dir()


def test_cohort_files_deterministic_with_brain_masks_on_their_grid(tmp_path):
    a = write_cohort(tmp_path / "a", 2, seed=3, progress=False, anatomy="mni", voxel_mm=VOX)
    b = write_cohort(tmp_path / "b", 2, seed=3, progress=False, anatomy="mni", voxel_mm=VOX)
    assert [Path(p).read_bytes() for p in a] == [Path(p).read_bytes() for p in b]
    shape = cohort_shape("mni", None, VOX)
    assert cohort_ready(tmp_path / "a", 2, shape, voxel_mm=VOX) and not cohort_ready(tmp_path / "a", 2, shape, voxel_mm=1.0)
    for p in a:
        sid = Path(p).parents[3].name
        assert Path(p) == tmp_path / "a" / HCP_T1W.format(subject=sid)
        img, mask = nib.load(p), nib.load(tmp_path / "a" / HCP_BRAINMASK.format(subject=sid))
        assert img.shape == mask.shape == shape and np.allclose(img.affine, mask.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) == {0, 1}
    flat = write_cohort(tmp_path / "flat", 2, seed=3, progress=False, anatomy="mni", voxel_mm=VOX, layout="flat")
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == sorted(Path(p).name for p in flat)
    assert Path(flat[0]) == subject_path(tmp_path / "flat", Path(flat[0]).name[:-7], "flat")
    assert Path(flat[0]).read_bytes() == Path(a[0]).read_bytes()  # the same scans in either layout


def test_volume_files_carry_the_brain_mask_and_the_evaluator_scores_it(tmp_path):
    from preprocessing.driver import preprocess
    from preprocessing.manifest import load_manifest
    from preprocessing.patches import to_stored
    from preprocessing.shards import read_volume
    from udean.config import load
    from udean.evaluate import Evaluator, tricubic

    write_cohort(tmp_path / "c", 3, seed=0, progress=False, anatomy="mni", voxel_mm=VOX)
    cfg = load("tiny", [f"data.root={tmp_path / 'c'}", f"data.out={tmp_path / 'd'}", f"data.voxel_size_mm={VOX}",
                        "data.split.counts=[1,1,0,1]", "data.patches.lr_size=[8,8]", "data.patches.stride=[8,8]"])
    assert not preprocess(cfg.data, progress=False).failed
    (path,) = load_manifest(cfg.data.out).volume_paths("test")
    vol = read_volume(path)
    mask = nib.load(tmp_path / "c" / HCP_BRAINMASK.format(subject=vol.subject))
    want = to_stored(np.asarray(mask.dataobj)[tuple(slice(0, n - n % 2) for n in mask.shape)], vol.slice_axis)
    assert vol.brain is not None and np.array_equal(vol.brain, want)
    (res,) = Evaluator({"tricubic": lambda v: tricubic(v.lr, v.hr.shape)}, regions=("brain",)).run([vol])
    row = res.subjects[0]
    assert {"psnr_brain", "ssim_brain", "psnr_head"} <= set(row) and row["psnr_brain"] != row["psnr_head"]
    # a volume without a brain mask is scored everywhere else, never in a made-up brain
    (res,) = Evaluator({"tricubic": lambda v: tricubic(v.lr, v.hr.shape)}, regions=("brain",)).run(
        [dataclasses.replace(vol, brain=None)])
    assert "psnr_brain" not in res.subjects[0] and "psnr_head" in res.subjects[0]
