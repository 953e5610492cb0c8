"""UDEAN losses, paper section II-B, Eq. 1-10.

Images are in the public layout (LR (B, S, H, W), HR (B, 2S, 2H, 2W)) for both variants; features
as the Generator returns them. `out` is the dict of `Generator.forward`; `discs` the
`Discriminators` module; `cfg` the LossConfig. Every loss is computed in float32 (discriminator
scores and images are cast), so bf16/fp16 autocast only touches the networks.

Choices where the paper is open (also in LossConfig / ModelConfig):
- Eq. 2, N: the SSIM loss averages |1 - SSIM|^2 over 2D slices (every slice of every sample is
  one term), SSIM from `udean.metrics.ssim` (2D Gaussian window `ssim_window`, float32).
- Eq. 3 as written is mean |D(x) - 1| (`adversarial: abs`); the text says least squares, so
  `adversarial: lsq` gives mean (D(x) - 1)^2.
- Eq. 4 and 6: the adversarial term on HR images uses the HR discriminator `d_hr` (real = Y_s);
  with `model.hr_discriminator: false` those beta terms are 0. Eq. 7 uses the LR discriminator.
- Discriminators are trained with least squares (real -> 1, fake -> 0, each D's loss is
  0.5 * (real + fake), fakes detached): d_lr: X_t real, X_{s~t} fake; d_feat: f_t real, f_s fake
  (the paper: D_fa "distinguishes f_t from f_s"; the target domain is the one to adapt to);
  d_hr: Y_s real, Y_{s~t~s} and Y^_s fake.
- Eq. 8 and 9 as written: the generator pushes both D outputs to 0.5 (D cannot tell the
  domains apart); the D(X_t) term carries no gradient to the generator but is kept in the value.
  `adversarial: lsq` squares these too.
- Ours, off by default (LossConfig): `f_cyc_stop_gradient` detaches Eq. 5's target f_s;
  `adapt_start` / `adapt_ramp` scale lambda_da and lambda_fa by `adapt_scale` (a warm-up);
  `lambda_spectrum` adds `spectrum_loss` (X_{s~t}'s log power spectrum against X_t's; not
  warmed up: with `model.cycle_detach` it only moves the degradation network).
  `lambda_noise` adds `noise_loss` (X_{s~t}'s noise level against X_t's; not warmed up either).
  `lambda_bound` adds the learned blur's amplification (`LearnedBlur.excess`, in `out` as
  "blur_excess" when the generator has a physics degradation): no frequency above 1.
"""
from __future__ import annotations

import json

import torch

from udean.fidelity import noise_level
from udean.metrics import ssim

TERMS = ("i_cyc", "f_cyc", "hr_con", "lr_con", "da", "fa")  # order of LossConfig.lambdas (Eq. 10)
# the Generator.forward outputs each term reads (x_st, always there, for da, spectrum and noise)
NEEDS = {"i_cyc": ("y_sts",), "f_cyc": ("f_sts", "f_s"), "hr_con": ("y_hat_s",), "lr_con": ("x_hat_t",),
         "da": ("x_st",), "fa": ("f_t", "f_s")}


def active_terms(cfg) -> tuple[str, ...]:
    """The terms of Eq. 10 whose lambda is not 0: the only ones computed (a 0 weight adds nothing
    to the loss or to any gradient, so skipping it changes no update)."""
    return tuple(k for w, k in zip(cfg.lambdas, TERMS) if w)


# the weights besides lambda_da and lambda_fa that move the degradation toward X_t or shape it
ADAPTATION_WEIGHTS = ("lambda_spectrum", "lambda_noise", "lambda_bound", "lambda_prior")


def adaptation_off(cfg) -> list[str]:
    """Overrides that stop the degradation adapting to X_t, for the LossConfig `cfg`: lambda_da,
    lambda_fa, lambda_spectrum and lambda_noise 0, and the learned blur's regularisers off
    (lambda_bound, lambda_prior: the prior alone would move it toward no blur); the other
    weights as they are. The ablation's one home (benchmarks/shift.py udean_fixed,
    benchmarks/demo_ablation.py adaptation_off)."""
    return [f"loss.lambdas={json.dumps([*cfg.lambdas[:4], 0.0, 0.0])}", *(f"loss.{k}=0" for k in ADAPTATION_WEIGHTS)]


def forward_args(cfg) -> dict:
    """The keyword arguments of `Generator.forward` for this loss: the outputs its active terms
    read, and the sigma branch when `lambda_noise` is on."""
    outputs = ({o for k in active_terms(cfg) for o in NEEDS[k]} | ({"blur_excess"} if cfg.lambda_bound else set())
               | ({"blur_deficit"} if cfg.lambda_prior else set()))
    return {"outputs": sorted(outputs), "sigma_branch": bool(cfg.lambda_noise)}


