"""Patch sets for the comparison methods, from a preprocessed data folder (manifest + shards).

Arrays are float32 in the public layout: LR (N, S, h, w), HR (N, 2S, 2h, 2w), stored order
(slice axis first), as `preprocessing.shards` writes them.

- `misaligned_pairs`: misaligned mode writes shards/source/<id>.h5 (moved HR) and
  shards/target/<id>.h5 (LR) at the same patch origins: patch k of both is a misaligned pair
  (Table I, benchmark 1).
- `registered_pairs`: the same LR patches with HR patches cut, at the same origins, from the
  moved HR volume rigidly registered back to the LR volume (benchmark 2; `registration.py`).
- `synthetic_pairs`: HR patches with LR from 3D nearest downsampling (benchmark 3), or from any
  `preprocessing.kspace.degrade` config at volume level (`degraded_pairs`, the shift study).
- `unpaired_pools`: source HR and target LR patches, drawn independently (unsupervised methods);
  source HR without the context margins a data set may store (`source_hr`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from preprocessing import kspace, motion, nifti, patches
from preprocessing.config import DataConfig, DegradationConfig
from preprocessing.manifest import Manifest
from preprocessing.shards import read_patches
from preprocessing.subject import STREAM_NOISE, STREAM_PATCHES, stored_scale, subject_degradation, subject_rng
from udean.data.shards import dihedral

Batch = Callable[[int], tuple[torch.Tensor, ...]]


def data_config(m: Manifest) -> DataConfig:
    return DataConfig(**m.config)


def read_shards(paths: list[Path]) -> np.ndarray:
    """Every patch of `paths`, concatenated in order."""
    if not paths:
        raise ValueError("no patch shards to read")
    return np.concatenate([read_patches(p) for p in paths])


def without_margin(hr: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """Source HR patches (N, 2S + 4 m0, ...) -> (N, 2S, 2h, 2w): the centre, without the context
    margins a data set may store for model.source_margin (`data.patches.source_margin`)."""
    m0, m1 = cfg.patches.source_margin
    a, b = (s * m for s, m in zip(stored_scale(cfg)[:2], (m0, m1)))
    return np.ascontiguousarray(hr[:, a:hr.shape[1] - a, b:hr.shape[2] - b, b:hr.shape[3] - b])


def source_hr(m: Manifest) -> np.ndarray:
    """Every source HR patch, without margins: (N, 2S, 2h, 2w)."""
    return without_margin(read_shards(m.shard_paths("source")), data_config(m))


def unpaired_pools(m: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(target LR patches, source HR patches): the unsupervised methods' training data."""
    return read_shards(m.shard_paths("target")), source_hr(m)


def _by_subject(m: Manifest, group: str) -> dict[str, Path]:
    return {p.stem: p for p in m.shard_paths(group)}


def misaligned_pairs(m: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(LR, moved HR) patch pairs of a misaligned-mode data set, subject by subject."""
    if data_config(m).mode != "misaligned":
        raise ValueError(f"{m.out}: misaligned pairs need data.mode=misaligned, got {data_config(m).mode!r}")
    lr, hr = _by_subject(m, "target"), _by_subject(m, "source")
    if sorted(lr) != sorted(hr):
        raise ValueError(f"{m.out}: source and target subjects differ; not a misaligned data set")
    xs, ys = [], []
    for sid in sorted(lr):
        x, y = read_patches(lr[sid]), without_margin(read_patches(hr[sid]), data_config(m))
        if len(x) != len(y):
            raise ValueError(f"{sid}: {len(x)} LR patches but {len(y)} HR patches")
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def load_hr(m: Manifest, sid: str) -> np.ndarray:
    """A subject's HR volume as preprocessing saw it: canonical (X, Y, Z), [0, 1] (own data: its
    data.own.intensity scaling, as its source patches), even-cropped."""
    cfg = data_config(m)
    scan = nifti.load_scan(m.subject(sid).input, nifti.scan_spec(cfg, "HR"))
    return kspace.even_crop(scan.data, tuple(cfg.degradation.scale))


def target_lr(m: Manifest, sid: str, hr: np.ndarray) -> np.ndarray:
    """The subject's target LR volume, canonical: the same draw preprocessing made."""
    cfg = data_config(m)
    return kspace.degrade(hr, subject_degradation(cfg, sid), subject_rng(cfg.seed, sid, STREAM_NOISE),
                          cfg.patches.slice_axis)


def _hr_patches(hr_canonical: np.ndarray, lr_origins: np.ndarray, cfg: DataConfig) -> np.ndarray:
    sc = np.asarray(stored_scale(cfg))
    size = tuple(int(v) for v in np.asarray(patches.lr_size(cfg.patches)) * sc)
    return patches.extract(patches.to_stored(hr_canonical, cfg.patches.slice_axis), lr_origins * sc, size)


