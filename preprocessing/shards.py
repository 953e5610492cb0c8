"""HDF5 shards: one file per (subject, group), written by one rank to a temp name and renamed.

Patch shard `shards/<group>/<subject>.h5`:
    patches (N, C, h, w) float16 | uint16, chunks (1, C, h, w); attrs kind (lr|hr), subject,
            group, scale (multiply stored values by it: 1.0 for float16, 1/65535 for uint16)
    origins (N, 3) int32 corner of each patch in its volume (stored order, slab axis first)
    truth   (N, S, h', w') optional, source shards with data.degradation.truth: the noise-free
            true degradation of each HR patch's centre (LR grid, stored like `patches`)
Volume file `volumes/<group>/<subject>.h5` (val/test), one `VolumePair`:
    hr (S, A, B) float32, lr (S/2, A/2, B/2) float32, mask (S, A, B) uint8 (hr, mask absent:
    an LR-only volume); attrs hr_affine, lr_affine (4x4 float64, of the stored arrays), subject,
    group, slice_axis, lr_source ("acquired"; absent: "synthetic")
Byte-identical for identical content: fixed libver, no timestamps, deterministic attr order.

Writers build the whole HDF5 file in memory and write its bytes with `hpc.atomic.atomic_write_bytes`:
HDF5 never writes to the disk itself. (With a full disk, libhdf5 raised ENOSPC and then crashed
the process, rc 139, while closing the file; here a full disk is one clean `OutputError`, checked
before the first byte is written, and the temp file is removed.)
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import hdf5plugin  # noqa: F401  registers LZ4 / Zstd so readers open compressed shards
import numpy as np

from hpc.atomic import atomic_write_bytes
from preprocessing.config import StorageConfig
from preprocessing.patches import canonical_affine, from_stored

LIBVER = ("v110", "v110")
UINT16_SCALE = 1.0 / 65535.0


def _compression(storage: StorageConfig) -> dict[str, Any]:
    if storage.compression == "none":
        return {}
    if storage.compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    if storage.compression == "lz4":
        return dict(hdf5plugin.LZ4(), shuffle=True)
    return dict(hdf5plugin.Zstd(clevel=3), shuffle=True)


def encode(patches: np.ndarray, dtype: str) -> tuple[np.ndarray, float]:
    """float32 in [0, 1] -> stored dtype and the scale a reader multiplies by."""
    if dtype == "uint16":
        return np.rint(np.clip(patches, 0.0, 1.0) * 65535.0).astype(np.uint16), UINT16_SCALE
    return patches.astype(np.float16), 1.0


def write_patches(path: str | os.PathLike, patches: np.ndarray, origins: np.ndarray, *, kind: str,
                  subject: str, group: str, storage: StorageConfig, truth: np.ndarray | None = None) -> None:
    """patches: (N, C, h, w) float32 in [0, 1]; origins: (N, 3); truth: (N, C', h', w') or None."""
    data, scale = encode(patches, storage.dtype)
    image = io.BytesIO()
    with h5py.File(image, "w", libver=LIBVER) as f:
        ds = f.create_dataset("patches", data=data, chunks=(1, *data.shape[1:]),
                              maxshape=(None, *data.shape[1:]), track_times=False, **_compression(storage))
        ds.attrs["kind"] = kind
        ds.attrs["subject"] = subject
        ds.attrs["group"] = group
        ds.attrs["scale"] = np.float64(scale)
        f.create_dataset("origins", data=np.asarray(origins, dtype=np.int32).reshape(-1, 3), track_times=False)
        if truth is not None:
            t, t_scale = encode(truth, storage.dtype)
            ts = f.create_dataset("truth", data=t, chunks=(1, *t.shape[1:]), track_times=False, **_compression(storage))
            ts.attrs["scale"] = np.float64(t_scale)
    atomic_write_bytes(path, image.getbuffer())


class Canonical(NamedTuple):
    """A `VolumePair` in canonical (RAS+) voxel order (X, Y, Z), for NIfTI files and figures."""

    hr: np.ndarray
    lr: np.ndarray
    mask: np.ndarray
    hr_affine: np.ndarray
    lr_affine: np.ndarray


@dataclass(frozen=True, eq=False)
class VolumePair:
    """One paired val/test volume in the stored layout, slices first (`patches.to_stored`):
    the layout the inferer tiles and the evaluator scores (SSIM slices along axis 0).

    hr: (S, A, B) float32 in [0, 1]; lr: (S/2, A/2, B/2) float32; mask: (S, A, B) uint8 head
    mask; hr_affine, lr_affine: (4, 4) voxel -> RAS mm of these arrays;
    slice_axis: the canonical axis that is axis 0 here. `canonical` is the (X, Y, Z) view,
    derived once; `to_canonical` turns any stored-layout array (a prediction) the same way.
    lr_source: "synthetic" (LR made from the HR by preprocessing) or "acquired" (an authentic
    LR scan, own data); an acquired LR without HR (LR-only val volume) has hr and mask None,
    and hr_affine is then the x2 grid the SR lands on."""

    hr: np.ndarray | None
    lr: np.ndarray
    mask: np.ndarray | None
    hr_affine: np.ndarray
    lr_affine: np.ndarray
    subject: str
    group: str
    slice_axis: int = 0
    lr_source: str = "synthetic"
    brain: np.ndarray | None = None  # (S, A, B) uint8 brain mask, where the scan came with one on its grid

    def to_canonical(self, a: np.ndarray) -> np.ndarray:
        return from_stored(a, self.slice_axis)

    @cached_property
    def canonical(self) -> Canonical:
        ax = self.slice_axis
        hr, mask = (None, None) if self.hr is None else (from_stored(self.hr, ax), from_stored(self.mask, ax))
        return Canonical(hr, from_stored(self.lr, ax), mask, canonical_affine(self.hr_affine, ax),
                         canonical_affine(self.lr_affine, ax))


def write_volume(path: str | os.PathLike, vol: VolumePair, storage: StorageConfig) -> None:
    comp = _compression(storage)
    image = io.BytesIO()
    with h5py.File(image, "w", libver=LIBVER) as f:
        for name, arr in (("hr", vol.hr), ("lr", vol.lr), ("mask", vol.mask), ("brain", vol.brain)):
            if arr is None:  # an LR-only volume; a volume without a brain mask
                continue
            arr = arr.astype(np.uint8 if name in ("mask", "brain") else np.float32)
            kw = dict(chunks=(1, *arr.shape[1:]), **comp) if comp else {}
            f.create_dataset(name, data=arr, track_times=False, **kw)
        f.attrs["hr_affine"] = np.asarray(vol.hr_affine, dtype=np.float64)
        f.attrs["lr_affine"] = np.asarray(vol.lr_affine, dtype=np.float64)
        f.attrs["subject"] = vol.subject
        f.attrs["group"] = vol.group
        f.attrs["slice_axis"] = np.int64(vol.slice_axis)
        if vol.lr_source != "synthetic":  # absent: synthetic, as in every file before own data
            f.attrs["lr_source"] = vol.lr_source
    atomic_write_bytes(path, image.getbuffer())


# --------------------------------------------------------------------------- readers
def value_scale(ds: h5py.Dataset) -> float:
    """What a stored value is multiplied by (1.0 float16, 1/65535 uint16)."""
    return float(ds.attrs.get("scale", 1.0))


def read_patches(src: str | os.PathLike | h5py.File | h5py.Dataset, indices: Any = slice(None),
                 name: str = "patches", scale: float | None = None) -> np.ndarray:
    """Patches `indices` (int, slice, or sorted/unsorted index list) of a shard's dataset `name`
    (`patches`, or `truth`) as float32 with the scale applied: (len(indices), C, h, w), or
    (C, h, w) for an int. `scale`: the dataset's `value_scale`, when the caller keeps it (reading
    the attribute costs more than reading one patch)."""
    if isinstance(src, (str, os.PathLike)):
        with h5py.File(src, "r") as f:
            if name not in f:
                raise ValueError(f"{src}: no dataset {name!r} in this shard")
            return read_patches(f[name], indices)
    ds = src[name] if isinstance(src, h5py.File) else src
    if isinstance(indices, (list, tuple, np.ndarray)):
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        uniq, inverse = np.unique(idx[order], return_inverse=True)  # h5py wants increasing, unique
        block = ds[uniq] if len(uniq) else np.zeros((0, *ds.shape[1:]), ds.dtype)
        out = np.empty((len(idx), *ds.shape[1:]), dtype=np.float32)
        out[order] = block[inverse]
    else:
        out = np.asarray(ds[indices], dtype=np.float32)
    scale = value_scale(ds) if scale is None else scale
    if scale != 1.0:
        out *= np.float32(scale)
    return out


def patch_count(path: str | os.PathLike) -> int:
    with h5py.File(path, "r") as f:
        return int(f["patches"].shape[0])


def read_volume(path: str | os.PathLike) -> VolumePair:
    """A volume file -> its `VolumePair`; ValueError naming the file if it cannot be read."""
    try:
        with h5py.File(path, "r") as f:
            lr_only = "hr" not in f
            return VolumePair(
                hr=None if lr_only else f["hr"][()], lr=f["lr"][()], mask=None if lr_only else f["mask"][()],
                hr_affine=np.asarray(f.attrs["hr_affine"]), lr_affine=np.asarray(f.attrs["lr_affine"]),
                subject=str(f.attrs["subject"]), group=str(f.attrs["group"]),
                slice_axis=int(f.attrs["slice_axis"]), lr_source=str(f.attrs.get("lr_source", "synthetic")),
                brain=f["brain"][()] if "brain" in f else None)
    except (OSError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable volume file ({type(exc).__name__}: {exc})") from None


def check_file(path: str | os.PathLike, kind: str, expected_count: int | None = None) -> None:
    """Open a shard and read every chunk; raises ValueError naming the file if anything is off."""
    try:
        with h5py.File(path, "r") as f:
            if kind == "volume":
                for name in (("hr", "lr", "mask") if "hr" in f else ("lr",)) + (("brain",) if "brain" in f else ()):
                    _ = f[name][()]
                for a in ("hr_affine", "lr_affine", "subject", "slice_axis"):
                    _ = f.attrs[a]
                return
            ds = f["patches"]
            n = ds.shape[0]
            for i in range(n):
                _ = ds[i]
            _ = f["origins"][()]
            if ds.attrs["kind"] != kind:
                raise ValueError(f"{path}: kind {ds.attrs['kind']!r}, manifest says {kind!r}")
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    if expected_count is not None and n != expected_count:
        raise ValueError(f"{path}: {n} patches, manifest says {expected_count}")


def relpath(out: str | os.PathLike, path: str | os.PathLike) -> str:
    return Path(path).relative_to(out).as_posix()
