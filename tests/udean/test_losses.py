"""Eq. 1-10 against direct formulas on random tensors; D-step / G-step properties."""
import pytest
import torch

from udean import fidelity, losses
from udean.config import LossConfig, ModelConfig
from udean.metrics import ssim
from udean.models.udean import build

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY = dict(features=8, n_groups=1, n_rcab=1, reduction=2, encoder_layers=2, disc_features=8, disc_blocks=1)


def test_l1_is_mean_abs():
    x, y = torch.randn(2, 3, 8, 9), torch.randn(2, 3, 8, 9)
    assert losses.l1(x, y).item() == pytest.approx(torch.mean(torch.abs(x - y)).item(), rel=1e-6)


def test_ssim_loss_is_mean_squared_per_slice_dissimilarity():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 12, 12)
    noise = torch.tensor([0.02, 0.2, 0.6]).view(1, 3, 1, 1)  # slices of very different quality
    y = (x + noise * torch.randn_like(x)).clamp(0, 1)
    per_slice = ssim(x, y, window=7, reduction="none")
    assert per_slice.shape == (2, 3)
    expected = ((1 - per_slice) ** 2).mean()
    assert losses.ssim_loss(x, y, 7).item() == pytest.approx(expected.item(), rel=1e-6)
    # per-slice mean of squares, not the square of the mean SSIM
    assert losses.ssim_loss(x, y, 7).item() != pytest.approx(((1 - per_slice.mean()) ** 2).item(), rel=1e-2)
    assert losses.ssim_loss(x, x, 7).item() == pytest.approx(0.0, abs=1e-10)


def test_adversarial_abs_and_lsq():
    d = torch.randn(4, 1, 5, 5) * 2
    assert losses.adversarial(d, "abs").item() == pytest.approx((d - 1).abs().mean().item(), rel=1e-6)
    assert losses.adversarial(d, "lsq").item() == pytest.approx(((d - 1) ** 2).mean().item(), rel=1e-6)
    assert losses.adversarial(d, "abs").item() != pytest.approx(losses.adversarial(d, "lsq").item())
    with pytest.raises(ValueError):
        losses.adversarial(d, "bce")


def test_adaptation_eq8():
    a, b = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 2, 2)
    expected = torch.mean(torch.abs(a - 0.5)) + torch.mean(torch.abs(b - 0.5))
    assert losses.adaptation(a, b).item() == pytest.approx(expected.item(), rel=1e-6)
    squares = torch.mean((a - 0.5) ** 2) + torch.mean((b - 0.5) ** 2)
    assert losses.adaptation(a, b, "lsq").item() == pytest.approx(squares.item(), rel=1e-6)
    assert losses.adaptation(torch.full((2,), 0.5), torch.full((2,), 0.5)).item() == 0.0


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    gen, discs = build(ModelConfig(**TINY))
    y_s, x_t = torch.rand(2, 6, 32, 32), torch.rand(2, 3, 16, 16)
    return gen, discs, y_s, x_t


@pytest.mark.parametrize("mode", ["abs", "lsq"])
def test_generator_loss_is_eq10(setup, mode):
    gen, discs, y_s, x_t = setup
    cfg = LossConfig(adversarial=mode, lambdas=(1.0, 0.2, 0.7, 0.9, 0.3, 0.4), alpha=0.6, beta=0.05)
    with torch.no_grad():
        out = gen(y_s, x_t)
        total, t = losses.generator_loss(out, y_s, x_t, discs, cfg)
        adv = lambda s: ((s - 1).abs() if mode == "abs" else (s - 1) ** 2).mean()  # noqa: E731

        def img(p, r, d):
            return (p - r).abs().mean() + 0.6 * ((1 - ssim(p, r, reduction="none")) ** 2).mean() + 0.05 * adv(d(p))

        half = lambda s: ((s - 0.5).abs() if mode == "abs" else (s - 0.5) ** 2).mean()  # noqa: E731
        ref = {
            "i_cyc": img(out["y_sts"], y_s, discs.d_hr),
            "f_cyc": (out["f_sts"] - out["f_s"]).abs().mean(),
            "hr_con": img(out["y_hat_s"], y_s, discs.d_hr),
            "lr_con": img(out["x_hat_t"], x_t, discs.d_lr),
            "da": half(discs.d_lr(out["x_st"])) + half(discs.d_lr(x_t)),
            "fa": half(discs.d_feat(out["f_t"])) + half(discs.d_feat(out["f_s"])),
        }
    for k, v in ref.items():
        assert t[k].item() == pytest.approx(v.item(), rel=1e-5), k
    expected = sum(w * ref[k] for w, k in zip(cfg.lambdas, losses.TERMS))
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert {"i_cyc.l1", "i_cyc.ssim", "i_cyc.adv", "lr_con.adv", "total"} <= set(t)
    # the warm-up factor scales lambda_da and lambda_fa only; the terms are reported unscaled
    with torch.no_grad():
        part, t2 = losses.generator_loss(out, y_s, x_t, discs, cfg, adapt=0.25)
    assert t2["da"].item() == pytest.approx(t["da"].item(), rel=1e-6)
    assert part.item() == pytest.approx((expected - 0.75 * (0.3 * ref["da"] + 0.4 * ref["fa"])).item(), rel=1e-5)


