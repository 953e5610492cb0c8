"""udean/fidelity.py on known operators: the noise estimator returns a known sigma, identical
distributions give a profile distance ~0 and a known blur moves it, the true degradation gives
PSNR = inf against the truth; a training run logs fidelity rows and image summaries."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from udean import fidelity


def smooth_batch(n: int = 16, seed: int = 0, size: int = 32) -> torch.Tensor:
    """(n, 3, size, size) smooth random images in [0.2, 0.8]: a stationary random process."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size // 8, size // 8, generator=g)
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return (0.2 + 0.6 * (x - x.amin()) / (x.amax() - x.amin())).clamp(0, 1)


def blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    t = torch.arange(7, dtype=torch.float32) - 3
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    b, s, h, w = x.shape
    y = F.pad(x.reshape(b * s, 1, h, w), (3, 3, 3, 3), mode="replicate")
    y = F.conv2d(F.conv2d(y, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))
    return y.reshape(b, s, h, w)


@pytest.mark.parametrize("sigma", [0.005, 0.01, 0.03])
def test_noise_estimator_returns_a_known_sigma_within_10_percent(sigma):
    x = smooth_batch()
    g = torch.Generator().manual_seed(1)
    noisy = x + sigma * torch.randn(x.shape, generator=g)
    assert fidelity.noise_sigma(noisy) == pytest.approx(sigma, rel=0.1)
    rician = torch.sqrt((x + sigma * torch.randn(x.shape, generator=g)) ** 2 + (sigma * torch.randn(x.shape, generator=g)) ** 2)
    assert fidelity.noise_sigma(rician) == pytest.approx(sigma, rel=0.1)  # high SNR: Rician ~ Gaussian
    assert fidelity.noise_sigma(x) < 0.25 * 0.005  # the anatomy alone reads far below the smallest noise
    for est in (fidelity.noise_level(noisy), fidelity.noise_level(rician)):  # the loss's twin
        assert float(est) == pytest.approx(sigma, rel=0.1)
    assert float(fidelity.noise_level(x)) < 0.25 * 0.005
    per_patch = fidelity.noise_levels(torch.cat([x[:8] + sigma * torch.randn(x[:8].shape, generator=g),
                                                 x[8:] + 2 * sigma * torch.randn(x[8:].shape, generator=g)]))
    assert per_patch.shape == (16,)  # each patch its own level: the probe's noise_spread_*
    assert per_patch[:8].numpy() == pytest.approx(sigma, rel=0.15)
    assert per_patch[8:].numpy() == pytest.approx(2 * sigma, rel=0.15)


def test_profile_distance_is_zero_for_one_distribution_and_moved_by_a_known_blur():
    a, b = smooth_batch(seed=2), smooth_batch(seed=3)
    g = torch.Generator().manual_seed(4)
    a = a + 0.01 * torch.randn(a.shape, generator=g)
    b = b + 0.01 * torch.randn(b.shape, generator=g)
    same = fidelity.profile_distance(a, b)
    assert fidelity.profile_distance(a, a) == 0.0
    assert same < 0.1
    blurred = fidelity.profile_distance(blur(a), b)
    assert blurred > 5 * same
    pa, pb = fidelity.radial_profile(a), fidelity.radial_profile(blur(a))
    assert pa.shape == (16,) and (pb[-4:] < pa[-4:] - 0.5).all()  # the blur removed the outer rings
    assert (pb[:2] - pa[:2]).abs().max() < 0.2  # and kept the inner ones


class KnownDegradation(nn.Module):
    """A stand-in generator whose degradation is a known operator of the probe's truth:
    X_{s~t} = op(truth) (+ noise)."""

    def __init__(self, truth: torch.Tensor, op=lambda t: t, sigma: float = 0.01):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.truth, self.op, self.sigma = truth, op, sigma

    def degrade(self, y_s, noise: bool = True):
        x = self.op(self.truth)
        return x + self.sigma * torch.randn(x.shape) if noise else x

    def sr(self, x):
        return F.interpolate(x[:, None], scale_factor=2, mode="nearest")[:, 0]


