"""Training-test data: the tiny data set from the real pipeline, and direct stand-in shards for
cases the pipeline cannot make (a NaN patch; an exact patch count)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from preprocessing.config import StorageConfig
from preprocessing.manifest import Manifest, ShardRow, SubjectRow, load_manifest, write_manifest
from preprocessing.shards import VolumePair, write_patches, write_volume

SLAB, LR = 3, 16  # udean/configs/tiny.yaml: data.patches.slab, lr_size


def _smooth(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth blobs in [0, 1]: low-frequency noise upsampled by repetition, then box-blurred."""
    coarse = rng.random(tuple(max(1, s // 4) for s in shape))
    x = coarse
    for axis, s in enumerate(shape):
        x = np.repeat(x, -(-s // x.shape[axis]), axis=axis).take(range(s), axis=axis)
    for axis in range(x.ndim):
        x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
    return x.astype(np.float32)


def _down2(x: np.ndarray) -> np.ndarray:
    """2x box average along every axis: (2D, 2H, 2W) -> (D, H, W)."""
    d, h, w = (s // 2 for s in x.shape)
    return x[:2 * d, :2 * h, :2 * w].reshape(d, 2, h, 2, w, 2).mean(axis=(1, 3, 5))


def write_tiny_shards(out: Path, n_per_shard: int = 16, nan_target_patch: int | None = None, lr: int = LR,
                      val_hr_shape: tuple[int, int, int] = (24, 40, 40)) -> Path:
    """2 source + 2 target patch shards of LR size `lr` and 1 val volume, in the preprocessing
    shard format."""
    rng = np.random.default_rng(0)
    storage = StorageConfig(dtype="float16")
    shards, subjects = [], []
    for group, kind, k in [("source", "hr", 0), ("source", "hr", 1), ("target", "lr", 2), ("target", "lr", 3)]:
        sid = f"s{k}"
        hr = np.stack([_smooth(rng, (2 * SLAB, 2 * lr, 2 * lr)) for _ in range(n_per_shard)])
        patches = hr if kind == "hr" else np.stack([_down2(p) for p in hr])
        if group == "target" and nan_target_patch is not None and k == 2:
            patches[nan_target_patch] = np.nan
        rel = f"shards/{group}/{sid}.h5"
        write_patches(out / rel, patches, np.zeros((n_per_shard, 3)), kind=kind, subject=sid, group=group,
                      storage=storage)
        shards.append(ShardRow(rel, group, sid, kind, "", n_per_shard, (out / rel).stat().st_size))
        subjects.append(SubjectRow(sid, group, "", "ok", shards={group: rel}, patches={kind: n_per_shard}))
    hr = _smooth(rng, val_hr_shape)
    rel = "volumes/val/v0.h5"
    write_volume(out / rel, VolumePair(hr, _down2(hr), np.ones_like(hr, dtype=np.uint8), np.eye(4),
                                       np.diag([2.0, 2, 2, 1]), "v0", "val"), storage)
    shards.append(ShardRow(rel, "val", "v0", "volume", "", 0, (out / rel).stat().st_size))
    subjects.append(SubjectRow("v0", "val", "", "ok", shards={"volume": rel}))
    write_manifest(Manifest(out, {}, "", subjects, shards))
    return record_hashes(out)


def record_hashes(out: Path) -> Path:
    """Put the files' real size and sha256 into the manifest rows (training checks them)."""
    from hpc.atomic import sha256_file

    m = load_manifest(out)
    for row in m.shards:
        row.sha256, row.bytes = sha256_file(out / row.path), (out / row.path).stat().st_size
    write_manifest(m)
    return out


def build_tiny_data(out: Path) -> Path:
    """The tiny data set of the training tests, built once per session by the real pipeline
    (`udean cohort` + `udean preprocess` with the shipped tiny config)."""
    if (out / "manifest.json").exists():
        return out
    cohort = out.parent / "tiny_cohort"
    env_bin = Path(sys.executable).parent
    for cmd in (["cohort", "--n", "6", "--out", cohort, "--anatomy", "phantom", "--shape", "64", "64", "48", "--no-progress"],
                ["preprocess", "--config", "tiny", "--data-root", cohort, "--out", out, "--no-progress"]):
        made = subprocess.run([env_bin / "udean", *map(str, cmd)], capture_output=True, text=True)
        assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    assert load_manifest(out).shard_paths("target") and load_manifest(out).volume_paths("val")
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return build_tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")


@pytest.fixture(scope="session")
def tiny_cohort(tiny_data) -> Path:
    """The synthetic cohort `tiny_data` was preprocessed from (6 subjects, 64x64x48)."""
    return tiny_data.parent / "tiny_cohort"


# --------------------------------------------------------------------------- sampler