def test_f_cyc_stop_gradient_moves_only_f_sts(setup):
    """loss.f_cyc_stop_gradient: Eq. 5 has the same value, but no gradient reaches its target f_s."""
    gen, discs, y_s, x_t = setup
    with torch.no_grad():
        out = gen(y_s, x_t)
    values = []
    for stop in (False, True):
        f_s, f_sts = out["f_s"].clone().requires_grad_(), out["f_sts"].clone().requires_grad_()
        _, t = losses.generator_loss({**out, "f_s": f_s, "f_sts": f_sts}, y_s, x_t, discs,
                                     LossConfig(f_cyc_stop_gradient=stop))
        t["f_cyc"].backward()
        values.append(t["f_cyc"].item())
        assert f_sts.grad.abs().sum() > 0
        assert (f_s.grad is not None and bool(f_s.grad.abs().sum() > 0)) is (not stop)
    assert values[0] == values[1] > 0


def test_adapt_scale_warm_up():
    assert [losses.adapt_scale(LossConfig(), p) for p in (0.0, 0.5, 1.0)] == [1.0, 1.0, 1.0]  # paper: always on
    cfg = LossConfig(adapt_start=0.4, adapt_ramp=0.2)
    assert [losses.adapt_scale(cfg, p) for p in (0.0, 0.39, 0.4, 0.45, 0.5, 0.6, 0.9)] == \
        pytest.approx([0.0, 0.0, 0.0, 0.25, 0.5, 1.0, 1.0])
    assert losses.adapt_scale(LossConfig(adapt_start=0.5), 0.49) == 0.0
    assert losses.adapt_scale(LossConfig(adapt_start=0.5), 0.5) == 1.0


def test_generator_loss_without_hr_discriminator():
    torch.manual_seed(0)
    gen, discs = build(ModelConfig(**TINY, hr_discriminator=False))
    assert discs.d_hr is None
    y_s, x_t = torch.rand(1, 6, 32, 32), torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        _, t = losses.generator_loss(gen(y_s, x_t), y_s, x_t, discs, LossConfig())
        _, td = losses.discriminator_loss(gen(y_s, x_t), y_s, x_t, discs)
    assert "i_cyc.adv" not in t and "hr_con.adv" not in t and "lr_con.adv" in t
    assert t["i_cyc"].item() == pytest.approx((t["i_cyc.l1"] + 0.5 * t["i_cyc.ssim"]).item(), rel=1e-6)
    assert "d_hr" not in td


def test_discriminator_loss_least_squares(setup):
    gen, discs, y_s, x_t = setup
    out = gen(y_s, x_t)
    total, t = losses.discriminator_loss(out, y_s, x_t, discs, LossConfig())
    with torch.no_grad():
        d_lr = 0.5 * (((discs.d_lr(x_t) - 1) ** 2).mean() + (discs.d_lr(out["x_st"]) ** 2).mean())
        d_feat = 0.5 * (((discs.d_feat(out["f_t"]) - 1) ** 2).mean() + (discs.d_feat(out["f_s"]) ** 2).mean())
        fake_hr = 0.5 * ((discs.d_hr(out["y_sts"]) ** 2).mean() + (discs.d_hr(out["y_hat_s"]) ** 2).mean())
        d_hr = 0.5 * (((discs.d_hr(y_s) - 1) ** 2).mean() + fake_hr)
    assert t["d_lr"].item() == pytest.approx(d_lr.item(), rel=1e-5)
    assert t["d_feat"].item() == pytest.approx(d_feat.item(), rel=1e-5)
    assert t["d_hr"].item() == pytest.approx(d_hr.item(), rel=1e-5)
    assert total.item() == pytest.approx((d_lr + d_feat + d_hr).item(), rel=1e-5)
    # fakes are detached: D's loss sends no gradient into the generator
    gen.zero_grad(set_to_none=True)
    total.backward()
    assert all(p.grad is None for p in gen.parameters())
    assert all(p.grad is not None for p in discs.parameters())