def test_probe_truth_psnr_is_inf_for_the_true_operator_and_finite_for_a_blur():
    truth = smooth_batch(8, seed=5)
    g = torch.Generator().manual_seed(6)
    x_t = truth + 0.01 * torch.randn(truth.shape, generator=g)  # the target: the same degradation, noisy
    probe = fidelity.Probe(torch.zeros(8, 6, 64, 64), x_t, truth)
    state = torch.get_rng_state()
    true = probe.measure(KnownDegradation(truth))
    assert torch.equal(torch.get_rng_state(), state)  # measuring draws from a forked RNG
    assert true["psnr_truth"] == 1e9  # +inf, written finitely for JSON
    assert true["noise_st"] == pytest.approx(true["noise_t"], rel=0.15)
    assert true["noise_t"] == pytest.approx(0.01, rel=0.1)
    blurred = probe.measure(KnownDegradation(truth, blur))
    assert 20 < blurred["psnr_truth"] < 60
    assert blurred["profile_distance"] > 3 * true["profile_distance"]
    assert probe.measure(KnownDegradation(truth)) == true  # the same noise every time: comparable rows
    images = probe.images(KnownDegradation(truth))
    assert set(images) == {"y_s", "x_st", "x_t", "sr_x_t"}
    assert images["x_st"].shape == images["x_t"].shape == (32, 32)  # LR patches
    assert images["y_s"].shape == images["sr_x_t"].shape == (64, 64)  # HR ones


@pytest.fixture(scope="module")
def truth_data(tmp_path_factory):
    """The tiny pipeline at level pf_noise with the truth and 1 / 2 LR voxels of source margin."""
    from preprocessing.cohort import write_cohort
    from preprocessing.driver import preprocess
    from udean.config import load

    root = tmp_path_factory.mktemp("fidelity")
    write_cohort(root / "cohort", 6, (64, 64, 48), seed=0, progress=False)
    cfg = load("tiny", [f"data.root={root / 'cohort'}", f"data.out={root / 'data'}", "data.degradation.level=pf_noise",
                        "data.degradation.truth=true", "data.patches.source_margin=[1,2]"])
    assert not preprocess(cfg.data, progress=False).failed
    return root / "data"


def test_training_logs_fidelity_rows_and_image_summaries(truth_data, tmp_path):
    """A real `udean train` (DeepSpeed, one process) of the physics degradation with source
    margins on data with the truth: fidelity rows in metrics.jsonl at steps 1, 2, 4 (target-side
    statistics and psnr_truth), image summaries in TensorBoard; a model whose margin differs
    from the data's is refused before any step."""
    from udean.config import load
    from udean.train import train

    port = os.environ.get("MASTER_PORT")
    physics = ["model.degradation=physics", "model.degradation_noise=true", "model.decimation=kspace"]
    cfg = load("tiny", [f"data.out={truth_data}", f"train.out={tmp_path / 'run'}", "train.fidelity_every=2",
                        "train.image_every=4", "model.source_margin=[1,2]", *physics])
    assert train(cfg) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fid = [r for r in rows if r["kind"] == "fidelity"]
    assert [r["step"] for r in fid] == [1, 2, 4]
    for r in fid:
        assert {"noise_st", "noise_t", "profile_distance", "psnr_truth"} <= set(r)
        assert 20 < r["psnr_truth"] < 60 and np.isfinite(r["profile_distance"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert {"images/x_st", "images/y_s", "images/x_t", "images/sr_x_t"} <= set(acc.Tags()["images"])
    assert "fidelity/psnr_truth" in acc.Tags()["scalars"]
    wrong = load("tiny", [f"data.out={truth_data}", f"train.out={tmp_path / 'wrong'}", "model.source_margin=[2,4]",
                          *physics])
    with pytest.raises(ValueError, match="source_margin"):
        train(wrong)
    # also after the refusal, the in-process job has put the launcher variables back: children
    # started later by this process choose their own port (CI saw EADDRINUSE in every later test)
    assert os.environ.get("MASTER_PORT") == port
