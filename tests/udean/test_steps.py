"""What chooses best/ (udean/steps.py `criterion`) and the learned degradation of a whole val
volume (`learned_lr`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from preprocessing.manifest import Manifest, ShardRow, SubjectRow
from udean.config import load
from udean.steps import criterion, learned_lr


def manifest(own: bool, vols: dict[str, tuple[str, str | None]]) -> tuple[Manifest, list[str]]:
    """A manifest whose val volumes are `vols`: subject -> (its row's group, lr_source)."""
    out = Path("/data")
    rows = [SubjectRow(sid, group, f"{sid}.nii.gz", "ok", lr_source=source) for sid, (group, source) in vols.items()]
    shards = [ShardRow(f"volumes/val/{sid}.h5", "val", sid, "volume", "", 0, 1) for sid in vols]
    m = Manifest(out, {"own": {"hr": "hr", "lr": "lr"}} if own else {}, "", rows, shards)
    return m, [str(p) for p in m.volume_paths("val")]


def test_best_is_chosen_by_what_measures_the_target():
    # the synthetic protocol (HCP, the cohort): val LR has the target's own degradation
    assert criterion("auto", *manifest(False, {"v": ("val", None)}))[0] == "psnr"
    # own data, paired acquired scans: PSNR against their HR measures it too
    assert criterion("auto", *manifest(True, {"p": ("val", "acquired"), "l": ("target", "acquired")}))[0] == "psnr"
    # own data, held-out HR with synthetic (truncation) LR: not the target's degradation
    m, vols = manifest(True, {"h": ("val", "synthetic"), "l": ("target", "acquired")})
    by, learned = criterion("auto", m, vols)
    assert by == "learned" and learned == ["/data/volumes/val/h.h5"]
    # only LR-only volumes: nothing measures the SR, best/ = last/
    assert criterion("auto", *manifest(True, {"l": ("target", "acquired")})) == ("last", [])
    assert criterion("psnr", m, vols) == ("psnr", [])  # asked for
    with pytest.raises(ValueError, match="train.best_by=learned: no val volume has an HR scan"):
        criterion("learned", *manifest(True, {"l": ("target", "acquired")}))


@pytest.mark.parametrize("degradation", ["physics", "decoder"])
def test_learned_lr_degrades_a_whole_volume_without_moving_the_training_rng(degradation):
    from udean.models.udean import build

    cfg = load("tiny", [f"model.degradation={degradation}", "model.degradation_noise=true"])
    gen, _ = build(cfg.model, slab=3)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the untrained start: the noise and the decoder act
    hr = np.random.default_rng(0).random((17, 24, 20)).astype(np.float32)  # odd: the last HR slice has no LR voxel
    state = torch.random.get_rng_state()
    a = learned_lr(gen, hr, 3, torch.float32, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.shape == (8, 12, 10) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, learned_lr(gen, hr, 3, torch.float32, seed=5))  # the same noise draw
    assert not np.array_equal(a, learned_lr(gen, hr, 3, torch.float32, seed=6))
    # it is the generator's own X_{s~t}: the same operator the training step applies to a patch
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(5)
        x = gen.degrade(torch.as_tensor(hr[:6, :24, :20])[None])[0].clamp(0, 1).numpy()
    if degradation == "decoder":  # thin slabs of 6 HR slices: the first slab is exactly one patch
        np.testing.assert_allclose(a[:3], x, atol=1e-5)
    else:
        assert np.corrcoef(a[:2].ravel(), x[:2].ravel())[0, 1] > 0.9
