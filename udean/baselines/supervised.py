"""Supervised TS-RCAN: the paper's Table I benchmarks 1-3.

Paper: "three supervised training approaches were employed as the benchmarks using TS-RCAN [8]
in the supervised manner" (UDEAN, III-A); TS-RCAN: Zhang et al., "Thin-slab RCAN", the
backbone of UDEAN's decoders.

    benchmark 1  misaligned LR / HR pairs directly          (`pairs.misaligned_pairs`)
    benchmark 2  rigidly registered LR / HR pairs           (`pairs.registered_pairs`)
    benchmark 3  HR + synthetic LR by 3D nearest downsampling, tested on k-space-truncated LR:
                 the degradation-shift case                  (`pairs.nearest_pairs`)

The three differ only in their data; they share this network and `loop.fit`.

Departures from the paper's benchmarks:
- the network is UDEAN's own SR path (`SRNet`: LR encoder + TS-RCAN SR decoder), so the SR
  architecture is identical to UDEAN's at inference; the paper's TS-RCAN has a plain head conv
  where ours has the 6-layer LR encoder.
- loss: L1 + alpha * L_SSIM (UDEAN Eq. 1-2, alpha 0.5), the reconstruction terms UDEAN itself
  uses; the paper does not state the benchmarks' loss.
- registration: SimpleITK Mattes MI instead of Amira's extended MI (`preprocessing/registration.py`).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from udean.baselines.loop import Budget, fit
from udean.baselines.pairs import sampler
from udean.engines import adam
from udean.losses import l1, ssim_loss
from udean.metrics import ssim
from udean.models.udean import SRNet, build_sr


def sr_network(model_cfg, slab: int) -> SRNet:
    """UDEAN's inference path, fresh: LR (B, S, H, W) -> SR (B, 2S, 2H, 2W)."""
    return build_sr(model_cfg, slab)


def sr_loss(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.5, window: int = 7,
            weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L1 + alpha * L_SSIM (Eq. 1, 2) of (B, C, H, W) images; `weight` (B, 1 or C, H, W) >= 0
    weights every voxel of the L1 term and, averaged per sample, the SSIM term (DASR)."""
    if weight is None:
        a, b = l1(pred, target), ssim_loss(pred, target, window)
    else:
        w = weight.float().expand_as(pred)
        a = (w * (pred.float() - target.float()).abs()).mean()
        per_slice = (1.0 - ssim(pred, target, window=window, reduction="none")) ** 2  # (B, C)
        b = (w.mean(dim=(-1, -2)) * per_slice).mean()
    return a + alpha * b, {"l1": a.item(), "ssim": b.item()}


class SupervisedTSRCAN(nn.Module):
    """TS-RCAN trained on LR / HR patch pairs with L1 + alpha * SSIM (Table I, benchmarks 1-3).

    LR (B, S, H, W) -> SR (B, 2S, 2H, 2W). Paper: TS-RCAN [8] "in the supervised manner".
    """

    def __init__(self, model_cfg, slab: int, alpha: float = 0.5, window: int = 7):
        super().__init__()
        self.net = sr_network(model_cfg, slab)
        self.alpha, self.window = alpha, window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def fit(self, lr: np.ndarray, hr: np.ndarray, budget: Budget, augment: bool = False,
            progress: Callable[[int, dict], None] | None = None) -> list[dict[str, float]]:
        """Train on pairs (lr[k], hr[k]); lr (N, S, h, w), hr (N, 2S, 2h, 2w)."""
        self.to(budget.device).train()
        batch = sampler(lr, hr, batch_size=budget.batch_size, seed=budget.seed, paired=True, augment=augment,
                        device=budget.device)

        def loss(step: int):
            x, y = batch(step)
            total, parts = sr_loss(self.net(x), y, self.alpha, self.window)
            return total, {"loss": total.item(), **parts}

        history = fit([(adam(self.net.parameters(), budget.train), loss)], budget, progress)
        self.eval()
        return history
