"""NIfTI loading: fast gzip decode, canonical (RAS+) orientation, float32 in [0, 1] (II-C:
"each dataset was scaled to the range of 0 to 1"), with one clear error per bad input."""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

try:  # ISA-L inflate: several times faster than zlib on HCP volumes (benchmarks/preprocess.py)
    from isal import igzip as _igzip
except ImportError:  # pragma: no cover - isal is a listed dependency
    _igzip = None


@dataclass
class Volume:
    """A canonical volume. data: (X, Y, Z) float32 in [0, 1]; affine: 4x4 voxel -> RAS mm."""

    data: np.ndarray
    affine: np.ndarray


def decompress(raw: bytes, path: str | os.PathLike, method: str = "isal") -> bytes:
    """gzip -> bytes with ISA-L (`isal`) or the standard library (`stdlib`)."""
    try:
        if method == "isal" and _igzip is not None:
            return _igzip.decompress(raw)
        return gzip.decompress(raw)
    except Exception as exc:  # zlib.error, EOFError, isal errors: all mean a bad file
        raise ValueError(f"{path}: truncated or corrupt gzip ({type(exc).__name__}: {exc})") from None


def read_image(path: str | os.PathLike, gzip_method: str = "isal") -> nib.spatialimages.SpatialImage:
    """The NIfTI image at `path`, decoded fully in memory."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: missing file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = decompress(raw, path, gzip_method)
    elif str(path).endswith(".gz"):
        raise ValueError(f"{path}: not a gzip file although named .gz")
    try:
        return nib.Nifti1Image.from_bytes(raw) if _is_nifti1(raw) else nib.Nifti2Image.from_bytes(raw)
    except Exception as exc:
        raise ValueError(f"{path}: not a NIfTI image ({type(exc).__name__}: {exc})") from None


def _is_nifti1(raw: bytes) -> bool:
    return len(raw) >= 348 and raw[344:347] in (b"n+1", b"ni1")


def load(path: str | os.PathLike, voxel_size_mm: float, voxel_tolerance_mm: float,
         gzip_method: str = "isal") -> Volume:
    """Load, check and normalise one T1w volume. Raises ValueError naming `path` for a bad input:
    missing, truncated gzip, not NIfTI, not 3D, wrong voxel size, NaN/Inf, constant (all zero)."""
    img = read_image(path, gzip_method)
    shape = img.shape
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        img = img.slicer[..., 0] if len(shape) == 4 else nib.Nifti1Image(np.asanyarray(img.dataobj).reshape(shape[:3]), img.affine, img.header)
        shape = img.shape
    if len(shape) != 3:
        raise ValueError(f"{path}: expected a 3D image, got {len(shape)}D with shape {tuple(shape)}")
    if min(shape) < 2:
        raise ValueError(f"{path}: expected a 3D image, got shape {tuple(shape)} (a 2D slice?)")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    if np.any(np.abs(zooms - voxel_size_mm) > voxel_tolerance_mm):
        raise ValueError(f"{path}: voxel size {tuple(round(float(z), 4) for z in zooms)} mm, expected "
                         f"{voxel_size_mm} +- {voxel_tolerance_mm} mm (data.voxel_size_mm)")
    img = nib.as_closest_canonical(img)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read voxel data ({type(exc).__name__}: {exc})") from None
    finite = np.isfinite(data)
    if not finite.all():
        raise ValueError(f"{path}: {int((~finite).sum())} NaN/Inf voxels")
    lo, hi = float(data.min()), float(data.max())
    if hi <= lo:
        raise ValueError(f"{path}: constant image (all voxels {lo:g}), nothing to learn from")
    data -= lo
    data *= np.float32(1.0 / (hi - lo))
    np.clip(data, 0.0, 1.0, out=data)
    return Volume(np.ascontiguousarray(data), np.asarray(img.affine, dtype=np.float64))