def discriminators_read(cfg) -> tuple[str, ...]:
    """The discriminators this loss reads: d_lr always (Eq. 8, and the D step trains it), d_feat
    for fa (Eq. 9), d_hr for the HR image terms (Eq. 4, 6; where the model has one)."""
    active = set(active_terms(cfg))
    return ("d_lr",) + (("d_feat",) if "fa" in active else ()) + (("d_hr",) if active & {"i_cyc", "hr_con"} else ())


def model_parts(cfg) -> dict:
    """`udean.models.udean.build` keywords for this loss: only the networks its active terms read
    (a network weighted out gets no gradient; in an engine it would only cost work every step)."""
    return {"outputs": forward_args(cfg)["outputs"], "discriminators": discriminators_read(cfg)}


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 1: mean |x - y| over all elements."""
    return (x.float() - y.float()).abs().mean()


def ssim_loss(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Eq. 2: mean over 2D slices of |1 - SSIM(slice)|^2; x, y (B, C, H, W), float32 always."""
    return ((1.0 - ssim(x, y, window=window, reduction="none")) ** 2).mean()


def adversarial(score: torch.Tensor, mode: str = "abs", target: float = 1.0) -> torch.Tensor:
    """Eq. 3 on discriminator scores D(x) of any shape: "abs" mean |D - target|, "lsq" mean
    (D - target)^2; target 1 (Eq. 3) or 0.5 (Eq. 8, 9)."""
    d = score.float() - target
    if mode == "abs":
        return d.abs().mean()
    if mode == "lsq":
        return (d**2).mean()
    raise ValueError(f"adversarial mode must be 'abs' or 'lsq', got {mode!r}")


def adaptation(score_a: torch.Tensor, score_b: torch.Tensor, mode: str = "abs") -> torch.Tensor:
    """Eq. 8 / 9: mean |D(a) - 0.5| + mean |D(b) - 0.5| ("lsq": squares instead of |.|)."""
    return adversarial(score_a, mode, 0.5) + adversarial(score_b, mode, 0.5)


def log_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Log power spectrum of a batch of LR images (B, S, H, W): the 3D DFT over (S, H, W) of each
    image minus its mean, Hann window in-plane (none along the few slab slices), |.|^2 averaged
    over the batch, log (+1e-10): (S, H, W), float32."""
    x = x.float()
    h, w = x.shape[-2:]
    win = torch.hann_window(h, periodic=False, device=x.device)[:, None] * \
        torch.hann_window(w, periodic=False, device=x.device)[None, :]
    p = torch.fft.fftn((x - x.mean(dim=(-1, -2, -3), keepdim=True)) * win, dim=(-3, -2, -1)).abs() ** 2
    return torch.log(p.mean(0) + 1e-10)


def spectrum_loss(x_st: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Ours: mean |log P(X_{s~t}) - log P(X_t)| over frequencies (`log_spectrum`; X_t is data).
    Blur multiplies the power spectrum, noise adds a floor: this matches both, for any anatomy
    whose spectrum the source and target groups share."""
    return (log_spectrum(x_st) - log_spectrum(x_t).detach()).abs().mean()


