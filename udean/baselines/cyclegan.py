"""CycleGAN-based SR: unpaired LR <-> HR translation with cycle consistency, then SR.

Paper: Zhu, Park, Isola, Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks", ICCV 2017 (UDEAN's [12], Table II); "translation, then SR" as in the
CycleGAN-based SR methods UDEAN discusses (Pseudo-SR [13]).

Stage 1 (CycleGAN): two generators across the two domains, LR -> HR (`sr`, UDEAN's SR path)
and HR -> LR (`down`: UDEAN's downsampling feature extractor + LR decoder), two least-squares
discriminators (`d_lr` on target LR images, `d_hr` on source HR images):

    G loss = LSGAN(d_hr(sr(X_t))) + LSGAN(d_lr(down(Y_s)))
             + cycle * (|down(sr(X_t)) - X_t|_1 + |sr(down(Y_s)) - Y_s|_1)
             + identity * cycle * (|down(Y_s) - box(Y_s)|_1 + |box(sr(X_t)) - X_t|_1)

Stage 2 (SR): `sr` is fine-tuned supervised on the translated pairs (down(Y_s), Y_s) with
L1 + alpha * SSIM; inference is `sr` alone. Unlike UDEAN, no feature-space adaptation and no
end-to-end coupling of the SR loss with the translation.

Departures from the original:
- the two generators change the grid (x2 / /2) instead of ResNet image-to-image generators of
  the same size. The identity loss |G(y) - y| needs same-size domains; its cross-scale analogue
  here compares through 2x2x2 box averaging (`box`), with Zhu et al.'s weight 0.5 * cycle. It
  keeps the translation content-preserving (without it, at small budgets, down(Y_s) drifts to
  an LR "code" of Y_s that satisfies the cycle but looks nothing like X_t).
- discriminators: UDEAN's VGG-style patch discriminators (3D thin slab) instead of 70x70
  PatchGAN; no image history buffer; least squares as in the original.
- budget: the suite's, split in half between the stages (Adam, cosine LR per stage).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from udean.baselines.loop import Budget, fit
from udean.baselines.pairs import sampler
from udean.baselines.supervised import sr_loss, sr_network
from udean.engines import adam, frozen
from udean.losses import lsq_discriminator, adversarial, l1
from udean.models.discriminators import VGGDiscriminator
from udean.models.encoders import DownExtractor
from udean.models.layers import VARIANT_DIMS, image_channels
from udean.models.rcan import LRDecoder


def degradation_network(model_cfg, slab: int) -> nn.Sequential:
    """HR (B, 2S, 2H, 2W) -> LR (B, S, H, W): UDEAN's degradation mapping module (Fig. 1, orange)."""
    m = model_cfg
    dims = VARIANT_DIMS[m.variant]
    return nn.Sequential(DownExtractor(dims, slab, m.features, m.encoder_layers),
                         LRDecoder(dims, slab, m.features, m.n_groups, m.n_rcab, m.reduction))


def image_discriminator(model_cfg, channels: int) -> VGGDiscriminator:
    """VGG patch discriminator on images of `channels` slices (public layout)."""
    m = model_cfg
    dims = VARIANT_DIMS[m.variant]
    return VGGDiscriminator(dims, image_channels(dims, channels), m.disc_features, m.disc_blocks, image=True)


def box_down(y: torch.Tensor) -> torch.Tensor:
    """HR (B, 2S, 2H, 2W) -> (B, S, H, W) by 2x2x2 averaging: a fixed reference degradation."""
    return F.avg_pool3d(y.unsqueeze(1), 2).squeeze(1)


def d_step(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Least-squares discriminator loss 0.5 * (mean (D(real) - 1)^2 + mean D(fake)^2), detached inputs."""
    r, f = lsq_discriminator(disc, real, [fake])
    return 0.5 * (r + f)


class CycleGANSR(nn.Module):
    """LR (B, S, H, W) -> SR (B, 2S, 2H, 2W) through `sr`; `fit` trains both stages."""

    def __init__(self, model_cfg, slab: int, alpha: float = 0.5, window: int = 7, cycle: float = 10.0,
                 identity: float = 0.5):
        super().__init__()
        self.sr = sr_network(model_cfg, slab)
        self.down = degradation_network(model_cfg, slab)
        self.d_lr = image_discriminator(model_cfg, slab)
        self.d_hr = image_discriminator(model_cfg, 2 * slab)
        self.alpha, self.window, self.cycle, self.identity = alpha, window, cycle, identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sr(x)

    def fit(self, lr_t: np.ndarray, hr_s: np.ndarray, budget: Budget,
            progress: Callable[[int, dict], None] | None = None) -> list[dict[str, float]]:
        """lr_t (N, S, h, w) target LR, hr_s (M, 2S, 2h, 2w) source HR, unpaired."""
        self.to(budget.device).train()
        stage = budget.split(2)
        batch = sampler(lr_t, hr_s, batch_size=budget.batch_size, seed=budget.seed, paired=False, device=budget.device)
        cache: dict[str, torch.Tensor] = {}

        def g_loss(step: int):
            x_t, y_s = batch(step)
            fake_hr, fake_lr = self.sr(x_t), self.down(y_s)
            cache.update(x_t=x_t, y_s=y_s, fake_hr=fake_hr.detach(), fake_lr=fake_lr.detach())
            with frozen(self.d_lr), frozen(self.d_hr):
                adv = adversarial(self.d_hr(fake_hr), "lsq") + adversarial(self.d_lr(fake_lr), "lsq")
            cyc = l1(self.down(fake_hr), x_t) + l1(self.sr(fake_lr), y_s)
            idt = l1(fake_lr, box_down(y_s)) + l1(box_down(fake_hr), x_t)
            total = adv + self.cycle * (cyc + self.identity * idt)
            return total, {"g.adv": adv.item(), "g.cycle": cyc.item(), "g.identity": idt.item()}

        def d_loss(step: int):
            total = d_step(self.d_hr, cache["y_s"], cache["fake_hr"]) + d_step(self.d_lr, cache["x_t"], cache["fake_lr"])
            return total, {"d": total.item()}

        gen = list(self.sr.parameters()) + list(self.down.parameters())
        discs = list(self.d_lr.parameters()) + list(self.d_hr.parameters())
        history = fit([(adam(gen, stage.train), g_loss), (adam(discs, stage.train), d_loss)], stage, progress)

        def sr_step(step: int):
            _, y_s = batch(stage.steps + step)
            with torch.no_grad():
                x = self.down(y_s)
            total, parts = sr_loss(self.sr(x), y_s, self.alpha, self.window)
            return total, {"sr.loss": total.item(), **{f"sr.{k}": v for k, v in parts.items()}}

        history += fit([(adam(self.sr.parameters(), stage.train), sr_step)], stage,
                       None if progress is None else lambda i, r: progress(stage.steps + i, r))
        self.eval()
        return history
