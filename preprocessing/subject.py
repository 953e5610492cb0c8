"""One subject, start to finish: load -> degrade / move -> patches or volumes -> shards.

Deterministic from (data config, subject id): every random draw comes from
`subject_rng(seed, id, stream)` = `np.random.default_rng([seed, crc32(id), stream])`, so the
output does not depend on which rank ran the subject, or when."""
from __future__ import annotations

import os
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from preprocessing import kspace, motion, nifti, patches
from preprocessing.config import DataConfig
from preprocessing.discover import Subject
from hpc.atomic import sha256_file
from preprocessing.shards import relpath, write_patches, write_volume

# independent random streams per subject
STREAM_MOTION, STREAM_NOISE, STREAM_PATCHES = 1, 2, 3
# Fault injection for tests: a subject id whose processing raises an internal (non-input) error.
CRASH_ENV = "UDEAN_PREPROCESS_CRASH"


def subject_hash(sid: str) -> int:
    return zlib.crc32(sid.encode())


def subject_rng(seed: int, sid: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, subject_hash(sid), stream])


def shard_file(out: Path, group: str, sid: str) -> Path:
    """Where the (subject, group) file lives: shards/<group>/ for source/target, volumes/ else."""
    sub = "shards" if group in ("source", "target") else "volumes"
    return Path(out) / sub / group / f"{sid}.h5"


