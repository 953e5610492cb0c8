"""udean.data: unpaired sampling, rank sharding, resumable order, HDF5 reads, whole-volume SR."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from preprocessing.manifest import load_manifest
from udean.data.sampler import UnpairedSampler, rank_indices
from udean.data.shards import PatchShards, UnpairedPatches, dihedral



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


def test_augmentation_draws_every_flip_reproducibly_and_is_off_by_default():
    plain = UnpairedSampler(40, 40, 4, 25, seed=5).pairs(0)
    assert plain.shape == (100, 4) and not plain[:, 2:].any()
    aug = UnpairedSampler(40, 40, 4, 25, seed=5, augment=True).pairs(0)
    np.testing.assert_array_equal(aug[:, :2], plain[:, :2])  # the same patches, only transformed
    assert set(aug[:, 2].tolist()) == set(range(8)) and not np.array_equal(aug[:, 2], aug[:, 3])
    np.testing.assert_array_equal(aug, UnpairedSampler(40, 40, 4, 25, seed=5, augment=True).pairs(0))


def test_dihedral_gives_eight_distinct_in_plane_transforms():
    t = torch.arange(2 * 4 * 4.0).view(2, 4, 4)
    outs = [dihedral(t, k) for k in range(8)]
    assert torch.equal(outs[0], t) and len({o.numpy().tobytes() for o in outs}) == 8
    for o in outs:  # each slice is transformed alike: slice order and values are kept
        assert torch.equal(o.sum(dim=(1, 2)), t.sum(dim=(1, 2)))
    assert dihedral(torch.zeros(3, 4, 6), 4).shape == (3, 4, 6)  # no transpose of a non-square patch


def _paired_patch() -> tuple[torch.Tensor, torch.Tensor]:
    """A real (LR, HR) patch pair: smooth random HR, LR by 3D k-space truncation (LR voxel j = HR
    voxel 2j), cut at an even HR origin."""
    from scipy import ndimage

    from preprocessing.config import DegradationConfig
    from preprocessing.kspace import kspace_degrade

    rng = np.random.default_rng(0)
    hr = ndimage.gaussian_filter(rng.random((24, 48, 48)), 1.5).astype(np.float32)
    hr = (hr - hr.min()) / (hr.max() - hr.min())
    lr = kspace_degrade(hr, DegradationConfig(), rng)
    return torch.from_numpy(lr[3:6, 4:20, 4:20].copy()), torch.from_numpy(hr[6:12, 8:40, 8:40].copy())


def test_paired_dihedral_keeps_the_lr_hr_pairing_under_all_eight_transforms():
    from udean.models.layers import downsample2

    lr, hr = _paired_patch()
    inner = (slice(None), slice(3, -3), slice(3, -3))  # away from the resampling's replicated edges

    def error(x, y):
        return (downsample2(y[None])[0] - x).abs()[inner].mean().item()

    base = error(lr, hr)
    assert base < 0.02
    for k in range(8):
        assert error(dihedral(lr, k), dihedral(hr, k, step=2)) == pytest.approx(base, rel=1e-5)
    # the plain flip of the HR patch is one HR voxel off its LR partner: the error doubles
    assert all(error(dihedral(lr, k), dihedral(hr, k)) > 2 * base for k in (1, 2, 3))
    # step 2 on a flip: HR voxel u -> 2h-2-u, the last one (beyond the LR grid) replicated
    y = dihedral(hr, 1, step=2)
    assert torch.equal(y[..., :-1], hr.flip(-1)[..., 1:]) and torch.equal(y[..., -1], hr[..., 0])


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
