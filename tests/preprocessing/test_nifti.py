"""NIfTI loading: canonical orientation, [0, 1] scaling, gzip decoders, one clear error per bad input."""
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocessing import nifti


def smooth_volume(shape=(40, 36, 32), seed=0) -> np.ndarray:
    """int16 head-like blob with some texture."""
    rng = np.random.default_rng(seed)
    g = np.indices(shape).astype(np.float32)
    r2 = sum((g[i] - (n - 1) / 2) ** 2 / (0.4 * n) ** 2 for i, n in enumerate(shape))
    return (np.clip(1.0 - r2, 0, 1) * (800 + 200 * rng.random(shape))).astype(np.int16)


def save(path: Path, data: np.ndarray, voxel: float = 0.7, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = np.diag([voxel, voxel, voxel, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(data, aff), str(path))
    return path


def write_bad_inputs(folder: Path, name_of, voxel: float = 0.7) -> dict[str, str]:
    """One file per bad-input kind at folder/name_of(kind), at `voxel` mm but for kind "voxel"
    (1 mm); returns kind -> expected error text."""
    good = smooth_volume()
    p = lambda kind: folder / name_of(kind)
    save(p("truncgz"), good, voxel=voxel)
    raw = p("truncgz").read_bytes()
    p("truncgz").write_bytes(raw[: len(raw) // 2])
    p("notnifti").parent.mkdir(parents=True, exist_ok=True)
    p("notnifti").write_bytes(gzip.compress(b"this is not an image\n" * 50, mtime=0))
    save(p("fourd"), np.stack([good, good], axis=-1), voxel=voxel)
    save(p("twod"), good[:, :, :1], voxel=voxel)
    nan = good.astype(np.float32)
    nan[3, 3, 3] = np.nan
    nan[4, 4, 4] = np.inf
    save(p("nan"), nan, voxel=voxel)
    save(p("zero"), np.zeros_like(good), voxel=voxel)
    save(p("voxel"), good, voxel=1.0)
    return {"truncgz": "truncated or corrupt gzip", "notnifti": "not a NIfTI", "fourd": "expected a 3D image, got 4D",
            "twod": "expected a 3D image", "nan": "NaN/Inf", "zero": "constant image", "voxel": "voxel size",
            "missing": "missing file"}


def test_bad_inputs_each_raise_one_clear_error(tmp_path):
    expected = write_bad_inputs(tmp_path, lambda k: f"{k}.nii.gz")
    for kind, text in expected.items():
        path = tmp_path / f"{kind}.nii.gz"
        with pytest.raises(ValueError, match=text) as info:
            nifti.load(path, 0.7, 0.05)
        assert str(path) in str(info.value), kind


def test_canonical_orientation_and_scaling(tmp_path):
    data = smooth_volume()
    flip = np.diag([-0.7, 0.7, 0.7, 1.0])  # LAS on disk
    flip[0, 3] = 30.0
    vol = nifti.load(save(tmp_path / "las.nii.gz", data, affine=flip), 0.7, 0.05)
    ras = nifti.load(save(tmp_path / "ras.nii", data), 0.7, 0.05)
    assert vol.data.dtype == np.float32 and vol.data.min() == 0 and vol.data.max() == 1
    np.testing.assert_array_equal(vol.data, ras.data[::-1])
    assert vol.affine[0, 0] > 0  # RAS+
    # world position of voxel (0, 0, 0) of the canonical volume = old last voxel along x
    np.testing.assert_allclose(vol.affine @ [0, 0, 0, 1], flip @ [data.shape[0] - 1, 0, 0, 1], atol=1e-4)


def test_gzip_decoders_agree(tmp_path):
    raw = gzip.compress(np.random.default_rng(0).bytes(1 << 16), mtime=0)
    assert nifti.decompress(raw, "x", "isal") == nifti.decompress(raw, "x", "stdlib")
    with pytest.raises(ValueError, match="x: truncated"):
        nifti.decompress(raw[:100], "x", "stdlib")
