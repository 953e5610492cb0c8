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
