"""One subject, start to finish: load -> degrade / move -> patches or volumes -> shards.

Own data (data.own; `build` hands over to `build_own_lr` / `build_pair`): an HR scan is loaded
onto the HR grid and used as in the paper protocol (source patches, or a held-out val/test
volume with synthetic LR); an LR scan is loaded onto the LR grid and used as acquired (target
patches, and an LR-only val volume when chosen); a paired val/test subject's HR is resampled
onto its acquired LR's x2 grid in world coordinates (optionally registered rigidly) and both
are cut to the field of view they share.

Deterministic from (data config, subject id): every random draw comes from
`subject_rng(seed, id, stream)` = `np.random.default_rng([seed, crc32(id), stream])`, so the
output does not depend on which rank ran the subject, or when."""
from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from preprocessing import geometry, intensity, kspace, motion, nifti, patches
from preprocessing.config import SCALE, DataConfig, DegradationConfig
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


def brain_mask(subject: Subject, affine: np.ndarray, shape: tuple[int, ...], notes: list[str]) -> np.ndarray | None:
    """The subject's brain mask (canonical, uint8) where its file lies on the scan's canonical
    grid (`affine`, `shape`, before any crop), else None with a note: HCP's brainmask_fs is on the
    acpc grid, which world coordinates do not relate to the unprocessed scan's."""
    if not subject.brain:
        return None
    img = nib.as_closest_canonical(nifti.read_canonical(subject.brain))
    if tuple(img.shape) != tuple(shape) or not np.allclose(img.affine, affine, atol=1e-3):
        notes.append(f"{subject.brain}: not on the scan's grid ({tuple(img.shape)} vs {tuple(shape)}): no brain region")
        return None
    return (nifti.voxel_data(img, subject.brain) > 0.5).astype(np.uint8)


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
    notes: list[str] = field(default_factory=list)  # said once in the log (e.g. a scan resampled)


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


def _check_size(path: str, shape: tuple[int, ...], cfg: DataConfig, kind: str) -> None:
    """ValueError naming `path` when a canonical volume of `shape` cannot hold one patch of `kind`."""
    ax = cfg.patches.slice_axis
    need = np.asarray(patches.lr_size(cfg.patches)) * (np.asarray(stored_scale(cfg)) if kind == "HR" else 1)
    stored_shape = np.asarray((shape[ax],) + tuple(shape[a] for a in range(3) if a != ax))
    if np.any(stored_shape < need):
        raise ValueError(f"{path}: shape {tuple(shape)} is smaller than one {kind} patch "
                         f"{tuple(int(v) for v in need)} (slices first)")


def _resampled_note(role: str, rec: dict, slice_axis: int) -> list[str]:
    notes = []
    if rec.get("resampled"):
        notes.append(f"{role} scan resampled: voxel {geometry.fmt(rec['input_voxel_mm'])} mm "
                     f"{tuple(rec['input_shape'])} -> {geometry.fmt(rec['voxel_mm'])} mm {tuple(rec['shape'])}")
    if role == "LR" and rec.get("thick_axis", slice_axis) != slice_axis:
        notes.append(f"its thick slices run along canonical axis {rec['thick_axis']} (RAS), but the thin slabs are "
                     f"cut along data.patches.slice_axis={slice_axis} (README \"Your own data\")")
    return notes


