"""udean.baselines: every comparison method learns on a tiny case (beats its own initialisation),
and the pieces they share (loop, pairs, registration, DASR's distance map) do what they say."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from preprocessing import kspace, motion, patches
from preprocessing.config import DegradationConfig
from preprocessing.synthetic import synth_subject
from udean.baselines import pairs
from udean.baselines.cyclegan import CycleGANSR
from udean.baselines.dasr import DASR, distance_weights, lowpass
from udean.baselines.loop import Budget, fit
from preprocessing.registration import register_rigid
from udean.baselines.supervised import SupervisedTSRCAN, sr_loss
from udean.baselines.zssr import ZSSR, downscale, internal_pairs
from udean.config import load
from udean.engines import adam
from udean.infer import Inferer
from udean.metrics import psnr

SHAPE = (64, 64, 48)
SLAB, PATCH = 3, (16, 16)


def head(seed: int) -> np.ndarray:
    vol, _ = synth_subject(seed, SHAPE)
    return (vol / vol.max()).astype(np.float32)


def patch_pairs(hr: np.ndarray, lr: np.ndarray, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """(LR, HR) patch pairs of canonical volumes (slice axis 0), foreground lattice."""
    lr_s, hr_s = patches.to_stored(lr, 0), patches.to_stored(hr, 0)
    org = patches.lattice(lr_s.shape, (SLAB, *PATCH), (SLAB, 8, 8))
    keep = patches.foreground_fraction(lr_s, org, (SLAB, *PATCH), 0.05) >= 0.3
    org = org[keep][:n]
    return (patches.extract(lr_s, org, (SLAB, *PATCH)),
            patches.extract(hr_s, org * 2, (2 * SLAB, 2 * PATCH[0], 2 * PATCH[1])))


@pytest.fixture(scope="module")
def cohort():
    vols = {k: head(k) for k in (1, 2, 3)}
    deg = DegradationConfig()
    lrs = {k: kspace.degrade(v, deg, np.random.default_rng(k)) for k, v in vols.items()}
    return vols, lrs


@pytest.fixture(scope="module")
def cfg():
    # without the image skip every method starts from its random network, so "learns" means the
    # method's own training moved it (with the skip, the zero-initialised start is already
    # Lanczos interpolation, which 60 steps on a 48-voxel cohort cannot be expected to beat)
    return load("tiny", ["model.features=8", "model.image_skip=false"])


@pytest.fixture
def budget():
    return Budget(60, load("tiny", ["train.batch_size=4", "train.lr=2e-3", "train.lr_min=1e-4", "train.seed=0"]).train)


def held_out_psnr(net, cohort) -> float:
    """PSNR of net(LR) vs HR on subject 3's patches, which no method trains on."""
    vols, lrs = cohort
    x, y = patch_pairs(vols[3], lrs[3], n=16)
    with torch.no_grad():
        return float(psnr(net(torch.as_tensor(x)).clamp(0, 1), torch.as_tensor(y)))


# --------------------------------------------------------------------------- learning
def test_supervised_tsrcan_learns(cohort, cfg, budget):
    vols, lrs = cohort
    x, y = patch_pairs(vols[1], lrs[1])
    torch.manual_seed(0)
    net = SupervisedTSRCAN(cfg.model, SLAB)
    before = held_out_psnr(net, cohort)
    history = net.fit(x, y, budget)
    after = held_out_psnr(net, cohort)
    assert np.mean([h["loss"] for h in history[-10:]]) < np.mean([h["loss"] for h in history[:10]])
    assert after > before + 1.0, (before, after)


@pytest.mark.parametrize("cls", [CycleGANSR, DASR], ids=["cyclegan", "dasr"])
def test_unsupervised_peers_learn_from_unpaired_data(cohort, cfg, budget, cls):
    vols, lrs = cohort
    lr_t, _ = patch_pairs(vols[1], lrs[1])  # target LR of subject 1 ...
    _, hr_s = patch_pairs(vols[2], lrs[2])  # ... source HR of subject 2: unpaired
    torch.manual_seed(0)
    net = cls(cfg.model, SLAB)
    before = held_out_psnr(net, cohort)
    history = net.fit(lr_t, hr_s, budget)
    after = held_out_psnr(net, cohort)
    assert len(history) == 2 * budget.split(2).steps and all(np.isfinite(list(h.values())).all() for h in history)
    # half the budget goes to each stage; the adversarial stage learns slowly
    assert after > before + 1.0, (before, after)


