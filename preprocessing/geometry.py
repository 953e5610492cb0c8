"""Each role's voxel grid, and resampling onto it (docs/data-format.md, "Geometry").

The model learns x2 along every axis: HR voxel `data.voxel_size_mm`, LR voxel SCALE x that. A
scan whose voxel size is within `data.voxel_tolerance_mm` of its role's is used as it is; one
off by at most `data.own.max_resample` on every axis (1.2 mm, 1 x 1 x 1.5 mm) is resampled;
anything further is refused (`check_voxels`).

Resampling (`to_grid`) keeps the scan's orientation (direction cosines, obliquity included) and
its field of view (the outer corner of voxel 0 stays where it was), and changes only the voxel
size: nibabel.processing (scipy's cubic spline, `resample_from_to`), after a Gaussian low-pass
along every axis that gets coarser (`nibabel.processing.smooth_image`, FWHM
sqrt(target^2 - voxel^2) mm: the target voxel's width less what the scan already has), so
downsampling does not alias. The spline's overshoot is clipped to the scan's range.
"""
from __future__ import annotations

import numpy as np

from preprocessing.config import SCALE


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """(3,) mm per voxel axis: the norms of the affine's columns."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(0))


def factor(zooms: np.ndarray, target: float) -> float:
    """How far `zooms` are from `target`: the largest ratio either way over the axes (>= 1)."""
    z = np.asarray(zooms, dtype=np.float64)
    return float(np.max(np.maximum(z / target, target / z)))


def fmt(zooms) -> str:
    return " x ".join(f"{float(z):g}" for z in np.round(np.asarray(zooms, dtype=np.float64), 4))


def check_voxels(path, zooms, target: float, tolerance: float, max_resample: float, role: str) -> bool:
    """True when a scan of voxel size `zooms` needs resampling onto its role's grid `target`
    (mm), False when it is on it; ValueError naming `path` when it is too far off."""
    zooms = np.asarray(zooms, dtype=np.float64)
    if np.all(np.abs(zooms - target) <= tolerance):
        return False
    f = factor(zooms, target)
    if max_resample <= 1.0:  # the paper protocol: one voxel size, as documented for HCP
        raise ValueError(f"{path}: voxel size ({fmt(zooms)}) mm, expected {target:g} +- {tolerance:g} mm "
                         "(data.voxel_size_mm)")
    if f > max_resample + 1e-9:
        hint = ""
        if role == "LR" and np.all(np.abs(zooms * SCALE - target) <= SCALE * tolerance + 1e-9):
            hint = f"; it has the HR voxel size: an HR scan given as LR?"
        elif role == "HR" and np.all(np.abs(zooms - SCALE * target) <= SCALE * tolerance + 1e-9):
            hint = f"; it has the LR voxel size: an LR scan given as HR?"
        if not hint:  # how to let it through: the factor it needs (thick slices, a coarser scan)
            hint = (f"; to resample it anyway, raise data.own.max_resample to {np.ceil(f * 100) / 100:g} "
                    f"(`udean preprocess ... data.own.max_resample={np.ceil(f * 100) / 100:g}`)")
        raise ValueError(f"{path}: voxel size ({fmt(zooms)}) mm is {f:.2f}x off the {role} grid of {target:g} mm, "
                         f"more than data.own.max_resample={max_resample:g} allows{hint}")
    return True


def grid(shape: tuple[int, ...], affine: np.ndarray, voxel: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """The isotropic `voxel` grid over the field of view of (shape, affine): same directions,
    the outer corner of voxel 0 kept, shape round(extent / voxel)."""
    zooms = voxel_sizes(affine)
    ratio = voxel / zooms  # new voxel in old voxel units, per axis
    new_shape = tuple(int(max(1, round(n / r))) for n, r in zip(shape[:3], ratio))
    step = np.eye(4)
    step[:3, :3] = np.diag(ratio)
    step[:3, 3] = (ratio - 1.0) / 2.0  # new voxel 0's centre, in old voxel index units
    return new_shape, np.asarray(affine, dtype=np.float64) @ step


def to_grid(data: np.ndarray, affine: np.ndarray, shape: tuple[int, int, int], target_affine: np.ndarray,
            *, mode: str = "nearest", order: int = 3) -> np.ndarray:
    """Resample `data` (voxel -> world `affine`) onto (shape, target_affine), anti-aliased
    where the target voxel is coarser; float32, clipped to the input's range. `mode`: outside
    the input's field of view, "nearest" extends the edge, "constant" gives 0. `order` 0:
    nearest neighbour, for masks and labels (no low-pass: a label has no in-between values)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to, smooth_image

    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    src, dst = voxel_sizes(affine), float(voxel_sizes(target_affine).max())
    fwhm = np.sqrt(np.maximum(dst ** 2 - src ** 2, 0.0))
    if order > 0 and np.any(fwhm > 0):
        img = smooth_image(img, fwhm)
    out = resample_from_to(img, (tuple(shape), np.asarray(target_affine, dtype=np.float64)), order=order, mode=mode)
    res = np.asarray(out.dataobj, dtype=np.float32)
    lo, hi = float(np.min(data)), float(np.max(data))
    return np.clip(res, min(lo, 0.0) if mode == "constant" else lo, hi, out=res)


def coverage(shape_in: tuple[int, ...], affine: np.ndarray, shape: tuple[int, int, int],
             target_affine: np.ndarray) -> np.ndarray:
    """bool (shape): the target voxels whose centre lies inside the input's field of view."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    to_in = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(target_affine, dtype=np.float64)
    src = idx @ to_in[:3, :3].T + to_in[:3, 3]
    inside = np.all((src >= -0.5) & (src <= np.asarray(shape_in[:3]) - 0.5), axis=1)
    return inside.reshape(shape)