@pytest.mark.parametrize("variant", ["thin_slab", "3d"])
def test_g_step_reaches_every_generator_parameter_and_leaves_d_alone(variant):
    torch.manual_seed(0)
    # reduction 1 and batch 4: with 4 squeezed channel-attention units and 2 samples, all of a
    # CA's ReLUs can be dead at init, a true zero gradient that says nothing about the wiring
    gen, discs = build(ModelConfig(**(TINY | {"reduction": 1}), variant=variant))
    # the image skip starts the decoders' output convs at zero, which passes no gradient upstream
    # until the first step moves them: test the wiring of a model past that step
    for decoder in (gen.lr_decoder, gen.sr_decoder):
        torch.nn.init.normal_(decoder.tail.weight, std=0.1)
    y_s, x_t = torch.rand(4, 6, 24, 24), torch.rand(4, 3, 12, 12)
    gen.zero_grad(set_to_none=True)
    discs.zero_grad(set_to_none=True)
    discs.requires_grad_(False)
    before = {k: v.clone() for k, v in discs.state_dict().items()}
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    try:
        total, _ = losses.generator_loss(gen(y_s, x_t), y_s, x_t, discs, LossConfig())
        total.backward()
        for name, p in gen.named_parameters():
            assert p.grad is not None, name
            assert p.grad.abs().sum() > 0, name
        assert all(p.grad is None for p in discs.parameters())
        opt.step()
    finally:
        discs.requires_grad_(True)
    for k, v in discs.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("variant", ["thin_slab", "3d"])
