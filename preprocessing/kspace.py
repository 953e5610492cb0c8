"""HR -> LR degradations of the target group (paper, II-C): 3D k-space truncation by 2x2x2, and
the acquisition effects truncation misses (partial Fourier, elliptical k-space, complex noise
so that magnitude noise is Rician, a Gaussian slice profile); 3D nearest downsampling for
Table I benchmark 3. The named levels (`data.degradation.level`, preprocessing/config.py
`LEVELS`) are sets of these effects.

Geometry: LR voxel j sits at HR voxel scale*j (a band-limited volume sampled on every second
voxel), so `lr_affine = hr_affine @ diag(scale, 1)`. Intensity: the LR image keeps the HR mean
(DC preserved), i.e. `lr = (N_lr / N_hr) * ifftn(crop(fftn(hr)))`.
"""
from __future__ import annotations

import numpy as np
import scipy.fft

from preprocessing.config import SCALE, DegradationConfig


def even_crop(vol: np.ndarray, scale: tuple[int, ...]) -> np.ndarray:
    """Crop the end of each axis to a multiple of its scale (HCP 320x320x256 is untouched)."""
    sl = tuple(slice(0, (n // s) * s) for n, s in zip(vol.shape, scale))
    return vol[sl]


def _centre(n: int, m: int) -> slice:
    """The m central bins of an fftshifted axis of n bins (DC stays at index m // 2)."""
    start = n // 2 - m // 2
    return slice(start, start + m)


def truncate(kspace_shifted: np.ndarray, scale: tuple[int, ...]) -> np.ndarray:
    """(N0, N1, N2) centred k-space -> (N0/s0, N1/s1, N2/s2) central block."""
    out_shape = tuple(n // s for n, s in zip(kspace_shifted.shape, scale))
    return kspace_shifted[tuple(_centre(n, m) for n, m in zip(kspace_shifted.shape, out_shape))]


def zero_fill(kspace_shifted: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `truncate`: place a central block into zeros of `shape`."""
    out = np.zeros(shape, dtype=kspace_shifted.dtype)
    out[tuple(_centre(n, m) for n, m in zip(shape, kspace_shifted.shape))] = kspace_shifted
    return out


def to_kspace(vol: np.ndarray) -> np.ndarray:
    """Centred 3D spectrum; float32 input gives complex64 (half the memory at HCP size)."""
    return scipy.fft.fftshift(scipy.fft.fftn(vol))


def to_image(kspace_shifted: np.ndarray, n_ref: int) -> np.ndarray:
    """Complex image from centred k-space, scaled so the mean of an image of `n_ref` voxels is kept."""
    img = scipy.fft.ifftn(scipy.fft.ifftshift(kspace_shifted))
    img *= kspace_shifted.size / n_ref
    return img


def band_weight(shape: tuple[int, ...], cut: float, taper: float = 0.2) -> np.ndarray:
    """Weights on a centred k-space grid of `shape`: 1 below `cut` (radius as a fraction of the
    grid's Nyquist frequency), 0 above `cut + taper`, a raised cosine between."""
    axes = np.meshgrid(*[(np.arange(n) - n // 2) / (n / 2) for n in shape], indexing="ij", sparse=True)
    radius = np.sqrt(sum(a**2 for a in axes))
    return (0.5 - 0.5 * np.cos(np.pi * np.clip((cut + taper - radius) / taper, 0.0, 1.0))).astype(np.float32)


def lr_consistent(sr: np.ndarray, lr: np.ndarray, cut: float, taper: float = 0.2) -> np.ndarray:
    """SR volume (`SCALE` x the LR's shape on every axis) -> the same with the low band of its spectrum
    taken from the LR scan: below `cut` of the LR grid's Nyquist frequency (`band_weight`) the SR,
    degraded by k-space truncation (this module's geometry and DC convention), equals the LR.

    An MRI scan measures its central k-space; a scanner's blur (partial Fourier, elliptical
    sampling, apodization) acts near the edge of what it acquired. The SR network may add detail
    above that band, but it may not change what the LR measured: a network (or a learned
    degradation) fitted to HR scans of another anatomy shifted this band and fell below tricubic
    (docs/quality.md). Float32 (D, H, W) both, slices first or not (the band is isotropic)."""
    if any(a != SCALE * b for a, b in zip(sr.shape, lr.shape)) or sr.ndim != lr.ndim:
        raise ValueError(f"lr_consistent: SR {sr.shape} is not x{SCALE} the LR {lr.shape}")
    k = to_kspace(np.asarray(sr, dtype=np.float32))
    box = tuple(_centre(n, m) for n, m in zip(k.shape, lr.shape))
    ratio = k.size / lr.size  # the LR's spectrum is this fraction of the SR's central block
    k[box] += band_weight(lr.shape, cut, taper) * (ratio * to_kspace(np.asarray(lr, dtype=np.float32)) - k[box])
    return np.ascontiguousarray(scipy.fft.ifftn(scipy.fft.ifftshift(k)).real, dtype=np.float32)


def partial_fourier_mask(shape: tuple[int, ...], fraction: float, axis: int) -> np.ndarray:
    """Keep the first ceil(fraction * n) lines of centred k-space along `axis` (always past DC)."""
    n = shape[axis]
    keep = max(int(np.ceil(fraction * n)), n // 2 + 1)
    m = np.zeros(n, dtype=bool)
    m[:keep] = True
    view = [1, 1, 1]
    view[axis] = n
    return np.broadcast_to(m.reshape(view), shape)


def elliptical_mask(shape: tuple[int, ...], slice_axis: int) -> np.ndarray:
    """Inscribed ellipse of centred k-space in the two axes other than `slice_axis`."""
    a, b = [ax for ax in range(3) if ax != slice_axis]
    ka = (np.arange(shape[a]) - shape[a] // 2) / (shape[a] / 2)
    kb = (np.arange(shape[b]) - shape[b] // 2) / (shape[b] / 2)
    inside = ka[:, None] ** 2 + kb[None, :] ** 2 <= 1.0
    view = [1, 1, 1]
    view[a], view[b] = shape[a], shape[b]
    return np.broadcast_to(inside.reshape(view), shape)


def slice_profile(shape: tuple[int, ...], fwhm: float, axis: int) -> np.ndarray:
    """k-space weights of a Gaussian slice profile of `fwhm` HR voxels along `axis` (centred
    k-space of `shape`): the spectrum of exp(-x^2 / (2 s^2)), s = fwhm / (2 sqrt(2 ln 2)), i.e.
    exp(-2 (pi s nu)^2) at nu cycles per voxel; 1 at DC (the mean is kept). float32."""
    n = shape[axis]
    s = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    nu = scipy.fft.fftshift(scipy.fft.fftfreq(n))
    view = [1, 1, 1]
    view[axis] = n
    return np.exp(-2.0 * (np.pi * s * nu) ** 2).astype(np.float32).reshape(view)


def kspace_degrade(hr: np.ndarray, cfg: DegradationConfig, rng: np.random.Generator | None,
                   slice_axis: int = 0, noise: bool = True) -> np.ndarray:
    """(X, Y, Z) HR in [0, 1] -> (X/sx, Y/sy, Z/sz) LR magnitude in [0, 1], float32.

    `cfg`: a custom or named level (`mixed` must be resolved per subject first:
    `DegradationConfig.effects`, preprocessing.subject.subject_degradation); `noise=False`: the
    noise-free degradation (the truth the fidelity metrics compare with)."""
    if cfg.level == "mixed":
        raise ValueError("level mixed is a distribution: resolve it per subject (DegradationConfig.effects) first")
    cfg = cfg.effects()
    scale = tuple(cfg.scale)
    hr = even_crop(hr, scale)
    k = to_kspace(np.asarray(hr, dtype=np.float32))
    if cfg.slice_profile_fwhm > 0:  # the excited slab's profile blurs along the slice axis, before sampling
        k = k * slice_profile(k.shape, cfg.slice_profile_fwhm, slice_axis)
    k = truncate(k, scale)
    if cfg.partial_fourier < 1.0:
        k = k * partial_fourier_mask(k.shape, cfg.partial_fourier, cfg.partial_fourier_axis)
    if cfg.elliptical:
        k = k * elliptical_mask(k.shape, slice_axis)
    img = to_image(k, hr.size)
    if noise and cfg.noise_sigma > 0:
        # white complex Gaussian noise in k-space is white in the image; added there, its
        # magnitude below is Rician (relative to the max, 1.0 after scaling)
        noise = rng.standard_normal((2,) + img.shape, dtype=np.float32) * np.float32(cfg.noise_sigma)
        img = img + (noise[0] + 1j * noise[1]).astype(img.dtype)
    lr = np.abs(img)
    np.clip(lr, 0.0, 1.0, out=lr)  # Gibbs overshoot: storage is [0, 1]
    return lr.astype(np.float32)


def nearest_degrade(hr: np.ndarray, scale: tuple[int, ...]) -> np.ndarray:
    """3D nearest-neighbour downsampling: LR voxel j = HR voxel scale*j (Table I, benchmark 3)."""
    hr = even_crop(hr, scale)
    return np.ascontiguousarray(hr[tuple(slice(None, None, s) for s in scale)], dtype=np.float32)


def degrade(hr: np.ndarray, cfg: DegradationConfig, rng: np.random.Generator | None, slice_axis: int = 0,
            noise: bool = True) -> np.ndarray:
    if cfg.method == "nearest":
        return nearest_degrade(hr, tuple(cfg.scale))
    return kspace_degrade(hr, cfg, rng, slice_axis, noise)
