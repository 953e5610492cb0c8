"""k-space truncation against FFT identities; partial Fourier, ellipse, noise, nearest."""
import numpy as np
import pytest

from preprocessing import kspace
from preprocessing.config import DegradationConfig


def band_limited(shape, seed=0):
    """Real volume whose spectrum lives strictly inside |k| < N/4 on every axis (a symmetric
    band, so the ifft of the band-passed noise is real)."""
    k = np.fft.fftn(np.random.default_rng(seed).standard_normal(shape))
    for ax, n in enumerate(shape):
        f = np.abs(np.fft.fftfreq(n) * n)
        view = [1, 1, 1]
        view[ax] = n
        k = k * (f < n / 4 - 0.5).reshape(view)
    return np.fft.ifftn(k).real


@pytest.mark.parametrize("shape", [(16, 16, 16), (20, 12, 24), (32, 18, 10)])
def test_band_limited_survives_truncation_and_zero_fill(shape):
    vol = band_limited(shape)
    k = kspace.to_kspace(vol)
    lowpass = kspace.to_image(kspace.zero_fill(kspace.truncate(k, (2, 2, 2)), shape), vol.size)
    np.testing.assert_allclose(lowpass.real, vol, atol=1e-10)
    np.testing.assert_allclose(lowpass.imag, 0, atol=1e-10)


def test_band_limited_lr_equals_every_second_voxel():
    """LR voxel j sits at HR voxel 2j (so lr_affine = hr_affine @ diag(2, 2, 2, 1))."""
    vol = band_limited((24, 16, 20), seed=1)
    lr = kspace.to_image(kspace.truncate(kspace.to_kspace(vol), (2, 2, 2)), vol.size)
    np.testing.assert_allclose(lr.real, vol[::2, ::2, ::2], atol=1e-10)


def test_dc_and_energy_preserved():
    """Mean (DC) of LR == mean of HR; mean power of LR == mean power of the low-passed HR
    (Parseval on the kept band)."""
    rng = np.random.default_rng(2)
    vol = rng.random((20, 16, 12))
    k = kspace.to_kspace(vol)
    kt = kspace.truncate(k, (2, 2, 2))
    lr = kspace.to_image(kt, vol.size)
    assert abs(lr.mean() - vol.mean()) < 1e-12
    low = np.fft.ifftn(np.fft.ifftshift(kspace.zero_fill(kt, vol.shape)))
    assert np.isclose(np.mean(np.abs(lr) ** 2), np.mean(np.abs(low) ** 2), rtol=1e-10)
    # the kept energy is at most the total energy
    assert np.mean(np.abs(lr) ** 2) <= np.mean(vol ** 2) + 1e-12


def test_degrade_shape_range_and_default_is_deterministic():
    vol = np.random.default_rng(3).random((16, 12, 10)).astype(np.float32)
    cfg = DegradationConfig()
    lr = kspace.degrade(vol, cfg, np.random.default_rng(0))
    assert lr.shape == (8, 6, 5) and lr.dtype == np.float32
    assert lr.min() >= 0 and lr.max() <= 1
    assert np.array_equal(lr, kspace.degrade(vol, cfg, np.random.default_rng(99)))  # no randomness


def test_odd_shape_is_cropped_to_even():
    vol = np.random.default_rng(4).random((17, 13, 11)).astype(np.float32)
    assert kspace.degrade(vol, DegradationConfig(), np.random.default_rng(0)).shape == (8, 6, 5)


def test_partial_fourier_and_ellipse_remove_energy():
    vol = np.random.default_rng(5).random((16, 16, 16)).astype(np.float32)
    rng = np.random.default_rng(0)
    base = kspace.degrade(vol, DegradationConfig(), rng)
    pf = kspace.degrade(vol, DegradationConfig(partial_fourier=0.625), rng)
    el = kspace.degrade(vol, DegradationConfig(elliptical=True), rng)
    assert not np.allclose(base, pf) and not np.allclose(base, el)
    m = kspace.partial_fourier_mask((8, 8, 8), 0.625, 1)
    assert m[:, :5].all() and not m[:, 5:].any()
    e = kspace.elliptical_mask((8, 8, 8), 0)
    assert e[:, 4, 4].all() and not e[:, 0, 0].any() and e[0].sum() < 64


def test_noise_is_rician_and_seeded():
    """Complex Gaussian noise on a zero image: magnitude is Rayleigh, mean sigma*sqrt(pi/2)."""
    vol = np.zeros((64, 64, 64), np.float32)
    cfg = DegradationConfig(noise_sigma=0.01)
    a = kspace.degrade(vol, cfg, np.random.default_rng(1))
    b = kspace.degrade(vol, cfg, np.random.default_rng(1))
    assert np.array_equal(a, b)
    assert abs(a.mean() - 0.01 * np.sqrt(np.pi / 2)) < 2e-4
    assert not np.array_equal(a, kspace.degrade(vol, cfg, np.random.default_rng(2)))


def test_nearest():
    vol = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    lr = kspace.degrade(vol, DegradationConfig(method="nearest"), np.random.default_rng(0))
    assert np.array_equal(lr, vol[::2, ::2, ::2])


def _down(x: np.ndarray) -> np.ndarray:
    """k-space truncation by 2 (the LR the SR is consistent with), noise-free, real."""
    return kspace.to_image(kspace.truncate(kspace.to_kspace(x), (2, 2, 2)), x.size).real.astype(np.float32)


def _band(x: np.ndarray, cut: float) -> np.ndarray:
    """The part of a (LR-grid) volume's centred spectrum below `cut` of its Nyquist frequency."""
    return kspace.to_kspace(x) * (kspace.band_weight(x.shape, cut, taper=1e-6) > 0.5)


def test_lr_consistency_gives_the_sr_the_lr_band_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    hr = rng.random((20, 24, 18), dtype=np.float32)
    lr = _down(hr)
    # an SR consistent with its LR (here: the HR itself) is left as it is, to float32 rounding
    assert np.abs(kspace.lr_consistent(hr, lr, 0.5) - hr).max() < 1e-5
    # an SR with a brightness offset and a wrong low band: below the cut its truncation is the LR's
    sr = hr + 0.05 + 0.3 * _up_smooth(rng, hr.shape)
    out = kspace.lr_consistent(sr, lr, 0.5)
    assert np.abs(_band(_down(out) - lr, 0.5)).max() < 1e-3 * np.abs(_band(_down(sr) - lr, 0.5)).max()
    # above cut + taper (of the LR grid) and beyond the LR's band the SR's spectrum is untouched
    k_sr, k_out = kspace.to_kspace(sr), kspace.to_kspace(out)
    keep = kspace.band_weight(sr.shape, 0.5 * 0.7, taper=1e-6) < 0.5  # HR-grid radius: half the LR's
    assert np.abs(k_out - k_sr)[keep].max() < 1e-3 * np.abs(k_sr).max()
    assert out.dtype == np.float32 and out.shape == sr.shape
    with pytest.raises(ValueError, match="not x2 the LR"):
        kspace.lr_consistent(sr[:-2], lr, 0.5)


def _up_smooth(rng, shape) -> np.ndarray:
    """A smooth random field (low frequencies only) on `shape`."""
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.standard_normal(shape).astype(np.float32), 3.0)