def registered_pairs(m: Manifest, progress: Callable[[str], None] | None = None,
                     **register_kw) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(LR, registered HR) patch pairs of a misaligned data set, and one registration report per
    subject. Registration runs at volume level (moved HR -> target LR, Mattes MI, Euler3D) before
    patching: patches are too small for a stable mutual-information estimate."""
    import h5py

    from preprocessing.registration import register_rigid

    cfg = data_config(m)
    lr_paths = _by_subject(m, "target")
    xs, ys, reports = [], [], []
    for sid in sorted(lr_paths):
        if progress is not None:
            progress(sid)
        row = m.subject(sid)
        if row.motion is None:
            raise ValueError(f"{sid}: no motion parameters in the manifest; not a misaligned data set")
        hr = load_hr(m, sid)
        moved = motion.apply(hr, row.motion)
        lr = target_lr(m, sid, hr)
        registered, report = register_rigid(lr, moved, scale=tuple(cfg.degradation.scale), **register_kw)
        with h5py.File(lr_paths[sid], "r") as f:
            origins = np.asarray(f["origins"][()], dtype=np.int64)
        xs.append(read_patches(lr_paths[sid]))
        ys.append(_hr_patches(registered, origins, cfg))
        # the registration's own check: voxel error vs the unmoved HR, before and after
        report.update(subject=sid, mae_moved=float(np.abs(moved - hr).mean()),
                      mae_registered=float(np.abs(registered - hr).mean()))
        reports.append(report)
    return np.concatenate(xs), np.concatenate(ys), reports


def nearest_pairs(hr: np.ndarray, scale: tuple[int, int, int] = (2, 2, 2)) -> tuple[np.ndarray, np.ndarray]:
    """HR patches (N, 2S, 2h, 2w) -> (3D nearest-downsampled LR, HR) (benchmark 3). HR patch
    origins are even, so this equals nearest downsampling of the volume, then patching."""
    lr = np.stack([kspace.nearest_degrade(p, scale) for p in hr])
    return lr, hr


def degraded_pairs(m: Manifest, degradation: DegradationConfig, group: str = "source",
                   seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic (LR, HR) pairs from `group`'s HR volumes, LR = `degradation` of the whole volume
    (k-space effects need the whole spectrum), patched as preprocessing patches the target group.
    Level `mixed`: each subject's own draw (`subject_degradation`, the data set's seed)."""
    cfg = data_config(m)
    own = cfg.model_copy(update={"degradation": degradation})
    ax = cfg.patches.slice_axis
    sids = sorted(r.id for r in m.subjects if r.group == group and r.status == "ok")
    if not sids:
        raise ValueError(f"{m.out}: no {group} subjects")
    xs, ys = [], []
    for sid in sids:
        hr = load_hr(m, sid)
        lr = kspace.degrade(hr, subject_degradation(own, sid), subject_rng(seed, sid, STREAM_NOISE), ax)
        lr_s = patches.to_stored(lr, ax)
        origins = patches.select_origins(lr_s, cfg.patches, subject_rng(seed, sid, STREAM_PATCHES))
        xs.append(patches.extract(lr_s, origins, patches.lr_size(cfg.patches)))
        ys.append(_hr_patches(hr, origins, cfg))
    return np.concatenate(xs), np.concatenate(ys)


# --------------------------------------------------------------------------- batches
def sampler(*pools: np.ndarray, batch_size: int, seed: int, paired: bool, augment: bool = False,
            device: str | torch.device = "cpu") -> Batch:
    """step -> one batch from each pool. `paired`: the same indices in every pool (pairs);
    else independent draws (unpaired). Deterministic in (seed, step). `augment`: the same random
    in-plane flip / rotation for every pool of the batch (ZSSR's augmentation), on each pool's
    own grid so that LR voxel j stays at HR voxel 2j (`dihedral` with `step`)."""
    tensors = [torch.as_tensor(np.ascontiguousarray(p, dtype=np.float32)) for p in pools]
    if paired and len({len(t) for t in tensors}) != 1:
        raise ValueError(f"paired pools differ in length: {[len(t) for t in tensors]}")
    if any(len(t) == 0 for t in tensors):
        raise ValueError("empty patch pool")

    def batch(step: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(tensors[0]), (batch_size,), generator=g)
        out = []
        for i, t in enumerate(tensors):
            j = idx if paired or i == 0 else torch.randint(len(t), (batch_size,), generator=g)
            out.append(t[j])
        if augment:
            k = int(torch.randint(8, (1,), generator=g))
            # a coarser pool's voxel j is voxel step * j of a finer one: flips keep the pairing
            coarse = min(t.shape[-1] for t in out)
            out = [dihedral(t, k, step=t.shape[-1] // coarse) for t in out]
        return tuple(t.to(device) for t in out)

    return batch
