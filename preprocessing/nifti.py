"""NIfTI loading: fast gzip decode, canonical (RAS+) orientation, the role's voxel grid
(preprocessing.geometry), float32 in [0, 1] (preprocessing.intensity; II-C: "each dataset was
scaled to the range of 0 to 1"), with one clear error per bad input."""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from preprocessing import geometry, intensity

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


@dataclass(frozen=True)
class ScanSpec:
    """What one role's scans are conformed to (`scan_spec`): the isotropic voxel (mm) and how
    far off a scan may be (within `tolerance_mm`: as it is; off by at most `max_resample` per
    axis: resampled, preprocessing.geometry; `max_resample` 1: refused), and the intensity
    scaling (preprocessing.intensity)."""

    role: str  # "HR" / "LR", for messages
    voxel_mm: float
    tolerance_mm: float
    max_resample: float = 1.0
    intensity: str = "minmax"
    percentiles: tuple[float, float] = (0.5, 99.5)


def scan_spec(cfg, role: str) -> ScanSpec:
    """The `ScanSpec` of role "HR" or "LR" under `cfg` (a DataConfig): HR voxel
    data.voxel_size_mm, LR voxel SCALE x it; own data resamples within data.own.max_resample
    and scales by data.own.intensity, the paper protocol refuses another voxel size and scales
    by min-max."""
    from preprocessing.config import SCALE

    own = cfg.own
    voxel = cfg.voxel_size_mm * (SCALE if role == "LR" else 1)
    tol = cfg.voxel_tolerance_mm * (SCALE if role == "LR" else 1)
    if not own.enabled:
        return ScanSpec(role, voxel, tol)
    return ScanSpec(role, voxel, tol, own.max_resample, own.intensity, tuple(own.percentiles))


@dataclass
class Scan:
    """A scan conformed to its role: `data` (X, Y, Z) canonical float32 in [0, 1] on the role's
    grid, its `affine`, the `scaling` that took it there (invert it to get scanner units) and
    `record`, what the manifest keeps about it (voxel sizes and shapes in and out, resampled,
    intensity lo / hi)."""

    data: np.ndarray
    affine: np.ndarray
    scaling: intensity.Scaling
    record: dict


def read_canonical(path: str | os.PathLike, gzip_method: str = "isal") -> nib.spatialimages.SpatialImage:
    """The 3D image at `path` (a 4D file with one volume counts), not yet reoriented; ValueError
    naming `path` when it is not one."""
    img = read_image(path, gzip_method)
    shape = img.shape
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        img = img.slicer[..., 0] if len(shape) == 4 else nib.Nifti1Image(np.asanyarray(img.dataobj).reshape(shape[:3]), img.affine, img.header)
        shape = img.shape
    if len(shape) != 3:
        raise ValueError(f"{path}: expected a 3D image, got {len(shape)}D with shape {tuple(shape)}")
    if min(shape) < 2:
        raise ValueError(f"{path}: expected a 3D image, got shape {tuple(shape)} (a 2D slice?)")
    return img


def header_voxel(path: str | os.PathLike) -> np.ndarray | None:
    """(3,) voxel sizes (mm) from the header alone (a .nii.gz is decoded only that far), for
    planning; None when the header cannot be read: the scan then fails alone when it is loaded."""
    try:
        zooms = nib.load(str(path)).header.get_zooms()[:3]
        z = np.asarray(zooms, dtype=np.float64)
    except Exception:  # noqa: BLE001 - any unreadable file: its load says why, as one failed subject
        return None
    return z if z.shape == (3,) and np.all(np.isfinite(z)) and np.all(z > 0) else None


def voxel_data(img, path) -> np.ndarray:
    """float32 voxels of `img`; ValueError naming `path` when unreadable or not finite."""
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read voxel data ({type(exc).__name__}: {exc})") from None
    finite = np.isfinite(data)
    if not finite.all():
        raise ValueError(f"{path}: {int((~finite).sum())} NaN/Inf voxels")
    return data


def load_scan(path: str | os.PathLike, spec: ScanSpec, gzip_method: str = "isal", clip: bool = True) -> Scan:
    """Load one scan and conform it to `spec`: checked (the errors of `load`; a voxel size off
    its role's grid by more than `spec.max_resample`), canonical (RAS+), resampled onto the
    role's isotropic grid when off it, scaled to [0, 1] (`clip=False`: scaled, values beyond
    kept; inference, udean/infer.py). `record["value_range"]`: the input's minimum and maximum."""
    img = read_canonical(path, gzip_method)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    resample = geometry.check_voxels(path, zooms, spec.voxel_mm, spec.tolerance_mm, spec.max_resample, spec.role)
    img = nib.as_closest_canonical(img)
    data = voxel_data(img, path)
    affine = np.asarray(img.affine, dtype=np.float64)
    canon_zooms = geometry.voxel_sizes(affine)  # of the input, in canonical axis order like its shape
    record = {"input_voxel_mm": [round(float(z), 6) for z in canon_zooms], "input_shape": list(data.shape),
              "value_range": [float(data.min()), float(data.max())]}
    if canon_zooms.max() > 1.2 * canon_zooms.min():  # thick slices: along which canonical axis
        record["thick_axis"] = int(np.argmax(canon_zooms))
    if resample:
        shape, target = geometry.grid(data.shape, affine, spec.voxel_mm)
        data, affine = geometry.to_grid(data, affine, shape, target), target
    try:
        scaling = intensity.fit(data, spec.intensity, spec.percentiles)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    intensity.apply(data, scaling, clip)
    record.update(voxel_mm=[round(float(z), 6) for z in geometry.voxel_sizes(affine)], shape=list(data.shape),
                  resampled=bool(resample), intensity=scaling.to_dict())
    return Scan(np.ascontiguousarray(data), affine, scaling, record)


def load(path: str | os.PathLike, voxel_size_mm: float, voxel_tolerance_mm: float,
         gzip_method: str = "isal") -> Volume:
    """Load, check and normalise one T1w volume (the paper protocol: `load_scan` with one
    voxel size and min-max). Raises ValueError naming `path` for a bad input: missing,
    truncated gzip, not NIfTI, not 3D, wrong voxel size, NaN/Inf, constant (all zero)."""
    scan = load_scan(path, ScanSpec("HR", voxel_size_mm, voxel_tolerance_mm), gzip_method)
    return Volume(scan.data, scan.affine)