def noise_loss(x_st: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """Ours: |log noise(X_{s~t}) - log noise(X_t)| (`udean.fidelity.noise_level`; X_t is data).
    The spectrum match alone has a ridge (more noise and more blur give nearly the same log
    spectrum as less of both): without a degradation shift to learn, it walked along it to 2x the
    target's noise and a strong blur (docs/shift.md). The finest Haar band of the smoother half of
    the voxels is mostly noise, so this pins the noise level to the target's. `generator_loss`
    passes X_{s~t} with its noise-free part detached (`x_st_sigma`): the term moves sigma only;
    through the kernel it sharpened X_{s~t} to raise the band, and the degradation left the truth
    (docs/shift.md)."""
    return (torch.log(noise_level(x_st)) - torch.log(noise_level(x_t)).detach()).abs()


def _image_term(pred: torch.Tensor, target: torch.Tensor, disc, cfg, parts: dict, name: str) -> torch.Tensor:
    """L1 + alpha * L_SSIM + beta * L_adv(pred) (Eq. 4, 6, 7); the pieces go into `parts`."""
    parts[f"{name}.l1"] = l1(pred, target)
    parts[f"{name}.ssim"] = ssim_loss(pred, target, cfg.ssim_window)
    total = parts[f"{name}.l1"] + cfg.alpha * parts[f"{name}.ssim"]
    if disc is not None:
        parts[f"{name}.adv"] = adversarial(disc(pred), cfg.adversarial)
        total = total + cfg.beta * parts[f"{name}.adv"]
    return total


def adapt_scale(cfg, progress: float) -> float:
    """Factor on lambda_da and lambda_fa at `progress` (step / total steps) of the run:
    0 before `cfg.adapt_start`, then a linear ramp over `cfg.adapt_ramp`, then 1."""
    if progress < cfg.adapt_start:
        return 0.0
    return 1.0 if cfg.adapt_ramp == 0 else min(1.0, (progress - cfg.adapt_start) / cfg.adapt_ramp)


def generator_loss(out: dict, y_s: torch.Tensor, x_t: torch.Tensor, discs, cfg,
                   adapt: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Eq. 10: Loss_G = sum_k lambda_k * L_k over (i_cyc, f_cyc, hr_con, lr_con, da, fa).

    `adapt` multiplies lambda_da and lambda_fa (`adapt_scale`, the warm-up; 1: Eq. 10 as written).
    Returns (total, terms): terms holds the active L_k (`active_terms`: lambda not 0), their
    pieces ("i_cyc.l1", "i_cyc.ssim", "i_cyc.adv", ...) and "total", all scalar tensors (only
    `total` needs backward). `out` needs the outputs of `forward_args(cfg)`.
    Freeze the discriminators (requires_grad_(False)) around this in the G step.
    """
    y_s = out.get("y_s", y_s)  # model.source_margin: the patch's centre
    terms = {
        "i_cyc": lambda: _image_term(out["y_sts"], y_s, discs.d_hr, cfg, t, "i_cyc"),  # Eq. 4
        "f_cyc": lambda: l1(out["f_sts"], out["f_s"].detach() if cfg.f_cyc_stop_gradient else out["f_s"]),  # Eq. 5
        "hr_con": lambda: _image_term(out["y_hat_s"], y_s, discs.d_hr, cfg, t, "hr_con"),  # Eq. 6
        "lr_con": lambda: _image_term(out["x_hat_t"], x_t, discs.d_lr, cfg, t, "lr_con"),  # Eq. 7
        "da": lambda: adaptation(discs.d_lr(out["x_st"]), discs.d_lr(x_t), cfg.adversarial),  # Eq. 8
        "fa": lambda: adaptation(discs.d_feat(out["f_t"]), discs.d_feat(out["f_s"]), cfg.adversarial),  # Eq. 9
    }
    t: dict[str, torch.Tensor] = {}
    total = out["x_st"].new_zeros((), dtype=torch.float32)
    for w, k in zip(cfg.lambdas, TERMS):
        if w:  # active_terms: a term weighted 0 is not computed (nor its networks, forward_args)
            t[k] = terms[k]()
            total = total + w * (adapt if k in ("da", "fa") else 1.0) * t[k]
    if cfg.lambda_spectrum:
        t["spectrum"] = spectrum_loss(out["x_st"], x_t)
        total = total + cfg.lambda_spectrum * t["spectrum"]
    if cfg.lambda_noise:
        t["noise"] = noise_loss(out.get("x_st_sigma", out["x_st"]), x_t)
        total = total + cfg.lambda_noise * t["noise"]
    if cfg.lambda_bound and "blur_excess" in out:
        t["bound"] = out["blur_excess"]
        total = total + cfg.lambda_bound * t["bound"]
    if cfg.lambda_prior and "blur_deficit" in out:
        t["prior"] = out["blur_deficit"]
        total = total + cfg.lambda_prior * t["prior"]
    t["total"] = total
    return total, t


def lsq_discriminator(disc, real: torch.Tensor, fakes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares D loss pieces: mean (D(real) - 1)^2 and the mean over fakes of mean D(fake)^2."""
    real_term = ((disc(real.detach()).float() - 1.0) ** 2).mean()
    fake_term = sum((disc(f.detach()).float() ** 2).mean() for f in fakes) / len(fakes)
    return real_term, fake_term


def discriminator_loss(out: dict, y_s: torch.Tensor, x_t: torch.Tensor, discs, cfg=None) -> tuple[torch.Tensor, dict]:
    """Least squares for each discriminator, 0.5 * (real + fake), summed; inputs detached, so the
    generator's graph is never touched and `out` can be the G step's outputs.

    d_lr: X_t vs X_{s~t}; d_feat: f_t vs f_s; d_hr (if any): Y_s vs {Y_{s~t~s}, Y^_s}.
    Returns (total, terms) with "d_lr", "d_lr.real", "d_lr.fake", ... and "total".
    `cfg` (LossConfig): d_feat is trained only when lambda_fa is not 0, d_hr on the fakes of the
    active HR terms (nothing reads a discriminator whose terms are off); None: all of them.
    """
    y_s = out.get("y_s", y_s)  # model.source_margin: the patch's centre
    active = TERMS if cfg is None else active_terms(cfg)
    pairs = {"d_lr": (discs.d_lr, x_t, [out["x_st"]])}
    if "fa" in active:
        pairs["d_feat"] = (discs.d_feat, out["f_t"], [out["f_s"]])
    fakes_hr = [out[NEEDS[k][0]] for k in ("i_cyc", "hr_con") if k in active]  # Y_{s~t~s}, Y^_s
    if discs.d_hr is not None and fakes_hr:
        pairs["d_hr"] = (discs.d_hr, y_s, fakes_hr)
    t: dict[str, torch.Tensor] = {}
    for name, (disc, real, fakes) in pairs.items():
        t[f"{name}.real"], t[f"{name}.fake"] = lsq_discriminator(disc, real, fakes)
        t[name] = 0.5 * (t[f"{name}.real"] + t[f"{name}.fake"])
    total = sum(t[name] for name in pairs)
    t["total"] = total
    return total, t