def build(subject: Subject, cfg: DataConfig, out: Path, row: SubjectRow, timings: dict[str, float],
          notes: list[str] | None = None) -> list[ShardRow]:
    """Do the work: fill `row` (shards, patches, motion; own data: lr_input, lr_source, scans)
    and return the shard rows; `notes` gets what the log should say once. Raises ValueError
    for a bad input."""
    sid, group = subject.id, subject.group
    notes = [] if notes is None else notes
    if os.environ.get(CRASH_ENV) == sid:
        raise RuntimeError(f"{CRASH_ENV}={sid}: injected internal error")
    if subject.error:
        raise ValueError(subject.error)
    own = cfg.own.enabled
    if own and group == "target":
        return build_own_lr(subject, cfg, out, row, timings, notes)
    if own and subject.lr_input:
        return build_pair(subject, cfg, out, row, timings, notes)
    ax = cfg.patches.slice_axis
    scale = tuple(cfg.degradation.scale)

    t = time.perf_counter()
    vol = nifti.load_scan(subject.input, nifti.scan_spec(cfg, "HR"))
    hr = kspace.even_crop(vol.data, scale)
    timings["load"] = time.perf_counter() - t
    _check_size(subject.input, hr.shape, cfg, "HR")
    if own:
        row.scans = {"hr": vol.record}
        notes += _resampled_note("HR", vol.record, ax)
        if group in ("val", "test"):
            row.lr_source = "synthetic"

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
    brain = None if own else brain_mask(subject, vol.affine, vol.data.shape, notes)
    if brain is not None:
        brain = patches.to_stored(kspace.even_crop(brain, scale), ax)
    hr_aff = patches.stored_affine(vol.affine, ax)
    lr_aff = hr_aff @ np.diag([*stored_scale(cfg), 1]).astype(np.float64)
    path = shard_file(out, group, sid)
    write_volume(path, VolumePair(hr=hr_s, lr=lr_s, mask=mask, hr_affine=hr_aff, lr_affine=lr_aff, subject=sid,
                                  group=group, slice_axis=ax, brain=brain), cfg.storage)
    shards.append(_shard_row(out, path, group, sid, "volume", 0))
    timings["write"] = time.perf_counter() - t
    row.shards["volume"] = shards[-1].path
    return shards


def build_own_lr(subject: Subject, cfg: DataConfig, out: Path, row: SubjectRow, timings: dict[str, float],
                 notes: list[str] | None = None) -> list[ShardRow]:
    """An authentic LR scan: onto the LR grid, used as acquired -> target patches (and, when
    `subject.lr_val`, an LR-only val volume)."""
    sid, ax = subject.id, cfg.patches.slice_axis
    t = time.perf_counter()
    scan = nifti.load_scan(subject.input, nifti.scan_spec(cfg, "LR"))
    timings["load"] = time.perf_counter() - t
    _check_size(subject.input, scan.data.shape, cfg, "LR")
    row.lr_source, row.scans = "acquired", {"lr": scan.record}
    if notes is not None:
        notes += _resampled_note("LR", scan.record, ax)
    lr_s = patches.to_stored(scan.data, ax)
    t = time.perf_counter()
    origins = patches.select_origins(lr_s, cfg.patches, subject_rng(cfg.seed, sid, STREAM_PATCHES))
    timings["patches"] = time.perf_counter() - t
    t = time.perf_counter()
    shards = [_write_lr_patches(out, sid, lr_s, origins, cfg)]
    row.shards["target"], row.patches["lr"] = shards[-1].path, shards[-1].patches
    if subject.lr_val:
        lr_aff = patches.stored_affine(scan.affine, ax)
        path = shard_file(out, "val", sid)
        write_volume(path, VolumePair(hr=None, lr=lr_s, mask=None, hr_affine=lr_aff @ np.diag([0.5, 0.5, 0.5, 1.0]),
                                      lr_affine=lr_aff, subject=sid, group="val", slice_axis=ax, lr_source="acquired"),
                     cfg.storage)
        shards.append(_shard_row(out, path, "val", sid, "volume", 0))
        row.shards["volume"] = shards[-1].path
    timings["write"] = time.perf_counter() - t
    return shards


