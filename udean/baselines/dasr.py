"""DASR: unsupervised SR by domain-distance-aware training, two stages.

Paper: Wei, Gu, Li, Timofte, Jin, Song, "Unsupervised Real-world Image Super Resolution via
Domain-distance Aware Training", CVPR 2021 (UDEAN's [14], Table II).

Stage 1, degradation: a down-sampling network `down` (UDEAN's downsampling feature extractor +
LR decoder) maps source HR Y_s to LR X_g = down(Y_s) in the target domain:
    content   |lowpass(X_g) - lowpass(box(Y_s))|_1        keep the image content
    adversarial  LSGAN(d_lr(highpass(X_g)))               match the target's high frequencies
with `d_lr` a patch discriminator trained on highpass(X_t) (real) vs highpass(X_g) (fake).
Domain distance map: d_lr's patch score on X_g, clipped to [0, 1] (1: indistinguishable from
target LR), upsampled to the HR grid.
Stage 2, SR: `sr` is trained on the generated pairs (X_g, Y_s) with the domain-distance-weighted
loss  sum_v w_v |SR(X_g) - Y_s|_v + alpha * w-weighted SSIM  (pairs that look more like real
target LR count more), plus a target-domain term beta * LSGAN(d_hr(highpass(SR(X_t)))) with
`d_hr` trained on highpass(Y_s) (real) vs highpass(SR(X_t)) (fake).
The stages are not trained end to end, which the UDEAN paper names as DASR's weakness.

Departures from the original:
- networks: UDEAN's modules (degradation mapping, SR path, VGG patch discriminators) instead of
  DASR's DSN / ESRGAN-style SR network; 2D thin slabs, x2 along every axis.
- frequency split: a 2D Gaussian low-pass (sigma 1 voxel) and its residual as the high-pass,
  instead of DASR's Gaussian content filter + Haar-wavelet high frequencies; bicubic reference
  downsampling replaced by 2x2x2 box averaging.
- no perceptual (VGG-19) losses (no ImageNet weights offline, and 2D natural-image features do
  not suit thin MRI slabs); L1 + alpha * SSIM instead.
- weights: w = 0.1 + 0.9 * clip(score, 0, 1), normalised to mean 1 per batch, so a saturated
  discriminator cannot zero the loss.
- budget: the suite's, split in half between the stages (Adam, cosine LR per stage).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from udean.baselines.cyclegan import box_down, d_step, degradation_network, image_discriminator
from udean.baselines.loop import Budget, fit
from udean.baselines.pairs import sampler
from udean.baselines.supervised import sr_loss, sr_network
from udean.engines import adam, frozen
from udean.losses import adversarial, l1
from udean.metrics import gaussian_window


def lowpass(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """In-plane Gaussian blur of every slice of (B, C, H, W), reflect padding, same shape."""
    k = 2 * int(round(2 * sigma)) + 1
    g = gaussian_window(k, sigma, device=x.device).to(x.dtype)
    c = x.shape[1]
    x = F.pad(x, (k // 2,) * 4, mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def highpass(x: torch.Tensor) -> torch.Tensor:
    return x - lowpass(x)


def distance_weights(score: torch.Tensor, hr_shape: torch.Size) -> torch.Tensor:
    """d_lr patch scores ((B, 1, h, w), or (B, 1, S, h, w) in 3d) -> (B, 1, 2H, 2W) weights, mean 1."""
    if score.dim() == 5:
        score = score.mean(dim=2)
    w = 0.1 + 0.9 * score.detach().float().clamp(0.0, 1.0)
    w = F.interpolate(w, size=tuple(hr_shape[-2:]), mode="bilinear", align_corners=False)
    return w / w.mean().clamp_min(1e-6)


class DASR(nn.Module):
    """LR (B, S, H, W) -> SR (B, 2S, 2H, 2W) through `sr`; `fit` trains both stages."""

    def __init__(self, model_cfg, slab: int, alpha: float = 0.5, window: int = 7, adv: float = 0.1,
                 beta: float = 0.01):
        super().__init__()
        self.down = degradation_network(model_cfg, slab)
        self.d_lr = image_discriminator(model_cfg, slab)
        self.sr = sr_network(model_cfg, slab)
        self.d_hr = image_discriminator(model_cfg, 2 * slab)
        self.alpha, self.window, self.adv, self.beta = alpha, window, adv, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sr(x)

    def fit(self, lr_t: np.ndarray, hr_s: np.ndarray, budget: Budget,
            progress: Callable[[int, dict], None] | None = None) -> list[dict[str, float]]:
        """lr_t (N, S, h, w) target LR, hr_s (M, 2S, 2h, 2w) source HR, unpaired."""
        self.to(budget.device).train()
        stage = budget.split(2)
        batch = sampler(lr_t, hr_s, batch_size=budget.batch_size, seed=budget.seed, paired=False, device=budget.device)
        cache: dict[str, torch.Tensor] = {}

        # stage 1: degradation network + domain discriminator
        def down_loss(step: int):
            x_t, y_s = batch(step)
            x_g = self.down(y_s)
            cache.update(real=highpass(x_t), fake=highpass(x_g).detach())
            content = l1(lowpass(x_g), lowpass(box_down(y_s)))
            with frozen(self.d_lr):
                adv = adversarial(self.d_lr(highpass(x_g)), "lsq")
            return content + self.adv * adv, {"down.content": content.item(), "down.adv": adv.item()}

        def d_lr_loss(step: int):
            loss = d_step(self.d_lr, cache["real"], cache["fake"])
            return loss, {"d_lr": loss.item()}

        history = fit([(adam(self.down.parameters(), stage.train), down_loss),
                       (adam(self.d_lr.parameters(), stage.train), d_lr_loss)], stage, progress)
        self.down.eval()
        self.d_lr.eval()

        # stage 2: SR with domain-distance-weighted supervision + target-domain adversary
        def sr_step(step: int):
            x_t, y_s = batch(stage.steps + step)
            with torch.no_grad():
                x_g = self.down(y_s)
                w = distance_weights(self.d_lr(highpass(x_g)), y_s.shape)
            rec, parts = sr_loss(self.sr(x_g), y_s, self.alpha, self.window, weight=w)
            sr_t = self.sr(x_t)
            cache.update(real=highpass(y_s), fake=highpass(sr_t).detach())
            with frozen(self.d_hr):
                adv = adversarial(self.d_hr(highpass(sr_t)), "lsq")
            return rec + self.beta * adv, {"sr.l1": parts["l1"], "sr.ssim": parts["ssim"], "sr.adv": adv.item(),
                                           "sr.w_min": w.min().item()}

        def d_hr_loss(step: int):
            loss = d_step(self.d_hr, cache["real"], cache["fake"])
            return loss, {"d_hr": loss.item()}

        history += fit([(adam(self.sr.parameters(), stage.train), sr_step),
                        (adam(self.d_hr.parameters(), stage.train), d_hr_loss)], stage,
                       None if progress is None else lambda i, r: progress(stage.steps + i, r))
        self.eval()
        return history