def head_mask(hr: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 head mask: voxels above threshold, closed and hole-filled."""
    m = hr > threshold
    m = ndimage.binary_closing(m, iterations=2)
    return ndimage.binary_fill_holes(m).astype(np.uint8)


def stored_scale(cfg: DataConfig) -> tuple[int, int, int]:
    s = tuple(cfg.degradation.scale)
    ax = cfg.patches.slice_axis
    return (s[ax],) + tuple(s[a] for a in range(3) if a != ax)  # type: ignore[return-value]


def _shard_row(out: Path, path: Path, group: str, sid: str, kind: str, n: int) -> dict[str, Any]:
    return {"path": relpath(out, path), "group": group, "subject": sid, "kind": kind,
            "sha256": sha256_file(path), "patches": int(n), "bytes": path.stat().st_size}


def _write_hr_patches(out: Path, sid: str, hr_s: np.ndarray, origins: np.ndarray, cfg: DataConfig) -> dict[str, Any]:
    sc = np.asarray(stored_scale(cfg))
    size = tuple(int(v) for v in np.asarray(patches.lr_size(cfg.patches)) * sc)
    hr_p = patches.extract(hr_s, origins * sc, size)
    path = shard_file(out, "source", sid)
    write_patches(path, hr_p, origins * sc, kind="hr", subject=sid, group="source", storage=cfg.storage)
    return _shard_row(out, path, "source", sid, "hr", len(hr_p))


def _write_lr_patches(out: Path, sid: str, lr_s: np.ndarray, origins: np.ndarray, cfg: DataConfig) -> dict[str, Any]:
    lr_p = patches.extract(lr_s, origins, patches.lr_size(cfg.patches))
    path = shard_file(out, "target", sid)
    write_patches(path, lr_p, origins, kind="lr", subject=sid, group="target", storage=cfg.storage)
    return _shard_row(out, path, "target", sid, "lr", len(lr_p))


def build(subject: Subject, cfg: DataConfig, out: Path, timings: dict[str, float]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Do the work; returns (row fields: shards, patches, motion) and shard rows. Raises
    ValueError for a bad input."""
    sid, group = subject.id, subject.group
    if os.environ.get(CRASH_ENV) == sid:
        raise RuntimeError(f"{CRASH_ENV}={sid}: injected internal error")
    ax = cfg.patches.slice_axis
    scale = tuple(cfg.degradation.scale)

    t = time.perf_counter()
    vol = nifti.load(subject.input, cfg.voxel_size_mm, cfg.voxel_tolerance_mm)
    hr = kspace.even_crop(vol.data, scale)
    timings["load"] = time.perf_counter() - t
    min_shape = np.asarray(patches.lr_size(cfg.patches)) * np.asarray(stored_scale(cfg))
    stored_shape = np.asarray((hr.shape[ax],) + tuple(hr.shape[a] for a in range(3) if a != ax))
    if np.any(stored_shape < min_shape):
        raise ValueError(f"{subject.input}: shape {vol.data.shape} is smaller than one HR patch "
                         f"{tuple(int(v) for v in min_shape)} (slices first)")

    shards: list[dict[str, Any]] = []
    fields: dict[str, Any] = {"shards": {}, "patches": {"lr": 0, "hr": 0}, "motion": None}
    patch_rng = subject_rng(cfg.seed, sid, STREAM_PATCHES)
    if group == "source":  # unpaired: HR patches of an independent subject
        hr_s = patches.to_stored(hr, ax)
        t = time.perf_counter()
        fg = hr_s[tuple(slice(None, None, s) for s in stored_scale(cfg))]
        origins = patches.select_origins(fg, cfg.patches, patch_rng)
        timings["patches"] = time.perf_counter() - t
        t = time.perf_counter()
        shards.append(_write_hr_patches(out, sid, hr_s, origins, cfg))
        timings["write"] = time.perf_counter() - t
        fields["shards"]["source"] = shards[-1]["path"]
        fields["patches"]["hr"] = shards[-1]["patches"]
        return fields, shards

    t = time.perf_counter()
    lr = kspace.degrade(hr, cfg.degradation, subject_rng(cfg.seed, sid, STREAM_NOISE), ax)
    timings["fft"] = time.perf_counter() - t
    lr_s = patches.to_stored(lr, ax)
    if group == "target":
        t = time.perf_counter()
        origins = patches.select_origins(lr_s, cfg.patches, patch_rng)
        timings["patches"] = time.perf_counter() - t
        if cfg.mode == "misaligned":  # II-C: source = target subjects, HR moved
            t = time.perf_counter()
            params = motion.draw(cfg.motion, subject_rng(cfg.seed, sid, STREAM_MOTION))
            moved = motion.apply(hr, params)
            timings["motion"] = time.perf_counter() - t
            fields["motion"] = params
            t = time.perf_counter()
            shards.append(_write_hr_patches(out, sid, patches.to_stored(moved, ax), origins, cfg))
            fields["shards"]["source"] = shards[-1]["path"]
            fields["patches"]["hr"] = shards[-1]["patches"]
        else:
            t = time.perf_counter()
        shards.append(_write_lr_patches(out, sid, lr_s, origins, cfg))
        timings["write"] = time.perf_counter() - t
        fields["shards"]["target"] = shards[-1]["path"]
        fields["patches"]["lr"] = shards[-1]["patches"]
        return fields, shards

    # val / test: whole paired volumes for evaluation
    t = time.perf_counter()
    hr_s = patches.to_stored(hr, ax)
    mask = head_mask(hr_s, cfg.patches.foreground_threshold)
    hr_aff = patches.stored_affine(vol.affine, ax)
    lr_aff = hr_aff @ np.diag([*stored_scale(cfg), 1]).astype(np.float64)
    path = shard_file(out, group, sid)
    write_volume(path, hr=hr_s, lr=lr_s, mask=mask, hr_affine=hr_aff, lr_affine=lr_aff, subject=sid,
                 group=group, slice_axis=ax, storage=cfg.storage)
    shards.append(_shard_row(out, path, group, sid, "volume", 0))
    timings["write"] = time.perf_counter() - t
    fields["shards"]["volume"] = shards[-1]["path"]
    return fields, shards


def process(subject: Subject, cfg: DataConfig, out: str | os.PathLike) -> dict[str, Any]:
    """{"row": manifest subject row, "shards": [shard rows], "timings": {stage: s}}.
    A bad input gives status "failed" with the error; any other exception propagates (a bug:
    the driver aborts the job)."""
    out = Path(out)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"id": subject.id, "group": subject.group, "input": subject.input, "status": "ok",
                           "error": None, "shards": {}, "patches": {"lr": 0, "hr": 0}, "motion": None}
    timings: dict[str, float] = {}
    shards: list[dict[str, Any]] = []
    if subject.group != "unused":
        try:
            fields, shards = build(subject, cfg, out, timings)
            row.update(fields)
        except (ValueError, OSError, EOFError) as exc:
            msg = str(exc)
            if subject.input not in msg:
                msg = f"{subject.input}: {msg}"
            row.update(status="failed", error=msg)
            shards = []
    row["seconds"] = round(time.perf_counter() - t0, 4)
    return {"row": row, "shards": shards, "timings": timings}