def build_pair(subject: Subject, cfg: DataConfig, out: Path, row: SubjectRow, timings: dict[str, float],
               notes: list[str]) -> list[ShardRow]:
    """A paired val/test subject of own data: the acquired LR onto the LR grid; the HR scan
    (checked against the HR grid, scaled on its own grid) resampled onto the LR's x2 grid in
    world coordinates, optionally registered rigidly (data.own.registration); both cut to the
    LR voxels whose x2 block the HR covers. LR voxel j = HR voxel 2j, as everywhere."""
    sid, group, ax, own = subject.id, subject.group, cfg.patches.slice_axis, cfg.own
    t = time.perf_counter()
    lr_scan = nifti.load_scan(subject.lr_input, nifti.scan_spec(cfg, "LR"))
    spec = nifti.scan_spec(cfg, "HR")
    img = nifti.read_canonical(subject.input)
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    geometry.check_voxels(subject.input, zooms, spec.voxel_mm, spec.tolerance_mm, spec.max_resample, spec.role)
    img = nib.as_closest_canonical(img)
    hr_raw = nifti.voxel_data(img, subject.input)
    try:
        scaling = intensity.fit(hr_raw, spec.intensity, spec.percentiles)
    except ValueError as exc:
        raise ValueError(f"{subject.input}: {exc}") from None
    intensity.apply(hr_raw, scaling)
    lr, lr_aff = lr_scan.data, lr_scan.affine
    shape = tuple(SCALE * n for n in lr.shape)
    grid_aff = lr_aff @ np.diag([1.0 / SCALE] * 3 + [1.0])
    hr = geometry.to_grid(hr_raw, img.affine, shape, grid_aff, mode="constant")
    covered = geometry.coverage(hr_raw.shape, img.affine, shape, grid_aff)
    timings["load"] = time.perf_counter() - t
    # the LR voxels whose whole x2 block lies inside the HR's field of view
    x, y, z = lr.shape
    block = covered[:SCALE * x, :SCALE * y, :SCALE * z].reshape(x, SCALE, y, SCALE, z, SCALE).all(axis=(1, 3, 5))
    if not block.any():
        raise ValueError(f"{subject.input}: no overlap with its LR scan {subject.lr_input} in world coordinates")
    box = [np.flatnonzero(block.any(axis=tuple(a for a in range(3) if a != k))) for k in range(3)]
    lo = np.array([b[0] for b in box])
    hi = np.array([b[-1] + 1 for b in box])
    lr = lr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    hr = np.ascontiguousarray(hr[SCALE * lo[0]:SCALE * hi[0], SCALE * lo[1]:SCALE * hi[1], SCALE * lo[2]:SCALE * hi[2]])
    covered = covered[SCALE * lo[0]:SCALE * hi[0], SCALE * lo[1]:SCALE * hi[1], SCALE * lo[2]:SCALE * hi[2]]
    shift = np.eye(4)
    shift[:3, 3] = lo
    lr_aff = lr_aff @ shift
    _check_size(f"{subject.input} with {subject.lr_input} (their shared field of view)", lr.shape, cfg, "LR")
    rec_hr = {"input_voxel_mm": [round(float(v), 6) for v in zooms], "input_shape": list(hr_raw.shape),
              "voxel_mm": [round(float(v), 6) for v in geometry.voxel_sizes(grid_aff)], "shape": list(hr.shape),
              "resampled": True, "intensity": scaling.to_dict()}
    if own.registration == "rigid":
        from preprocessing.registration import register_rigid

        t = time.perf_counter()
        hr, rec_hr["registration"] = register_rigid(lr, hr, seed=cfg.seed)
        timings["registration"] = time.perf_counter() - t
    t = time.perf_counter()
    hr_s, lr_s = patches.to_stored(hr, ax), patches.to_stored(lr, ax)
    mask = head_mask(hr_s, cfg.patches.foreground_threshold) & patches.to_stored(covered, ax).astype(np.uint8)
    lr_aff_s = patches.stored_affine(lr_aff, ax)
    path = shard_file(out, group, sid)
    write_volume(path, VolumePair(hr=hr_s, lr=lr_s, mask=mask, hr_affine=lr_aff_s @ np.diag([1.0 / SCALE] * 3 + [1.0]),
                                  lr_affine=lr_aff_s, subject=sid, group=group, slice_axis=ax, lr_source="acquired"),
                 cfg.storage)
    timings["write"] = time.perf_counter() - t
    row.lr_input, row.lr_source = subject.lr_input, "acquired"
    row.scans = {"hr": rec_hr, "lr": {**lr_scan.record, "cropped_to": list(lr.shape)}}
    notes += _resampled_note("LR", lr_scan.record, ax)
    row.shards["volume"] = relpath(out, path)
    return [_shard_row(out, path, group, sid, "volume", 0)]


def process(subject: Subject, cfg: DataConfig, out: str | os.PathLike) -> SubjectResult:
    """Process one subject. A bad input gives status "failed" with the error; any other
    exception propagates (a bug: the driver aborts the job)."""
    out = Path(out)
    t0 = time.perf_counter()
    res = SubjectResult(SubjectRow(subject.id, subject.group, subject.input, status="ok", lr_input=subject.lr_input))
    if subject.group != "unused":
        try:
            res.shards = build(subject, cfg, out, res.row, res.timings, res.notes)
        except (ValueError, OSError, EOFError) as exc:
            msg = str(exc)
            if subject.input not in msg and not (subject.lr_input and subject.lr_input in msg):
                msg = f"{subject.input}: {msg}"
            res.row = SubjectRow(subject.id, subject.group, subject.input, status="failed", error=msg,
                                 lr_input=subject.lr_input)
            res.shards, res.notes = [], []
    res.row.seconds = round(time.perf_counter() - t0, 4)
    return res
