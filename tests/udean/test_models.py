"""Shapes of every UDEAN module for both variants and odd sizes; the SR path; inference weights;
a tiny model that overfits one pair; the model-info CLI."""
import json
import subprocess
import sys

import pytest
import torch

from udean.config import ModelConfig
from udean.losses import l1, ssim_loss
from udean.models.layers import GlobalAvgPool, PixelShuffle3d
from udean.models.udean import SRNet, build, inference_state_dict, load_inference

TINY = dict(features=8, n_groups=2, n_rcab=1, reduction=2, encoder_layers=3, disc_features=4, disc_blocks=2)
VARIANTS = ["thin_slab", "3d"]
# (S, H, W) of the LR patch: paper 3x64x64, odd in-plane sizes, and an odd slab for 3d
SIZES = [(3, 64, 64), (3, 17, 23), (5, 9, 11)]


def _build(variant, slab=3, **kw):
    torch.manual_seed(0)
    return build(ModelConfig(**(TINY | kw), variant=variant), slab=slab)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_generator_shapes(variant, size):
    s, h, w = size
    gen, discs = _build(variant, slab=s)
    y_s, x_t = torch.rand(2, 2 * s, 2 * h, 2 * w), torch.rand(2, s, h, w)
    with torch.no_grad():
        out = gen(y_s, x_t)
        f = (2, 8, h, w) if variant == "thin_slab" else (2, 8, s, h, w)
        assert {k: tuple(v.shape) for k, v in out.items()} == {
            "f_s": f, "f_sts": f, "f_t": f,
            "x_st": (2, s, h, w), "x_hat_t": (2, s, h, w),
            "y_sts": (2, 2 * s, 2 * h, 2 * w), "y_hat_s": (2, 2 * s, 2 * h, 2 * w),
        }
        # the SR path doubles every axis exactly
        assert gen.sr(x_t).shape == (2, 2 * s, 2 * h, 2 * w)
        # discriminators: unbounded patch scores, stride-2 stages in-plane
        k = 2 ** TINY["disc_blocks"]
        hd, wd = -(-h // k), -(-w // k)
        lr_map = (2, 1, hd, wd) if variant == "thin_slab" else (2, 1, s, hd, wd)
        hr_map = (2, 1, -(-2 * h // k), -(-2 * w // k)) if variant == "thin_slab" else (2, 1, 2 * s, -(-2 * h // k), -(-2 * w // k))
        assert discs.d_lr(x_t).shape == lr_map
        assert discs.d_feat(out["f_t"]).shape == lr_map
        assert discs.d_hr(y_s).shape == hr_map


@pytest.mark.parametrize("dims,shape", [(2, (2, 8, 13, 17)), (3, (2, 8, 5, 13, 7))])
def test_channel_attention_pool_is_adaptive_pooling_without_it(dims, shape):
    # AdaptiveAvgPool has no deterministic CUDA backward (train.deterministic raised there)
    adaptive = {2: torch.nn.AdaptiveAvgPool2d, 3: torch.nn.AdaptiveAvgPool3d}[dims](1)
    x = torch.randn(shape, requires_grad=True, generator=torch.Generator().manual_seed(0))
    grad_out = torch.randn(*shape[:2], *(1,) * dims)
    ours, old = GlobalAvgPool(dims)(x), adaptive(x)
    torch.testing.assert_close(ours, old)
    torch.testing.assert_close(*(torch.autograd.grad(y, x, grad_out)[0] for y in (ours, old)))
    for variant in VARIANTS:
        gen, discs = _build(variant)
        pools = [m for net in (gen, discs) for m in net.modules() if "Adaptive" in type(m).__name__]
        assert not pools, f"{variant}: adaptive pooling left in {sorted({type(m).__name__ for m in pools})}"


def test_unpaired_batches_may_differ():
    gen, _ = _build("thin_slab")
    with torch.no_grad():
        out = gen(torch.rand(1, 6, 32, 32), torch.rand(3, 3, 20, 24))
    assert out["y_sts"].shape == (1, 6, 32, 32) and out["x_hat_t"].shape == (3, 3, 20, 24)


def test_pixel_shuffle_3d_places_subpixels():
    """Channel (c, i, j, k) of the input lands at voxel (2d+i, 2h+j, 2w+k): known answer."""
    x = torch.arange(8.0).view(1, 8, 1, 1, 1).repeat(1, 1, 2, 3, 2)
    y = PixelShuffle3d(2)(x)
    assert y.shape == (1, 1, 4, 6, 4)
    for i in range(2):
        for j in range(2):
            for k in range(2):
                assert torch.all(y[0, 0, i::2, j::2, k::2] == 4 * i + 2 * j + k)


def test_thin_slab_sr_emits_2s_slices_from_s_channels():
    gen, _ = _build("thin_slab")
    assert gen.lr_encoder.layers[0].in_channels == 3
    assert gen.down_extractor.layers[0].in_channels == 6 and gen.down_extractor.layers[0].stride == (2, 2)
    assert gen.sr_decoder.tail.out_channels == 6 and gen.lr_decoder.tail.out_channels == 3
    gen3, _ = _build("3d")
    assert gen3.down_extractor.layers[0].stride == (2, 2, 2)


def test_build_follows_config():
    gen, discs = build(ModelConfig(**TINY))
    rgs = gen.sr_decoder.backbone.body
    assert sum(type(m).__name__ == "ResidualGroup" for m in rgs) == TINY["n_groups"]
    convs = [m for m in gen.lr_encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == TINY["encoder_layers"]
    _, no_hr = build(ModelConfig(**TINY, hr_discriminator=False))
    assert no_hr.d_hr is None and discs.d_hr is not None


@pytest.mark.parametrize("variant", VARIANTS)
def test_spectral_norm_bounds_every_discriminator_conv(variant):
    """model.spectral_norm: every discriminator conv's weight, as used in the forward pass, has
    largest singular value 1 (power iteration runs on each training-mode forward)."""
    torch.manual_seed(0)
    _, plain = build(ModelConfig(**TINY, variant=variant))
    _, discs = build(ModelConfig(**TINY, variant=variant, spectral_norm=True))
    f = TINY["features"]
    x, feat = torch.rand(2, 3, 16, 16), torch.rand(2, f, 16, 16) if variant == "thin_slab" else torch.rand(2, f, 3, 16, 16)
    for _ in range(30):
        discs(x, feat, torch.rand(2, 6, 32, 32))

    def sigmas(d):
        convs = [m for m in d.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
        return [torch.linalg.matrix_norm(c.weight.detach().flatten(1), 2).item() for c in convs]

    got = sigmas(discs)
    assert len(got) == len(sigmas(plain)) > 3
    assert got == pytest.approx([1.0] * len(got), rel=0.05)
    assert max(abs(s - 1.0) for s in sigmas(plain)) > 0.1  # plain convs are not normalised


@pytest.mark.parametrize("variant", VARIANTS)
def test_inference_state_dict_and_load(variant):
    gen, _ = _build(variant)
    state = inference_state_dict(gen)
    assert state and all(k.startswith(("lr_encoder.", "sr_decoder.")) for k in state)
    assert any(k.startswith("lr_encoder.") for k in state) and any(k.startswith("sr_decoder.") for k in state)
    net = load_inference(state, ModelConfig(**TINY, variant=variant))
    assert isinstance(net, SRNet)
    x = torch.rand(1, 3, 12, 14)
    with torch.no_grad():
        assert torch.equal(net(x), gen.sr(x))
    with pytest.raises(ValueError):
        load_inference(state, ModelConfig(**TINY, variant=VARIANTS[1 - VARIANTS.index(variant)]))


def test_tiny_model_overfits_one_pair():
    """SR path alone (lr_encoder + sr_decoder) with L1 + 0.5 SSIM on one LR/HR pair."""
    torch.manual_seed(0)
    gen, _ = build(ModelConfig(features=16, n_groups=1, n_rcab=1, reduction=4, encoder_layers=3))
    zz, yy, xx = torch.meshgrid(torch.linspace(0, 1, 6), torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    hr = (0.5 + 0.4 * torch.sin(6 * xx + 3 * zz) * torch.cos(5 * yy))[None]  # (1, 6, 32, 32) smooth
    lr = torch.nn.functional.avg_pool3d(hr[None], 2)[0]  # (1, 3, 16, 16)
    params = list(gen.lr_encoder.parameters()) + list(gen.sr_decoder.parameters())
    opt = torch.optim.Adam(params, lr=2e-3)

    def loss():
        sr = gen.sr(lr)
        return l1(sr, hr) + 0.5 * ssim_loss(sr, hr, 7)

    first = loss().item()
    for _ in range(300):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
        if value.item() < first / 20:
            break
    assert loss().item() < first / 10


def test_model_info_cli(tmp_path, repo):
    out = tmp_path / "info.json"
    proc = subprocess.run([sys.executable, "-m", "udean", "model-info", "--config", "configs/tiny.yaml", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert "thin_slab" in proc.stdout and "3d" in proc.stdout and "FLOP" in proc.stdout
    doc = json.loads(out.read_text())
    for v in VARIANTS:
        rows = doc["variants"][v]
        assert set(rows) == {"down_extractor", "lr_decoder", "lr_encoder", "sr_decoder", "d_lr", "d_feat", "d_hr"}
        assert all(r["flops"] > 0 and r["params"] > 0 for r in rows.values())
    # same widths, a 3x3x3 kernel over S slices: the 3d decoder costs more
    assert doc["variants"]["3d"]["sr_decoder"]["flops"] > doc["variants"]["thin_slab"]["sr_decoder"]["flops"]


def test_fixed_x2_resampling_matches_the_data_geometry():
    """LR voxel j = HR voxel 2j: upsampling keeps LR samples on even HR voxels and reproduces a
    linear ramp away from the edges; downsampling keeps constants, samples the even voxels of a
    ramp and has the right grid; a band-limited cosine survives down then up almost exactly."""
    from udean.models.layers import LANCZOS_A, downsample2, upsample2

    x = torch.rand(2, 3, 5, 7)
    y = upsample2(x)
    assert y.shape == (2, 6, 10, 14) and torch.equal(y[:, ::2, ::2, ::2], x)
    a = LANCZOS_A
    j = torch.arange(16.0, dtype=torch.float64)
    i = torch.arange(32.0, dtype=torch.float64) / 2
    ramp = upsample2((2 * j - 3).expand(1, 4, 5, 16))
    assert torch.allclose(ramp[..., 2 * a:-2 * a], (2 * i - 3)[2 * a:-2 * a].expand(1, 8, 10, -1))
    r = 2 * a
    hr_ramp = downsample2((2 * i - 3).expand(1, 6, 8, 32))
    assert torch.allclose(hr_ramp[..., r:-r], (2 * j - 3)[r:-r].expand(1, 3, 4, -1))
    assert torch.allclose(downsample2(torch.full((1, 6, 9, 14), 0.3)), torch.full((1, 3, 5, 7), 0.3))
    assert downsample2(torch.rand(1, 7, 9, 11)).shape == (1, 4, 5, 6)
    n = torch.arange(64.0, dtype=torch.float64)
    wave = torch.cos(2 * torch.pi * n / 16).expand(1, 4, 4, 64)  # well inside the LR band
    back = upsample2(downsample2(wave))[..., 16:-16]
    assert (back - wave[..., 16:-16]).abs().max() < 0.02


@pytest.mark.parametrize("variant", ["thin_slab", "3d"])
def test_image_skip_starts_every_path_at_its_fixed_resampling(variant):
    from udean.models.layers import downsample2, upsample2
    from udean.models.udean import build_sr

    cfg = ModelConfig(**TINY, variant=variant, image_skip=True)
    gen, _ = build(cfg)  # fresh: the decoders' output convs are zero, every path is its resampling
    x, y = torch.rand(1, 3, 8, 8), torch.rand(1, 6, 16, 16)
    assert torch.equal(gen.sr(x), upsample2(x))
    assert torch.equal(build_sr(cfg)(x), upsample2(x))
    out = gen(y, x)
    assert torch.equal(out["x_st"], downsample2(y)) and torch.equal(out["x_hat_t"], x)
    assert torch.equal(out["y_sts"], upsample2(out["x_st"]))
    assert torch.equal(out["y_hat_s"], upsample2(downsample2(y)))
    torch.nn.init.normal_(gen.sr_decoder.tail.weight)  # a trained decoder: inference must carry it
    assert not torch.equal(gen.sr(x), upsample2(x))
    net = load_inference(inference_state_dict(gen), cfg)
    assert torch.equal(net(x), gen.sr(x))


# --------------------------------------------------------------------------- degradation (ours)
def test_physics_degradation_starts_at_the_lanczos_decimation_and_keeps_dc():
    from udean.models.degradation import LearnedBlur
    from udean.models.layers import downsample2

    gen, _ = build(ModelConfig(**TINY, degradation="physics"))
    y, x = torch.rand(2, 6, 16, 16), torch.rand(2, 3, 8, 8)
    assert torch.equal(gen(y, x)["x_st"], downsample2(y))  # identity kernels: a fresh model is the skip
    blur = LearnedBlur(5, 3, odd=True)
    torch.manual_seed(1)
    for p in blur.parameters():
        torch.nn.init.normal_(p, std=0.05)
    even, slab, odd = blur.kernels()
    even, slab, odd = (k.detach() for k in (even, slab, odd))
    assert float(even.sum()) == pytest.approx(1.0, abs=1e-5) and float(slab.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(even, even.flip(0)) and torch.equal(even, even.flip(1)) and torch.equal(slab, slab.flip(0))
    assert torch.allclose(odd, -odd.flip(0).flip(1)) and float(odd.abs().sum()) > 0
    re, im = blur(torch.full((1, 3, 9, 9), 0.4))  # DC kept; an odd kernel has no DC
    assert torch.allclose(re, torch.full_like(re, 0.4), atol=1e-5) and im.abs().max() < 1e-5
    z = torch.rand(2, 3, 12, 12)
    re_f, im_f = blur(z.flip(-1).flip(-2))  # Hermitian PSF: the real part commutes with flips,
    assert torch.allclose(re_f, blur(z)[0].flip(-1).flip(-2), atol=1e-6)  # the imaginary part flips sign
    assert torch.allclose(im_f, -blur(z)[1].flip(-1).flip(-2), atol=1e-6)


def test_learned_blur_is_the_convolution_it_reports():
    import torch.nn.functional as F

    from udean.models.degradation import LearnedBlur

    blur = LearnedBlur(3, 3)
    with torch.no_grad():
        blur.plane[0, 1] = blur.plane[2, 1] = 0.01  # plane kernel rows 0/2: +0.1 - mean
        blur.slab[0] = blur.slab[2] = 0.02
    plane, slab, _ = blur.kernels()
    x = torch.rand(1, 5, 8, 8)
    ref = F.conv1d(F.pad(x.permute(0, 2, 3, 1).reshape(-1, 1, 5), (1, 1), mode="replicate"), slab[None, None])
    ref = ref.reshape(1, 8, 8, 5).permute(0, 3, 1, 2)
    ref = F.conv2d(F.pad(ref.reshape(5, 1, 8, 8), (1, 1, 1, 1), mode="replicate"), plane[None, None]).reshape(1, 5, 8, 8)
    assert torch.allclose(blur(x)[0], ref, atol=1e-6)


def test_blur_excess_is_zero_for_physical_blurs_and_its_gradient_removes_amplification():
    import numpy as np

    from udean.models.degradation import GAIN, LearnedBlur

    blur = LearnedBlur(5, 3)
    assert blur.excess().item() == 0.0 and blur.deficit().item() < 1e-12  # the identity
    with torch.no_grad():  # a box blur: every tap >= 0, so |H| <= H(0) = 1 everywhere
        blur.plane.fill_(0.0)
        blur.plane[1:4, 1:4] = 1.0 / 9 / GAIN
        blur.plane[2, 2] -= 1.0 / GAIN
    plane, _, _ = blur.kernels()
    assert plane.min() >= -1e-7 and blur.excess().item() == 0.0
    h = np.abs(np.fft.fft2(plane.detach().numpy(), s=(32, 32)))  # ... and attenuates: the prior's deficit
    assert blur.deficit().item() == pytest.approx((np.maximum(1 - h, 0) ** 2).mean(), rel=1e-5)
    assert blur.deficit().item() > 0.05
    with torch.no_grad():  # an unsharp mask: centre 1.8, four neighbours -0.2: amplifies up to 2.6x
        blur.plane.fill_(0.0)
        blur.plane[2, 2] = 0.8 / GAIN
        blur.plane[1, 2] = blur.plane[3, 2] = blur.plane[2, 1] = blur.plane[2, 3] = -0.2 / GAIN
    plane, _, _ = blur.kernels()
    h = np.abs(np.fft.fft2(plane.detach().numpy(), s=(32, 32)))
    assert h.max() > 2.0
    want = ((np.maximum(h - 1, 0) ** 2).mean())
    assert blur.excess().item() == pytest.approx(want, rel=1e-5)
    blur.excess().backward()
    with torch.no_grad():
        blur.plane -= 1e-3 * blur.plane.grad  # gradient descent on the penalty: less sharpening
    assert blur.excess().item() < want


def test_rician_noise_has_the_learned_sigma():
    """|c + sigma n| has std sigma on a bright constant and the Rayleigh mean sigma sqrt(pi/2) on
    zero; sigma is a parameter the loss can move; noise=False is the clean magnitude."""
    import math

    from udean.models.degradation import RicianNoise

    torch.manual_seed(0)
    noise = RicianNoise(sigma_init=0.02)
    bright, dark = noise(torch.full((4, 3, 64, 64), 0.8)), noise(torch.zeros(4, 3, 64, 64))
    assert float(bright.std().detach()) == pytest.approx(0.02, rel=0.03)
    assert float(dark.mean().detach()) == pytest.approx(0.02 * math.sqrt(math.pi / 2), rel=0.03)
    assert torch.equal(noise(torch.full((1, 3, 4, 4), 0.5), noise=False), torch.full((1, 3, 4, 4), 0.5))
    dark.mean().backward()
    assert noise.log_sigma.grad > 0
    spread = RicianNoise(sigma_init=0.02, sigma_spread=True)
    spread(torch.full((8, 1, 16, 16), 0.8)).std(dim=(1, 2, 3)).log().std().backward()
    assert float(spread.spread.grad.abs()) > 0  # at |spread| = 0 it has no gradient and never moves
    with torch.no_grad():
        spread.spread.fill_(0.05)  # log sigma spread 0.5 across samples
    per_sample = spread(torch.full((256, 1, 16, 16), 0.8)).std(dim=(1, 2, 3)).log().std()
    assert float(per_sample.detach()) == pytest.approx(0.5, rel=0.15)


def test_cycle_detach_keeps_the_sr_path_gradient_out_of_the_degradation():
    """model.cycle_detach: Y_{s~t~s} (Eq. 4) trains the SR path on X_{s~t} but sends no gradient
    into the degradation network; without it, it does."""
    for mode in ("decoder", "physics"):
        for detach in (False, True):
            gen, _ = build(ModelConfig(**TINY, degradation=mode, degradation_noise=True, cycle_detach=detach))
            torch.nn.init.normal_(gen.sr_decoder.tail.weight, std=0.1)
            torch.nn.init.normal_(gen.lr_decoder.tail.weight, std=0.1)
            out = gen(torch.rand(2, 6, 16, 16), torch.rand(2, 3, 8, 8))
            out["y_sts"].square().mean().backward()
            deg = gen.blur if mode == "physics" else gen.lr_decoder
            reached = any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in deg.parameters())
            assert reached is (not detach), (mode, detach)
            sigma_grad = gen.noise.log_sigma.grad
            assert (sigma_grad is not None and bool(sigma_grad != 0)) is (not detach)
            assert gen.lr_encoder.layers[0].weight.grad.abs().sum() > 0


def test_degradation_switches_are_validated():
    from preprocessing.config import ConfigError
    from udean.config import from_dict

    with pytest.raises(ConfigError, match="blur_size"):
        from_dict({"model": {"blur_size": 6}})
    with pytest.raises(ConfigError, match="noise_spread"):
        from_dict({"model": {"noise_spread": True}})
    with pytest.raises(ConfigError, match="source_margin"):
        from_dict({"model": {"source_margin": [1, 2]}})
    assert from_dict({}).model.degradation == "decoder"  # the paper's wiring by default


def test_source_margin_degrades_with_context_and_crops_both_sides():
    """model.source_margin: X_{s~t} of the patch centre is computed with real context (closer to
    the k-space truncation of the volume than the same patch decimated alone), and Y_s, the HR
    every loss compares with, is the same centre."""
    import numpy as np
    from scipy import ndimage

    from preprocessing.config import DegradationConfig
    from preprocessing.kspace import kspace_degrade
    from udean.losses import discriminator_loss, generator_loss
    from udean.config import LossConfig
    from udean.models.layers import downsample2

    rng = np.random.default_rng(0)
    hr = ndimage.gaussian_filter(rng.random((32, 48, 48)), 1.2).astype(np.float32)
    hr = (hr - hr.min()) / (hr.max() - hr.min())
    lr = torch.from_numpy(kspace_degrade(hr, DegradationConfig(), rng))
    m0, m1 = 2, 4
    big = torch.from_numpy(hr[8 - 2 * m0:14 + 2 * m0, 8 - 2 * m1:24 + 2 * m1, 8 - 2 * m1:24 + 2 * m1].copy())[None]
    truth = lr[None, 4:7, 4:12, 4:12]  # LR voxel j = HR voxel 2j
    gen, discs = build(ModelConfig(**TINY, degradation="physics", source_margin=(m0, m1)))
    out = gen(big, truth)
    assert out["x_st"].shape == (1, 3, 8, 8) and out["y_sts"].shape == (1, 6, 16, 16)
    assert torch.equal(out["y_s"], big[:, 2 * m0:-2 * m0, 2 * m1:-2 * m1, 2 * m1:-2 * m1])
    with_context = (out["x_st"] - truth).abs().mean()
    alone = (downsample2(out["y_s"]) - truth).abs().mean()
    assert with_context < 0.75 * alone  # measured: 0.0078 vs 0.0122
    total, _ = generator_loss(out, big, truth, discs, LossConfig())  # the caller's Y_s is the whole patch
    d_total, _ = discriminator_loss(out, big, truth, discs)
    assert torch.isfinite(total) and torch.isfinite(d_total)


def test_kspace_decimation_is_the_data_degradation_of_the_mirrored_patch():
    """layers.kspace_downsample2 = preprocessing's k-space truncation of the patch's mirror
    extension (LR voxel j = HR voxel 2j), and on a real volume's patch with context it is closer
    to the volume's truncation than the Lanczos decimation."""
    import numpy as np
    from scipy import ndimage

    from preprocessing.config import DegradationConfig
    from preprocessing.kspace import kspace_degrade
    from udean.models.layers import downsample2, kspace_downsample2

    rng = np.random.default_rng(0)
    p = rng.random((6, 12, 16)).astype(np.float32)
    v = np.concatenate([p, p[::-1]], 0)
    v = np.concatenate([v, v[:, ::-1]], 1)
    v = np.concatenate([v, v[:, :, ::-1]], 2)
    want = kspace_degrade(v, DegradationConfig(), rng)[:3, :6, :8]
    got = kspace_downsample2(torch.from_numpy(p)[None])[0].numpy()
    np.testing.assert_allclose(got, np.clip(want, 0, 1), atol=1e-5)

    hr = ndimage.gaussian_filter(rng.random((32, 48, 48)), 0.8).astype(np.float32)
    hr = (hr - hr.min()) / (hr.max() - hr.min())
    lr = torch.from_numpy(kspace_degrade(hr, DegradationConfig(), rng))[None, 4:7, 4:12, 4:12]
    big = torch.from_numpy(hr[4:18, 0:32, 0:32].copy())[None]  # 2 / 4 LR voxels of context
    errs = [(dec(big)[:, 2:-2, 4:-4, 4:-4] - lr).abs().mean() for dec in (kspace_downsample2, downsample2)]
    assert errs[0] < 0.8 * errs[1], errs
