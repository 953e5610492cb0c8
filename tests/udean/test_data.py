"""udean.data: unpaired sampling, rank sharding, resumable order, HDF5 reads, whole-volume SR.

`build_tiny_data` is the data set of every training test: the real pipeline (`udean cohort` +
`udean preprocess` with configs/tiny.yaml) when it runs, else tiny shards written directly in the
shard format of preprocessing/shards.py (patches of smooth random blobs, LR = 2x box average).
"""
from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from preprocessing.config import StorageConfig
from preprocessing.manifest import Manifest, load_manifest, write_manifest
from preprocessing.shards import write_patches, write_volume
from udean.data.sampler import UnpairedSampler, rank_indices
from udean.data.shards import PatchShards, UnpairedPatches
from udean.data.volumes import load_pair, sr_volume

SLAB, LR = 3, 16  # configs/tiny.yaml: data.patches.slab, lr_size


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
        shards.append({"path": rel, "group": group, "subject": sid, "kind": kind, "sha256": "",
                       "patches": n_per_shard, "bytes": (out / rel).stat().st_size})
        subjects.append({"id": sid, "group": group, "status": "ok", "error": None, "shards": [rel],
                         "patches": n_per_shard})
    hr = _smooth(rng, val_hr_shape)
    rel = "volumes/val/v0.h5"
    write_volume(out / rel, hr=hr, lr=_down2(hr), mask=np.ones_like(hr, dtype=np.uint8), hr_affine=np.eye(4),
                 lr_affine=np.diag([2.0, 2, 2, 1]), subject="v0", group="val", slice_axis=0, storage=storage)
    shards.append({"path": rel, "group": "val", "subject": "v0", "kind": "volume", "sha256": "", "patches": 0,
                   "bytes": (out / rel).stat().st_size})
    subjects.append({"id": "v0", "group": "val", "status": "ok", "error": None, "shards": [rel], "patches": 0})
    write_manifest(Manifest(out, {}, "", subjects, shards))
    return out


def build_tiny_data(out: Path) -> Path:
    """The tiny data set, built once per session: real pipeline if it works, else direct shards."""
    if (out / "manifest.json").exists():
        return out
    cohort = out.parent / "tiny_cohort"
    env_bin = Path(sys.executable).parent
    made = subprocess.run([env_bin / "udean", "cohort", "--n", "6", "--out", str(cohort), "--shape", "64", "64", "48"],
                          capture_output=True, text=True)
    if made.returncode == 0:
        made = subprocess.run([env_bin / "udean", "preprocess", "--config", "tiny", "--data-root", str(cohort),
                               "--out", str(out)], capture_output=True, text=True)
    if made.returncode == 0 and load_manifest(out).shard_paths("target"):
        return out
    return write_tiny_shards(out)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return build_tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")


# --------------------------------------------------------------------------- sampler
def test_ranks_see_disjoint_patches_and_independent_source_order():
    n, b, steps, world = 64, 4, 8, 2
    per_rank = [UnpairedSampler(n, n, b, steps, seed=3, rank=r, world_size=world).pairs(epoch=0) for r in range(world)]
    targets = [set(p[:, 1].tolist()) for p in per_rank]
    assert len(targets[0]) == len(targets[1]) == b * steps
    assert not targets[0] & targets[1]
    sources = [set(p[:, 0].tolist()) for p in per_rank]
    assert not sources[0] & sources[1]
    # unpaired: the source index is not a function of the target index
    assert not np.array_equal(per_rank[0][:, 0], per_rank[0][:, 1])


def test_epochs_reshuffle_and_are_reproducible():
    s = UnpairedSampler(50, 40, 2, 5, seed=1)
    e0, e1 = s.pairs(0), s.pairs(1)
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(e0, UnpairedSampler(50, 40, 2, 5, seed=1).pairs(0))
    assert not np.array_equal(e0, UnpairedSampler(50, 40, 2, 5, seed=2).pairs(0))


def test_epoch_longer_than_group_starts_another_pass():
    idx = rank_indices(n=5, per_rank=12, seed=0, epoch=0, which=1, rank=0, world=1)
    assert sorted(idx[:5].tolist()) == list(range(5)) and sorted(idx[5:10].tolist()) == list(range(5))


def test_resume_mid_epoch_yields_the_remaining_pairs():
    full = list(UnpairedSampler(30, 30, 3, 6, seed=0, rank=1, world_size=2))
    s = UnpairedSampler(30, 30, 3, 6, seed=0, rank=1, world_size=2)
    s.set_position(epoch=0, step_in_epoch=4)
    state = s.state_dict()
    t = UnpairedSampler(30, 30, 3, 6, seed=0, rank=1, world_size=2)
    t.load_state_dict(state)
    assert list(t) == full[12:] and len(t) == len(full) - 12


def test_too_few_target_patches_is_a_clear_error():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        UnpairedSampler.default_steps(n_target=3, batch_size=2, world_size=2)


# --------------------------------------------------------------------------- shards
def test_patch_shards_read_across_files_and_in_workers(tiny_data):
    m = load_manifest(tiny_data)
    source, target = PatchShards(m.shard_paths("source")), PatchShards(m.shard_paths("target"))
    assert len(source) >= 16 and len(target) >= 16
    y, x = source[len(source) - 1], target[0]
    assert y.shape[0] == 2 * x.shape[0] and y.shape[1:] == tuple(2 * s for s in x.shape[1:])
    assert y.dtype == np.float32 and 0.0 <= y.min() and y.max() <= 1.0
    _ = target[0]
    clone = pickle.loads(pickle.dumps(target))  # what a DataLoader worker receives: no open handle
    assert clone._files == {} and np.array_equal(clone[0], target[0])
    ds = UnpairedPatches(source, target)
    sampler = UnpairedSampler(len(source), len(target), 2, 2, seed=0)
    one = [b for b in DataLoader(ds, batch_size=2, sampler=sampler, num_workers=0)]
    two = [b for b in DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2)]
    for (a_y, a_x), (b_y, b_x) in zip(one, two):
        assert torch.equal(a_y, b_y) and torch.equal(a_x, b_x)
    assert len(one) == 2 and one[0][0].shape == (2, *y.shape)


# --------------------------------------------------------------------------- volumes
@pytest.mark.parametrize("shape", [(12, 20, 20), (7, 17, 23)])
def test_sr_volume_of_an_exact_upsampler_is_the_upsampled_volume(shape):
    """Known answer: nearest x2 upsampling, tiled, equals nearest x2 of the whole volume."""
    lr = np.random.default_rng(0).random(shape).astype(np.float32)

    def up(t):  # (B, 3, h, w) -> (B, 6, 2h, 2w)
        return t.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)

    sr = sr_volume(up, lr, patch=(8, 8), overlap=0.25, batch=4, slab=3)
    want = lr.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    np.testing.assert_allclose(sr, want, atol=1e-6)


def test_load_pair_puts_the_slice_axis_first(tiny_data):
    path = load_manifest(tiny_data).volume_paths("val")[0]
    lr, hr = load_pair(path, slice_axis=0)
    assert hr.shape == tuple(2 * s for s in lr.shape)
    lr2, hr2 = load_pair(path, slice_axis=2)
    assert lr2.shape == (lr.shape[2], lr.shape[0], lr.shape[1])