def test_losses_are_float32_under_bf16_autocast(variant):
    gen, discs = build(ModelConfig(**TINY, variant=variant))
    y_s, x_t = torch.rand(2, 6, 16, 16), torch.rand(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gen(y_s, x_t)
        total, t = losses.generator_loss(out, y_s, x_t, discs, LossConfig(ssim_window=5))
        d_total, _ = losses.discriminator_loss(out, y_s, x_t, discs)
    assert out["f_s"].dtype == torch.bfloat16  # the networks do run in low precision
    assert total.dtype == d_total.dtype == torch.float32 and t["i_cyc.ssim"].dtype == torch.float32
    assert torch.isfinite(total) and torch.isfinite(d_total)
    total.backward()


# --------------------------------------------------------------------------- spectrum match (ours)
def test_spectrum_loss_known_answers():
    """log P is linear in log-gain: a * x against x gives exactly 2 |log a|; a batch against
    itself 0; white noise of level s against level 2 s: 2 log 2 at every frequency."""
    x = torch.rand(6, 3, 16, 16)
    assert losses.spectrum_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.spectrum_loss(0.5 * x, x).item() == pytest.approx(2 * abs(torch.log(torch.tensor(0.5)).item()), rel=1e-4)
    torch.manual_seed(1)
    n = torch.randn(512, 3, 16, 16)
    assert losses.spectrum_loss(0.01 * n, 0.02 * torch.randn(512, 3, 16, 16)).item() == \
        pytest.approx(2 * 0.6931, rel=0.05)


def test_spectrum_match_recovers_a_known_blur_and_noise_level():
    """The physics degradation trained on the spectrum match alone, on unpaired smooth random
    images, finds a target's slab blur and in-plane blur and its noise level (sigma 0.02)."""
    import torch.nn.functional as F

    from udean.models.degradation import LearnedBlur, RicianNoise
    from udean.models.layers import downsample2

    def images(n, seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.rand(n, 1, 12, 40, 40, generator=g)
        k = torch.exp(-torch.arange(-3.0, 4.0) ** 2 / 4)
        k = (k[:, None, None] * k[None, :, None] * k[None, None, :]) / k.sum() ** 3
        return F.conv3d(z, k[None, None], padding=3)[:, 0, :, 4:-4, 4:-4] * 4 - 1.5  # (n, 12, 32, 32)

    true = LearnedBlur(5, 3)
    with torch.no_grad():  # true kernels: in-plane [.2 .6 .2]-like blur, slab [.2 .6 .2]
        true.plane[1:4, 1:4] = 0.02
        true.slab[0] = true.slab[2] = 0.02
    truth = RicianNoise(sigma_init=0.02)
    with torch.no_grad():
        x_t = truth(*true(downsample2(images(48, 1)) + 0.5))
    blur, noise = LearnedBlur(5, 3), RicianNoise()
    opt = torch.optim.Adam(list(blur.parameters()) + list(noise.parameters()), lr=3e-3)
    y = downsample2(images(48, 2) + 0.5)
    for step in range(120):
        x_st = noise(*blur(y[torch.randint(48, (12,))]))
        loss = losses.spectrum_loss(x_st, x_t[torch.randint(48, (12,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(noise.sigma().detach()) == pytest.approx(0.02, rel=0.25)
    with torch.no_grad():
        (plane, slab, _), (tp, ts, _) = blur.kernels(), true.kernels()
    assert float((plane - tp).abs().sum()) < 0.5 * float((torch.eye(5)[2:3].T @ torch.eye(5)[2:3] - tp).abs().sum())
    assert float((slab - ts).abs().sum()) < 0.5 * float((torch.tensor([0.0, 1.0, 0.0]) - ts).abs().sum())


@pytest.mark.parametrize("weight, term, fn", [("lambda_spectrum", "spectrum", losses.spectrum_loss),
                                              ("lambda_noise", "noise", losses.noise_loss)])
def test_generator_loss_adds_the_weighted_target_terms(setup, weight, term, fn):
    gen, discs, y_s, x_t = setup
    with torch.no_grad():
        out = gen(y_s, x_t)
        base, t0 = losses.generator_loss(out, y_s, x_t, discs, LossConfig())
        total, t = losses.generator_loss(out, y_s, x_t, discs, LossConfig(**{weight: 0.3}))
    assert term not in t0
    assert t[term].item() == pytest.approx(fn(out["x_st"], x_t).item(), rel=1e-6)
    assert total.item() == pytest.approx(base.item() + 0.3 * t[term].item(), rel=1e-5)


def test_generator_loss_adds_the_blur_bound_only_where_there_is_a_learned_blur(setup):
    gen, discs, y_s, x_t = setup
    from udean.models.udean import Generator

    phys = Generator("thin_slab", 3, 8, 1, 1, 2, 2, image_skip=True, degradation="physics")
    with torch.no_grad():
        phys.blur.plane[3, 3] = 0.08  # centre 1.8 - mean: a sharpening kernel
        out = phys(y_s, x_t, **losses.forward_args(LossConfig(lambda_bound=2.0)))
        assert "blur_excess" not in phys(y_s, x_t)  # asked for only by the bound
        base, t0 = losses.generator_loss(out, y_s, x_t, discs, LossConfig())
        total, t = losses.generator_loss(out, y_s, x_t, discs, LossConfig(lambda_bound=2.0))
        cfg = LossConfig(lambda_bound=2.0, lambda_prior=3.0)
        total2, t2 = losses.generator_loss(phys(y_s, x_t, **losses.forward_args(cfg)), y_s, x_t, discs, cfg)
    assert "bound" not in t0 and t["bound"].item() == pytest.approx(phys.blur.excess().item())
    assert t["bound"].item() > 0 and "prior" not in t
    assert total.item() == pytest.approx(base.item() + 2.0 * t["bound"].item(), rel=1e-5)
    assert t2["prior"].item() == pytest.approx(phys.blur.deficit().item()) and t2["prior"].item() > 0
    assert total2.item() == pytest.approx(total.item() + 3.0 * t2["prior"].item(), rel=1e-5)
    with torch.no_grad():  # the decoder degradation has no blur: nothing to bound
        cfg = LossConfig(lambdas=(1.0, 0.0, 0.0, 0.0, 0.0, 0.0), lambda_bound=2.0)
        out = gen(y_s, x_t, **losses.forward_args(cfg))
        assert "blur_excess" not in out and "bound" not in losses.generator_loss(out, y_s, x_t, discs, cfg)[1]


# --------------------------------------------------------------------------- noise match (ours)
def test_noise_loss_pins_the_noise_level_and_ignores_edges():
    """Near 0 for one noise level across different anatomy (a sharp diagonal edge in one batch,
    none in the other: the band's RMS would read 3.7x), log 2 for twice the noise; trained alone
    it takes a learned sigma to the target's."""
    from udean.models.degradation import RicianNoise

    g = torch.Generator().manual_seed(0)
    flat = 0.5 + torch.zeros(64, 3, 16, 16)
    edge = flat + 0.4 * torch.ones(16, 16).triu(1)  # a diagonal step: 1/8 of the Haar diagonal band reads 0.2
    assert fidelity.haar_diagonal(edge).abs().gt(0.1).float().mean().item() == pytest.approx(1 / 8)
    n = lambda: 0.02 * torch.randn(flat.shape, generator=g)  # noqa: E731
    a, b = edge + n(), flat + n()
    rms = lambda x: fidelity.haar_diagonal(x).pow(2).mean().sqrt()  # noqa: E731
    assert torch.log(rms(a) / rms(b)).item() > 1.2
    assert losses.noise_loss(a, b).item() < 0.2
    assert losses.noise_loss(flat + 2 * n(), flat + n()).item() == pytest.approx(0.6931, abs=0.06)
    noise = RicianNoise(sigma_init=0.002)
    opt = torch.optim.Adam(noise.parameters(), lr=3e-3)
    x_t = edge + n()
    for _ in range(150):
        loss = losses.noise_loss(noise(edge), x_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(noise.sigma().detach()) == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("margin", [(0, 0), (1, 2)])
def test_noise_term_moves_only_sigma_and_the_branch_leaves_the_rng_alone(margin):
    """With lambda_noise the G step asks for `x_st_sigma`: the noise term's gradient reaches
    log sigma and nothing else (through the kernel it sharpened X_{s~t}, docs/shift.md); the
    spectrum term still reaches the kernel. Without the branch, outputs and RNG are as before."""
    cfg = ModelConfig(**TINY, degradation="physics", degradation_noise=True, source_margin=margin)
    gen, discs = build(cfg)
    m0, m1 = margin
    y_s, x_t = torch.rand(2, 6 + 4 * m0, 32 + 4 * m1, 32 + 4 * m1), torch.rand(2, 3, 16, 16)
    torch.manual_seed(1)
    plain = gen(y_s, x_t)
    torch.manual_seed(1)
    out = gen(y_s, x_t, sigma_branch=True)
    assert "x_st_sigma" not in plain and out["x_st_sigma"].shape == out["x_st"].shape
    assert torch.equal(plain["x_st"], out["x_st"])
    _, t = losses.generator_loss(out, y_s, x_t, discs, LossConfig(lambda_noise=1.0, lambda_spectrum=1.0))
    assert t["noise"].item() == pytest.approx(losses.noise_loss(out["x_st_sigma"], x_t).item(), rel=1e-6)
    reached = lambda term: {n for n, p in gen.named_parameters()  # noqa: E731
                            if (g := torch.autograd.grad(t[term], p, retain_graph=True, allow_unused=True)[0]) is not None
                            and g.abs().sum() > 0}
    assert reached("noise") == {"noise.log_sigma"}
    assert {"blur.plane", "blur.slab", "noise.log_sigma"} <= reached("spectrum")


def test_terms_weighted_0_are_not_computed_and_change_no_gradient():
    """The recommended weights [1, 0, 0, 0, 0.1, 0]: the forward computes only what i_cyc and da
    read (no Y^_s, X^_t, f_t: two decoders and an encoder pass fewer), D trains no d_feat, and
    every generator and d_lr gradient equals the full computation's with those weights."""
    torch.manual_seed(0)
    gen, discs = build(ModelConfig(**TINY, degradation="physics", source_margin=(1, 2)))
    y_s, x_t = torch.rand(2, 10, 40, 40), torch.rand(2, 3, 16, 16)
    cfg = LossConfig(lambdas=(1.0, 0.0, 0.0, 0.0, 0.1, 0.0), lambda_spectrum=1.0)
    args = losses.forward_args(cfg)
    assert args == {"outputs": ["x_st", "y_sts"], "sigma_branch": False}
    grads = []
    for kwargs in ({}, args):
        gen.zero_grad(), discs.zero_grad()
        out = gen(y_s, x_t, **kwargs)
        g_loss, t = losses.generator_loss(out, y_s, x_t, discs, cfg)
        d_loss, d = losses.discriminator_loss(out, y_s, x_t, discs, cfg)
        (g_loss + d_loss).backward()
        grads.append({n: p.grad.clone() for n, p in [*gen.named_parameters(), *discs.named_parameters()]
                      if p.grad is not None})
        assert {"i_cyc", "da", "spectrum"} <= set(t) and not {"f_cyc", "hr_con", "lr_con", "fa"} & set(t)
        assert "d_feat" not in d and "d_lr" in d
    full, lean = grads
    assert set(out) == {"x_st", "f_sts", "y_sts", "y_s"}  # f_sts comes with y_sts
    assert not any(n.startswith(("down_extractor", "lr_decoder", "d_feat")) for n in lean)
    for n, g in lean.items():
        assert torch.allclose(g, full[n], rtol=1e-5, atol=1e-8), n
    assert all(full[n].abs().max() == 0 for n in full if n not in lean and not n.startswith("d_feat"))


@pytest.mark.parametrize("recipe", ["recommended", "paper"])
def test_networks_no_active_term_reads_are_not_built_and_the_rest_get_the_same_gradients(recipe):
    """`model_parts`: the recommended recipe leaves out down_extractor, lr_decoder (the physics
    degradation and i_cyc + da do not read them) and d_feat (fa is 0); the networks it keeps start
    from a full build's weights, and the G and D losses give them the same gradients; the paper's
    six terms read every network."""
    from udean.config import load
    from udean.models.udean import built_parts

    cfg = load(recipe, ["model.features=8", "model.n_groups=1", "model.n_rcab=1", "model.reduction=2",
                        "model.encoder_layers=2", "model.disc_features=8", "model.disc_blocks=1",
                        "data.patches.lr_size=[16,16]"])
    m0, m1 = cfg.model.source_margin
    y_s, x_t = torch.rand(2, 6 + 4 * m0, 32 + 4 * m1, 32 + 4 * m1), torch.rand(2, 3, 16, 16)
    grads = []
    for parts in ({}, losses.model_parts(cfg.loss)):
        torch.manual_seed(0)
        gen, discs = build(cfg.model, slab=3, **parts)
        torch.manual_seed(1)  # the noise draws
        out = gen(y_s, x_t, **losses.forward_args(cfg.loss))
        g_loss, _ = losses.generator_loss(out, y_s, x_t, discs, cfg.loss)
        d_loss, _ = losses.discriminator_loss(out, y_s, x_t, discs, cfg.loss)
        (g_loss + d_loss).backward()
        named = [*gen.named_parameters(prefix="g"), *discs.named_parameters(prefix="d")]
        grads.append({n: (p.detach().clone(), None if p.grad is None else p.grad.clone()) for n, p in named})
        parts_built = built_parts(gen, discs)
    full, pruned = grads
    left_out = sorted({n.split(".")[1] for n in full} - {n.split(".")[1] for n in pruned})
    assert left_out == (["d_feat", "down_extractor", "lr_decoder"] if recipe == "recommended" else [])
    if recipe == "recommended":
        assert parts_built == {"g": ["blur", "lr_encoder", "noise", "sr_decoder"], "d": ["d_lr"]}
    assert all(full[n][1] is None or not full[n][1].any() for n in full if n not in pruned)  # no gradient lost
    for n, (w, g) in pruned.items():
        assert torch.equal(w, full[n][0]), n  # a full build's weights
        assert (g is None) == (full[n][1] is None) and (g is None or torch.equal(g, full[n][1])), n


def test_adaptation_off_zeroes_every_weight_that_moves_the_degradation_and_keeps_the_rest():
    from udean.config import load

    rec = load("recommended")
    off = load("recommended", losses.adaptation_off(rec.loss))
    assert rec.loss.lambdas[4] and rec.loss.lambda_spectrum and rec.loss.lambda_prior  # the recipe adapts
    assert off.loss.lambdas == (*rec.loss.lambdas[:4], 0.0, 0.0)
    assert all(getattr(off.loss, k) == 0 for k in losses.ADAPTATION_WEIGHTS)
    # nothing else changed; every LossConfig weight named lambda_* is either kept or listed here
    assert {k: v for k, v in off.loss.model_dump().items() if k != "lambdas" and k not in losses.ADAPTATION_WEIGHTS} \
        == {k: v for k, v in rec.loss.model_dump().items() if k != "lambdas" and k not in losses.ADAPTATION_WEIGHTS}
    assert {k for k in LossConfig.model_fields if k.startswith("lambda_")} == set(losses.ADAPTATION_WEIGHTS)