def test_zssr_learns_from_the_test_volume_alone(cohort, cfg, budget):
    vols, lrs = cohort
    lr_s, hr_s = patches.to_stored(lrs[3], 0), patches.to_stored(vols[3], 0)
    z = ZSSR(cfg.model, budget, Inferer.from_config(cfg.infer, cfg.data.patches, "cpu"))
    assert (z.slab, z.patch) == (SLAB, PATCH)
    torch.manual_seed(budget.seed)
    init = SupervisedTSRCAN(cfg.model, SLAB)  # the same seeded initialisation ZSSR starts from
    net = z.fit_volume(lr_s)
    x, y = patch_pairs(vols[3], lrs[3], n=16)
    with torch.no_grad():
        before = float(psnr(init(torch.as_tensor(x)).clamp(0, 1), torch.as_tensor(y)))
        after = float(psnr(net(torch.as_tensor(x)).clamp(0, 1), torch.as_tensor(y)))
    assert after > before + 1.0, (before, after)
    assert hr_s.shape == tuple(2 * n for n in lr_s.shape)


# --------------------------------------------------------------------------- pieces
def test_fit_decays_the_learning_rate_to_lr_min_with_the_train_sections_adam():
    w = torch.nn.Parameter(torch.tensor([3.0]))
    b = Budget(20, load("paper", ["train.lr=0.1", "train.lr_min=1e-3", "train.batch_size=1"]).train)
    opt = adam([w], b.train)
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["eps"] == 1e-8  # paper, II-D
    hist = fit([(opt, lambda s: ((w**2).sum(), {"w": w.item()}))], b)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert abs(hist[-1]["w"]) < abs(hist[0]["w"])
    assert b.split(2).steps == 10 and b.split(2).train is b.train and b.to_dict()["lr"] == 0.1


def test_fit_refuses_a_non_finite_loss():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    b = Budget(3, load("paper").train)
    with pytest.raises(FloatingPointError):
        fit([(adam([w], b.train), lambda s: (w.sum() * float("nan"), {}))], b)


def test_sampler_pairs_stay_paired_and_are_deterministic():
    lr = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) * np.ones((1, 3, 4, 4), np.float32)
    hr = 2 * np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) * np.ones((1, 6, 8, 8), np.float32)
    batch = pairs.sampler(lr, hr, batch_size=5, seed=3, paired=True, augment=True)
    x, y = batch(7)
    assert torch.equal(y[:, 0, 0, 0], 2 * x[:, 0, 0, 0])
    assert all(torch.equal(a, b) for a, b in zip(batch(7), pairs.sampler(lr, hr, batch_size=5, seed=3, paired=True,
                                                                         augment=True)(7)))
    u = pairs.sampler(lr, hr, batch_size=64, seed=3, paired=False)(0)
    assert not torch.equal(u[1][:, 0, 0, 0], 2 * u[0][:, 0, 0, 0])


def test_augmented_pairs_keep_their_interpolation_error():
    """Paired augmentation flips each pool on its own grid: every batch of a real (LR, HR) pair
    set has the same interpolation error as without augmentation (a plain HR flip doubles it)."""
    from udean.models.layers import upsample2

    hr = head(3)[8:32, 8:56, 8:40]
    lr = kspace.kspace_degrade(hr, DegradationConfig(), np.random.default_rng(0))
    x = np.stack([lr[2 * i:2 * i + 3, 4:16, 2:14] for i in range(4)])  # LR (2i, 4, 2) = HR (4i, 8, 4)
    y = np.stack([hr[4 * i:4 * i + 6, 8:32, 4:28] for i in range(4)])

    def error(batch):  # HR 4 .. 2h-6: symmetric about HR h-1, the centre of the flips
        a, b = batch
        return (upsample2(a) - b)[..., 4:-5, 4:-5].abs().mean(dim=(1, 2, 3))

    plain = pairs.sampler(x, y, batch_size=4, seed=0, paired=True)
    aug = pairs.sampler(x, y, batch_size=4, seed=0, paired=True, augment=True)
    for step in range(6):  # same indices for both; aug also transforms
        torch.testing.assert_close(error(aug(step)), error(plain(step)), rtol=1e-4, atol=1e-6)


def test_nearest_pairs_take_every_second_voxel():
    hr = np.random.default_rng(0).random((2, 6, 8, 8)).astype(np.float32)
    lr, hr2 = pairs.nearest_pairs(hr)
    assert lr.shape == (2, 3, 4, 4) and np.array_equal(lr, hr[:, ::2, ::2, ::2]) and hr2 is hr


