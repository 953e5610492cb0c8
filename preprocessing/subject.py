"""One subject, start to finish: load -> degrade / move -> patches or volumes -> shards.

Deterministic from (data config, subject id): every random draw comes from
`subject_rng(seed, id, stream)` = `np.random.default_rng([seed, crc32(id), stream])`, so the
output does not depend on which rank ran the subject, or when."""
from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from preprocessing import kspace, motion, nifti, patches
from preprocessing.config import DataConfig, DegradationConfig
from preprocessing.discover import Subject
from hpc.atomic import sha256_file
from preprocessing.manifest import ShardRow, SubjectRow
from preprocessing.shards import VolumePair, relpath, write_patches, write_volume

# independent random streams per subject
STREAM_MOTION, STREAM_NOISE, STREAM_PATCHES, STREAM_DEGRADATION = 1, 2, 3, 4
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


def subject_degradation(cfg: DataConfig, sid: str) -> DegradationConfig:
    """The subject's degradation: the configured effects, or for level `mixed` its own draw
    from (data.seed, subject) (its "scanner"; the same for every rank and rerun)."""
    return cfg.degradation.effects(subject_rng(cfg.seed, sid, STREAM_DEGRADATION))


def stored_scale(cfg: DataConfig) -> tuple[int, int, int]:
    s = tuple(cfg.degradation.scale)
    ax = cfg.patches.slice_axis
    return (s[ax],) + tuple(s[a] for a in range(3) if a != ax)  # type: ignore[return-value]


@dataclass
class SubjectResult:
    """What processing one subject gives rank 0: its manifest row, its shard rows, stage seconds."""

    row: SubjectRow
    shards: list[ShardRow] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    reused: bool = False  # the previous run's shards verified; nothing was redone


def _shard_row(out: Path, path: Path, group: str, sid: str, kind: str, n: int) -> ShardRow:
    return ShardRow(relpath(out, path), group, sid, kind, sha256_file(path), int(n), path.stat().st_size)


def _write_hr_patches(out: Path, sid: str, hr_s: np.ndarray, origins: np.ndarray, cfg: DataConfig) -> ShardRow:
    """Source HR patches at LR `origins` (with `data.patches.source_margin` of context, from the
    edge-padded volume) and, with `data.degradation.truth`, the noise-free true degradation of
    each patch's centre."""
    sc = np.asarray(stored_scale(cfg))
    m0, m1 = cfg.patches.source_margin
    pad = np.array([m0, m1, m1]) * sc  # HR voxels of context per side
    size = tuple(int(v) for v in (np.asarray(patches.lr_size(cfg.patches)) * sc + 2 * pad))
    # the padded volume's origin o * sc holds the patch that starts pad voxels before o * sc
    vol = np.pad(hr_s, [(int(p), int(p)) for p in pad], mode="edge") if pad.any() else hr_s
    hr_p = patches.extract(vol, origins * sc, size)
    truth = None
    if cfg.degradation.truth:
        clean = kspace.degrade(patches.from_stored(hr_s, cfg.patches.slice_axis), subject_degradation(cfg, sid),
                               None, cfg.patches.slice_axis, noise=False)
        truth = patches.extract(patches.to_stored(clean, cfg.patches.slice_axis), origins, patches.lr_size(cfg.patches))
    path = shard_file(out, "source", sid)
    write_patches(path, hr_p, origins * sc, kind="hr", subject=sid, group="source", storage=cfg.storage, truth=truth)
    return _shard_row(out, path, "source", sid, "hr", len(hr_p))


def _write_lr_patches(out: Path, sid: str, lr_s: np.ndarray, origins: np.ndarray, cfg: DataConfig) -> ShardRow:
    lr_p = patches.extract(lr_s, origins, patches.lr_size(cfg.patches))
    path = shard_file(out, "target", sid)
    write_patches(path, lr_p, origins, kind="lr", subject=sid, group="target", storage=cfg.storage)
    return _shard_row(out, path, "target", sid, "lr", len(lr_p))


def build(subject: Subject, cfg: DataConfig, out: Path, row: SubjectRow, timings: dict[str, float]) -> list[ShardRow]:
    """Do the work: fill `row` (shards, patches, motion) and return the shard rows. Raises
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

    shards: list[ShardRow] = []
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
        row.shards["source"], row.patches["hr"] = shards[-1].path, shards[-1].patches
        return shards

    t = time.perf_counter()
    lr = kspace.degrade(hr, subject_degradation(cfg, sid), subject_rng(cfg.seed, sid, STREAM_NOISE), ax)
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
            row.motion = params
            t = time.perf_counter()
            shards.append(_write_hr_patches(out, sid, patches.to_stored(moved, ax), origins, cfg))
            row.shards["source"], row.patches["hr"] = shards[-1].path, shards[-1].patches
        else:
            t = time.perf_counter()
        shards.append(_write_lr_patches(out, sid, lr_s, origins, cfg))
        timings["write"] = time.perf_counter() - t
        row.shards["target"], row.patches["lr"] = shards[-1].path, shards[-1].patches
        return shards

    # val / test: whole paired volumes for evaluation
    t = time.perf_counter()
    hr_s = patches.to_stored(hr, ax)
    mask = head_mask(hr_s, cfg.patches.foreground_threshold)
    hr_aff = patches.stored_affine(vol.affine, ax)
    lr_aff = hr_aff @ np.diag([*stored_scale(cfg), 1]).astype(np.float64)
    path = shard_file(out, group, sid)
    write_volume(path, VolumePair(hr=hr_s, lr=lr_s, mask=mask, hr_affine=hr_aff, lr_affine=lr_aff, subject=sid,
                                  group=group, slice_axis=ax), cfg.storage)
    shards.append(_shard_row(out, path, group, sid, "volume", 0))
    timings["write"] = time.perf_counter() - t
    row.shards["volume"] = shards[-1].path
    return shards


def process(subject: Subject, cfg: DataConfig, out: str | os.PathLike) -> SubjectResult:
    """Process one subject. A bad input gives status "failed" with the error; any other
    exception propagates (a bug: the driver aborts the job)."""
    out = Path(out)
    t0 = time.perf_counter()
    res = SubjectResult(SubjectRow(subject.id, subject.group, subject.input, status="ok"))
    if subject.group != "unused":
        try:
            res.shards = build(subject, cfg, out, res.row, res.timings)
        except (ValueError, OSError, EOFError) as exc:
            msg = str(exc)
            if subject.input not in msg:
                msg = f"{subject.input}: {msg}"
            res.row = SubjectRow(subject.id, subject.group, subject.input, status="failed", error=msg)
            res.shards = []
    res.row.seconds = round(time.perf_counter() - t0, 4)
    return res
