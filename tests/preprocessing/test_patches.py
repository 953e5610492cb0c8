"""Patch geometry (LR patch k covers HR patch k), foreground selection, shard round trips."""
import h5py
import numpy as np
import pytest

from preprocessing import patches
from preprocessing.config import PatchConfig, StorageConfig
from hpc.atomic import sha256_file
from preprocessing.shards import patch_count, read_patches, write_patches


def test_lattice_and_alignment():
    cfg = PatchConfig(lr_size=(8, 8), slab=3, stride=(4, 4), slab_stride=3, min_foreground=0.0)
    hr = np.random.default_rng(0).random((24, 24, 16)).astype(np.float32)
    lr = hr[::2, ::2, ::2]  # nearest: LR voxel j = HR voxel 2j
    o = patches.select_origins(lr, cfg, np.random.default_rng(0))
    assert len(o) == 4 * 2 * 1 and o.dtype == np.int32
    assert np.all(o[:, 0] + 3 <= 12) and np.all(o[:, 1] + 8 <= 12) and np.all(o[:, 2] + 8 <= 8)
    lr_p = patches.extract(lr, o, (3, 8, 8))
    hr_p = patches.extract(hr, o * 2, (6, 16, 16))
    # HR patch k covers exactly LR patch k's field of view
    np.testing.assert_array_equal(hr_p[:, ::2, ::2, ::2], lr_p)


def test_foreground_selection_and_cap():
    vol = np.zeros((12, 32, 32), np.float32)
    vol[:, :16, :16] = 1.0  # one quadrant of foreground
    cfg = PatchConfig(lr_size=(8, 8), slab=3, stride=(8, 8), slab_stride=3, min_foreground=0.5)
    o = patches.select_origins(vol, cfg, np.random.default_rng(0))
    assert len(o) == 4 * 2 * 2 and np.all(o[:, 1:] < 16)
    frac = patches.foreground_fraction(vol, o, (3, 8, 8), 0.05)
    assert np.all(frac == 1.0)
    capped = patches.select_origins(vol, cfg.model_copy(update={"max_per_subject": 5}), np.random.default_rng(1))
    assert len(capped) == 5 and {tuple(r) for r in capped} <= {tuple(r) for r in o}
    assert np.all(np.diff(capped[:, 0] * 10**6 + capped[:, 1] * 1000 + capped[:, 2]) > 0)  # order kept


def test_stored_order_and_affine():
    vol = np.random.default_rng(1).random((5, 6, 7))
    aff = np.array([[0.7, 0, 0, -10], [0, 0.8, 0, -20], [0, 0, 0.9, -30], [0, 0, 0, 1.0]])
    for ax in range(3):
        s = patches.to_stored(vol, ax)
        a = patches.stored_affine(aff, ax)
        idx = np.array([1, 2, 3])
        stored_idx = idx
        can_idx = [0, 0, 0]
        others = [d for d in range(3) if d != ax]
        can_idx[ax], can_idx[others[0]], can_idx[others[1]] = stored_idx
        assert s[tuple(stored_idx)] == vol[tuple(can_idx)]
        np.testing.assert_allclose(a @ [*stored_idx, 1], aff @ [*can_idx, 1])


@pytest.mark.parametrize("dtype,tol", [("float16", 5e-4), ("uint16", 1e-5)])
@pytest.mark.parametrize("compression", ["none", "gzip", "lz4", "zstd"])
def test_shard_round_trip_and_byte_identity(tmp_path, dtype, tol, compression):
    p = np.random.default_rng(0).random((7, 6, 16, 16)).astype(np.float32)
    o = np.arange(21, dtype=np.int32).reshape(7, 3)
    st = StorageConfig(dtype=dtype, compression=compression)
    write_patches(tmp_path / "a.h5", p, o, kind="hr", subject="s", group="source", storage=st)
    write_patches(tmp_path / "b.h5", p, o, kind="hr", subject="s", group="source", storage=st)
    assert sha256_file(tmp_path / "a.h5") == sha256_file(tmp_path / "b.h5")
    assert patch_count(tmp_path / "a.h5") == 7
    np.testing.assert_allclose(read_patches(tmp_path / "a.h5", [5, 0, 5]), p[[5, 0, 5]], atol=tol)
    with h5py.File(tmp_path / "a.h5") as f:
        ds = f["patches"]
        assert ds.chunks == (1, 6, 16, 16) and ds.dtype == np.dtype(dtype)
        assert ds.attrs["kind"] == "hr" and ds.attrs["subject"] == "s"
        np.testing.assert_allclose(read_patches(ds, slice(1, 3)), p[1:3], atol=tol)
        np.testing.assert_array_equal(f["origins"][()], o)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("ax", [0, 1, 2])
def test_volume_pair_round_trips_and_its_canonical_view_undoes_the_stored_order(tmp_path, ax):
    """to_stored / stored_affine and their inverses are one layout: a volume written slices
    first reads back as the same VolumePair, and its canonical view is the canonical input, with
    the same world position of every voxel."""
    from preprocessing.shards import VolumePair, read_volume, write_volume

    rng = np.random.default_rng(ax)
    hr = rng.random((8, 10, 12)).astype(np.float32)
    aff = np.eye(4)
    aff[:3, :3] = rng.normal(size=(3, 3))
    aff[:3, 3] = [1, 2, 3]
    lr_aff = aff @ np.diag([2.0, 2, 2, 1])
    vol = VolumePair(patches.to_stored(hr, ax), patches.to_stored(hr[::2, ::2, ::2], ax),
                     patches.to_stored((hr > 0.5).astype(np.uint8), ax), patches.stored_affine(aff, ax),
                     patches.stored_affine(lr_aff, ax), "s1", "test", ax)
    write_volume(tmp_path / "v.h5", vol, StorageConfig())
    back = read_volume(tmp_path / "v.h5")
    for name in ("hr", "lr", "mask", "hr_affine", "lr_affine"):
        np.testing.assert_array_equal(getattr(back, name), getattr(vol, name))
    assert (back.subject, back.group, back.slice_axis) == ("s1", "test", ax)
    c = back.canonical
    np.testing.assert_array_equal(c.hr, hr)
    np.testing.assert_array_equal(c.lr, hr[::2, ::2, ::2])
    np.testing.assert_allclose(c.hr_affine, aff)
    np.testing.assert_allclose(c.lr_affine, lr_aff)
    np.testing.assert_array_equal(back.to_canonical(back.hr), hr)
    ijk = np.array([1, 2, 3])  # a canonical voxel and its stored index land on the same world point
    stored = ijk[[ax] + [a for a in range(3) if a != ax]]
    np.testing.assert_allclose(vol.hr_affine[:3, :3] @ stored, aff[:3, :3] @ ijk)
    with pytest.raises(ValueError, match="not a readable volume file"):
        read_volume(tmp_path / "missing.h5")