def test_rigid_registration_undoes_rotation_and_translation(cohort):
    vols, lrs = cohort
    hr, lr = vols[1], lrs[1]
    params = {"rot_z_deg": 1.8, "rot_x_deg": -1.5, "trans_rl_vox": 1.7, "trans_hf_vox": -1.4,
              "shrink_ap_vox": 0.0, "shrink_rl_vox": 0.0}
    moved = motion.apply(hr, params)
    registered, report = register_rigid(lr, moved, iterations=100)
    before, after = np.abs(moved - hr).mean(), np.abs(registered - hr).mean()
    assert after < 0.6 * before, (before, after, report)
    # the translation found is the motion's, in HR voxels (axis 0 RL, axis 2 HF), up to the
    # sub-voxel error of a k-space-truncated fixed image
    assert abs(abs(report["translation_vox"][0]) - 1.7) < 0.6 and abs(abs(report["translation_vox"][2]) - 1.4) < 0.6


def test_registration_checks_the_grids():
    with pytest.raises(ValueError, match="registration"):
        register_rigid(np.zeros((8, 8, 8), np.float32), np.zeros((16, 16, 14), np.float32))


def test_zssr_internal_pairs_follow_the_suite_geometry():
    lr = np.random.default_rng(0).random((12, 40, 40)).astype(np.float32)
    llr = downscale(lr)
    assert llr.shape == (6, 20, 20)
    x, y = internal_pairs(lr, SLAB, PATCH)
    assert x.shape[1:] == (3, 16, 16) and y.shape[1:] == (6, 32, 32) and len(x) == len(y) > 1
    assert np.array_equal(y[0], lr[:6, :32, :32])  # crop 0 sits at LLR origin 0 -> LR origin 0


def test_dasr_distance_weights_and_frequency_split():
    score = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]])  # clipped to [0, 1]
    w = distance_weights(score, torch.Size((1, 6, 8, 8)))
    assert w.shape == (1, 1, 8, 8) and w.mean().item() == pytest.approx(1.0) and (w > 0).all()
    flat = torch.full((2, 3, 9, 9), 0.4)
    assert torch.allclose(lowpass(flat), flat)


def test_weighted_sr_loss_equals_unweighted_for_unit_weights():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 6, 16, 16, generator=g), torch.rand(2, 6, 16, 16, generator=g)
    plain, _ = sr_loss(a, b)
    weighted, _ = sr_loss(a, b, weight=torch.ones(2, 1, 16, 16))
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-5)


def test_the_rician_denoiser_removes_noise_and_its_bias():
    """DIPY's Rician NLM (udean.baselines.denoise) on a piecewise-constant volume with Rician
    noise: closer to the truth than the noisy input, and the background's Rician floor
    (sigma sqrt(pi / 2) for a zero signal) mostly removed, where a Gaussian-model NLM keeps it."""
    from dipy.denoise.nlmeans import nlmeans

    from udean.baselines.denoise import dipy_sigma, nlm

    rng = np.random.default_rng(0)
    truth = np.zeros((32, 32, 32), np.float32)
    truth[8:24, 6:26, 10:22] = 0.6
    truth[12:20, 10:22, 13:19] = 0.9
    sigma = 0.03
    noisy = np.abs(truth + sigma * (rng.standard_normal(truth.shape) + 1j * rng.standard_normal(truth.shape)))
    noisy = noisy.astype(np.float32)
    np.testing.assert_array_equal(nlm(noisy, 0.0), noisy)  # k = 0: the input
    assert sigma / 2 < dipy_sigma(noisy) < 3 * sigma
    out = nlm(noisy, 1.0)
    assert out.dtype == np.float32 and out.shape == noisy.shape
    assert np.abs(out - truth).mean() < 0.5 * np.abs(noisy - truth).mean()
    back = truth == 0
    gauss = nlmeans(noisy, dipy_sigma(noisy), rician=False, method="classic", num_threads=1)
    assert noisy[back].mean() > 0.03 and out[back].mean() < 0.5 * gauss[back].mean()


def test_without_a_paired_val_volume_the_denoiser_keeps_dipys_estimate():
    from preprocessing.shards import VolumePair
    from udean.baselines.denoise import DEFAULT_STRENGTH, choose_strength

    lr_only = VolumePair(hr=None, lr=np.zeros((8, 8, 8), np.float32), mask=None, hr_affine=np.eye(4),
                         lr_affine=np.diag([2.0, 2.0, 2.0, 1.0]), subject="a", group="val", lr_source="acquired")
    assert choose_strength([lr_only]) == (DEFAULT_STRENGTH, {}) and DEFAULT_STRENGTH == 1.0
