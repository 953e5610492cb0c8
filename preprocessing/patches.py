"""Thin-slab patches (paper, II-C): LR `slab x H x W` (3x64x64), HR `2slab x 2H x 2W`
(6x128x128), slices first. Volumes here are already in stored order: canonical with
`data.patches.slice_axis` moved to axis 0. `to_stored` / `from_stored` and `stored_affine` /
`canonical_affine` are the one definition of that layout (docs/architecture.md, "Layouts"). LR patch k at LR origin (z, y, x) covers the field of
view of HR patch k at (2z, 2y, 2x)."""
from __future__ import annotations

import numpy as np

from preprocessing.config import PatchConfig


def _order(slice_axis: int) -> list[int]:
    """Stored axis i is canonical axis _order(slice_axis)[i]."""
    return [slice_axis] + [a for a in range(3) if a != slice_axis]


def to_stored(vol: np.ndarray, slice_axis: int) -> np.ndarray:
    """Canonical (X, Y, Z) -> slices first (S, A, B)."""
    return np.ascontiguousarray(np.moveaxis(vol, slice_axis, 0))


def from_stored(vol: np.ndarray, slice_axis: int) -> np.ndarray:
    """Slices first (S, A, B) -> canonical (X, Y, Z): the inverse of `to_stored`."""
    return np.ascontiguousarray(np.moveaxis(vol, 0, slice_axis))


def stored_affine(affine: np.ndarray, slice_axis: int) -> np.ndarray:
    """Voxel -> world affine of `to_stored(vol)` given the canonical one (columns permuted)."""
    out = np.eye(4)
    out[:3, :3] = np.asarray(affine)[:3, :3][:, _order(slice_axis)]
    out[:3, 3] = np.asarray(affine)[:3, 3]
    return out


def canonical_affine(affine: np.ndarray, slice_axis: int) -> np.ndarray:
    """The canonical affine given the stored one: the inverse of `stored_affine`."""
    out = np.eye(4)
    out[:3, _order(slice_axis)] = np.asarray(affine, dtype=np.float64)[:3, :3]
    out[:3, 3] = np.asarray(affine)[:3, 3]
    return out


def lr_size(cfg: PatchConfig) -> tuple[int, int, int]:
    return (cfg.slab, *cfg.lr_size)


def lattice(shape: tuple[int, ...], size: tuple[int, ...], strides: tuple[int, ...]) -> np.ndarray:
    """(K, 3) int32 corner origins of every patch of `size` that fits in `shape`, C order."""
    axes = [np.arange(0, n - s + 1, st) for n, s, st in zip(shape, size, strides)]
    if any(len(a) == 0 for a in axes):
        return np.zeros((0, 3), dtype=np.int32)
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1).astype(np.int32)


def box_means(vol: np.ndarray, origins: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """(K,) mean of `vol` over each patch of `size` at `origins`, from a summed-volume table."""
    if len(origins) == 0:
        return np.zeros(0)
    sat = np.zeros(tuple(n + 1 for n in vol.shape), dtype=np.float64)
    sat[1:, 1:, 1:] = np.asarray(vol, dtype=np.float64).cumsum(0).cumsum(1).cumsum(2)
    z0, y0, x0 = origins[:, 0], origins[:, 1], origins[:, 2]
    z1, y1, x1 = z0 + size[0], y0 + size[1], x0 + size[2]
    total = (sat[z1, y1, x1] - sat[z0, y1, x1] - sat[z1, y0, x1] - sat[z1, y1, x0]
             + sat[z0, y0, x1] + sat[z0, y1, x0] + sat[z1, y0, x0] - sat[z0, y0, x0])
    return total / float(np.prod(size))


def foreground_fraction(vol: np.ndarray, origins: np.ndarray, size: tuple[int, ...], threshold: float) -> np.ndarray:
    """(K,) fraction of voxels > threshold in each patch."""
    return box_means(vol > threshold, origins, size)


def select_origins(fg_vol: np.ndarray, cfg: PatchConfig, rng: np.random.Generator) -> np.ndarray:
    """(K, 3) LR-grid origins of the kept patches: foreground-aware (fraction of voxels above
    `foreground_threshold` >= `min_foreground`, judged on `fg_vol`, an LR-grid volume), C order,
    at most `max_per_subject` by a seeded choice that keeps the order."""
    size = lr_size(cfg)
    origins = lattice(fg_vol.shape, size, (cfg.slab_stride, *cfg.stride))
    keep = foreground_fraction(fg_vol, origins, size, cfg.foreground_threshold) >= cfg.min_foreground
    origins = origins[keep]
    if cfg.max_per_subject and len(origins) > cfg.max_per_subject:
        idx = np.sort(rng.choice(len(origins), cfg.max_per_subject, replace=False))
        origins = origins[idx]
    return origins


def extract(vol: np.ndarray, origins: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """(K, *size) float32 patches of `vol` at `origins` (stored order, slab axis first)."""
    out = np.empty((len(origins), *size), dtype=np.float32)
    for k, (z, y, x) in enumerate(origins):
        out[k] = vol[z:z + size[0], y:y + size[1], x:x + size[2]]
    return out
