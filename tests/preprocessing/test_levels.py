"""Named degradation levels (data.degradation.level) on known volumes: what each does to k-space,
the slice profile, the noise; mixed draws per subject; configs and manifests of older data sets
unchanged; source margins and truth patches written by preprocessing."""
from __future__ import annotations

import numpy as np
import pytest

from preprocessing import kspace
from preprocessing.config import LEVELS, ConfigError, DataConfig, DegradationConfig
from preprocessing.subject import subject_degradation
from udean.config import from_dict

SHAPE = (32, 48, 40)  # canonical; slice axis 0, partial Fourier along axis 1


def wave(axis: int, f: float, shape=SHAPE, amp: float = 0.25) -> np.ndarray:
    """0.5 + amp cos(2 pi f x) along `axis`, f in cycles per HR voxel."""
    x = np.arange(shape[axis])
    view = [1, 1, 1]
    view[axis] = shape[axis]
    return np.broadcast_to(0.5 + amp * np.cos(2 * np.pi * f * x).reshape(view), shape).astype(np.float32)


def lr(vol: np.ndarray, level: str, noise: bool = False, seed: int = 0) -> np.ndarray:
    return kspace.degrade(vol, DegradationConfig(level=level), np.random.default_rng(seed), 0, noise=noise)


def ptp(x: np.ndarray, axis: int) -> float:
    """Peak-to-peak along `axis` in the middle of the other two (away from the edges)."""
    idx = [s // 2 for s in x.shape]
    idx[axis] = slice(None)
    return float(np.ptp(x[tuple(idx)]))


def test_truncation_level_is_the_default_degradation_byte_for_byte():
    vol = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    assert np.array_equal(lr(vol, "truncation"), kspace.degrade(vol, DegradationConfig(), None))


def test_partial_fourier_drops_one_side_of_a_high_frequency_and_keeps_a_low_one():
    # LR has 24 lines along axis 1; 6/8 keeps centred lines 0..17: positive LR frequencies up to
    # 5 of 24. A wave at 6/48 cycles per HR voxel (LR bin 6, period 4 LR voxels) loses its +6
    # half: its magnitude modulation halves; one at 2/48 (bin 2) keeps both halves.
    high, low = wave(1, 6 / 48), wave(1, 2 / 48)
    assert ptp(lr(high, "truncation"), 1) == pytest.approx(0.5, abs=0.01)
    assert ptp(lr(high, "pf"), 1) == pytest.approx(0.25, abs=0.01)
    assert ptp(lr(low, "pf"), 1) == pytest.approx(ptp(lr(low, "truncation"), 1), abs=1e-4)
    # along the slice axis (not the partial-Fourier axis) nothing is dropped
    along_slices = wave(0, 6 / 32)
    assert ptp(lr(along_slices, "pf"), 0) == pytest.approx(ptp(lr(along_slices, "truncation"), 0), abs=1e-4)


def test_elliptical_kspace_removes_the_corners_of_the_in_plane_square():
    y = np.arange(SHAPE[1])[None, :, None]
    z = np.arange(SHAPE[2])[None, None, :]
    corner = np.broadcast_to(0.5 + 0.25 * np.cos(2 * np.pi * (9 / 48 * y + 8 / 40 * z)), SHAPE).astype(np.float32)
    # |k| = (9/12, 8/10) of the half-widths: inside the square, outside the inscribed ellipse
    assert np.ptp(lr(corner, "truncation")[4:-4, 4:-4, 4:-4]) > 0.4
    cfg = DegradationConfig(elliptical=True)
    assert np.ptp(kspace.degrade(corner, cfg, None)[4:-4, 4:-4, 4:-4]) < 1e-4


def test_pf_noise_is_pf_plus_rician_noise_of_sigma_0_01():
    flat = np.full(SHAPE, 0.5, np.float32)
    clean = lr(flat, "pf_noise")
    assert np.array_equal(clean, lr(flat, "pf"))  # noise=False: the noise-free truth
    noisy = lr(flat, "pf_noise", noise=True)
    assert np.std(noisy - clean) == pytest.approx(0.01, rel=0.05)  # high SNR: Rician ~ Gaussian
    dark = lr(np.zeros(SHAPE, np.float32), "pf_noise", noise=True)  # zero signal: Rayleigh
    assert dark.mean() == pytest.approx(0.01 * np.sqrt(np.pi / 2), rel=0.05)


def test_psf_level_blurs_along_the_slice_axis_by_a_gaussian_of_fwhm_3():
    f = 6 / 32  # cycles per HR voxel, kept by truncation
    s = 3.0 / (2 * np.sqrt(2 * np.log(2)))
    expected = np.exp(-2 * (np.pi * s * f) ** 2)  # the Gaussian profile's transfer at f
    along = ptp(lr(wave(0, f), "psf"), 0) / ptp(lr(wave(0, f), "truncation"), 0)
    assert along == pytest.approx(expected, rel=0.01) and expected < 0.6
    in_plane = wave(2, 6 / 40)
    assert ptp(lr(in_plane, "psf"), 2) == pytest.approx(ptp(lr(in_plane, "truncation"), 2), abs=1e-4)
    flat = np.full(SHAPE, 0.5, np.float32)
    assert np.std(lr(flat, "psf", noise=True) - lr(flat, "psf")) == pytest.approx(0.01, rel=0.05)


def test_mixed_draws_a_scanner_per_subject_within_the_ranges():
    cfg = DataConfig(degradation=DegradationConfig(level="mixed"), seed=3)
    draws = [subject_degradation(cfg, f"1{i:05d}") for i in range(300)]
    assert all(d.level == "custom" for d in draws)
    m = cfg.degradation.mixed
    for key in ("partial_fourier", "noise_sigma", "slice_profile_fwhm"):
        v = np.array([getattr(d, key) for d in draws])
        lo, hi = getattr(m, key)
        assert lo <= v.min() and v.max() <= hi and v.max() - v.min() > 0.8 * (hi - lo)
    assert 0.4 < np.mean([d.elliptical for d in draws]) < 0.6
    assert len({(d.partial_fourier, d.noise_sigma) for d in draws}) == 300  # no two scanners agree
    assert subject_degradation(cfg, "100001") == subject_degradation(cfg, "100001")  # a pure function
    other_seed = DataConfig(degradation=DegradationConfig(level="mixed"), seed=4)
    assert subject_degradation(other_seed, "100001") != subject_degradation(cfg, "100001")
    with pytest.raises(ValueError, match="resolve it per subject"):
        kspace.degrade(np.zeros(SHAPE, np.float32), cfg.degradation, None)


def test_levels_are_named_sets_of_effects_and_refuse_explicit_effects():
    for name, effects in LEVELS.items():
        got = DegradationConfig(level=name).effects()
        assert {k: getattr(got, k) for k in effects} == effects
    with pytest.raises(ConfigError, match="level 'pf' sets"):
        from_dict({"data": {"degradation": {"level": "pf", "noise_sigma": 0.02}}})
    with pytest.raises(ConfigError, match="method must be kspace"):
        from_dict({"data": {"degradation": {"level": "pf", "method": "nearest"}}})


def test_data_sets_made_before_levels_keep_their_config_and_hash():
    """New keys at their defaults are left out of the manifest's config, so its hash (and the
    reuse of finished shards) does not change for existing settings."""
    d = DataConfig().model_dump(mode="json")
    assert not {"level", "slice_profile_fwhm", "mixed", "truth"} & set(d["degradation"])
    assert "source_margin" not in d["patches"]
    # the hash of the default data config on the commit before levels existed
    assert DataConfig().hash() == OLD_DEFAULT_HASH
    got = DataConfig(degradation=DegradationConfig(level="pf_noise", truth=True)).model_dump(mode="json")
    assert got["degradation"]["level"] == "pf_noise" and got["degradation"]["truth"] is True
    assert DataConfig(**d) == DataConfig()


OLD_DEFAULT_HASH = "d3c8ce7498dd72c1462b70dab3e62f93fb5f232fa03e318ce218ef771ac090b8"


# --------------------------------------------------------------------------- preprocessing
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from preprocessing.cohort import write_cohort

    root = tmp_path_factory.mktemp("levels_cohort")
    write_cohort(root, 6, (64, 64, 48), seed=0, progress=False)
    return root


def preprocessed(cohort, out, *overrides):
    from preprocessing.driver import preprocess
    from udean.config import load

    cfg = load("tiny", [f"data.root={cohort}", f"data.out={out}", *overrides])
    assert not preprocess(cfg.data, progress=False).failed
    return cfg


def test_source_margins_hold_real_context_around_the_plain_patches(cohort, tmp_path):
    from hpc.atomic import sha256_file
    from preprocessing.manifest import load_manifest
    from preprocessing.shards import read_patches

    plain = load_manifest(preprocessed(cohort, tmp_path / "plain").data.out)
    wide = load_manifest(preprocessed(cohort, tmp_path / "wide", "data.patches.source_margin=[1,2]").data.out)
    for a_path, b_path in zip(plain.shard_paths("source"), wide.shard_paths("source")):
        a, b = read_patches(a_path), read_patches(b_path)
        assert b.shape[1:] == (2 * (3 + 2), 2 * (16 + 4), 2 * (16 + 4))
        assert np.array_equal(b[:, 2:-2, 4:-4, 4:-4], a)  # the centre is the plain patch
        inner = b[:, 2:-2]  # the in-plane margins are real anatomy, not the patch's edge repeated
        assert not np.array_equal(inner[..., :4, 4:-4], np.repeat(inner[..., 4:5, 4:-4], 4, axis=-2))
    others = lambda m: m.shard_paths("target") + m.volume_paths("val") + m.volume_paths("test")  # noqa: E731
    assert [sha256_file(p) for p in others(plain)] == [sha256_file(p) for p in others(wide)]  # nothing else changes
    from udean.data.shards import check_source_margin

    check_source_margin((1, 2), wide)
    with pytest.raises(ValueError, match=r"data.patches.source_margin=\[1, 2\], but model.source_margin=\[2, 4\]"):
        check_source_margin((2, 4), wide)
    with pytest.raises(ValueError, match="manifest.json"):
        check_source_margin((1, 2), plain)


def test_truth_is_the_noise_free_degradation_of_each_source_patch(cohort, tmp_path):
    import h5py

    from preprocessing import patches
    from preprocessing.manifest import load_manifest
    from preprocessing.shards import read_patches
    from udean.baselines.pairs import load_hr

    cfg = preprocessed(cohort, tmp_path / "truth", "data.degradation.level=mixed", "data.degradation.truth=true")
    m = load_manifest(cfg.data.out)
    for path in m.shard_paths("source"):
        sid = path.stem
        truth = read_patches(path, name="truth")
        with h5py.File(path, "r") as f:
            origins = f["origins"][()] // 2  # HR origins of the patches -> LR
        clean = kspace.degrade(load_hr(m, sid), subject_degradation(cfg.data, sid), None, 0, noise=False)
        want = patches.extract(patches.to_stored(clean, 0), origins, (3, 16, 16))
        assert np.abs(truth - want).max() < 1e-3  # float16 storage
    none = load_manifest(preprocessed(cohort, tmp_path / "none").data.out)
    with pytest.raises(ValueError, match="no dataset 'truth'"):
        read_patches(none.shard_paths("source")[0], name="truth")
