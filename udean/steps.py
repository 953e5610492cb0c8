"""One training step and one validation pass.

Training step (paper, II-A: "The discriminators are trained alternately with degradation mapping
module and SR reconstruction network"): one forward of the generators, then

- G step: Loss_G of Eq. 10 through the discriminators, whose parameters are frozen
  (`requires_grad_(False)`) so D's engine sees no gradient;
- D step: least-squares D loss on the same outputs, detached inside `discriminator_loss`.

Both losses are computed before either engine steps, so one all-reduced flag decides for every
rank whether the step is skipped (a non-finite loss anywhere): ranks never diverge, and no rank
waits in a gradient all-reduce that another rank skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from udean.data.volumes import load_pair, sr_volume
from udean.engines import Engines, frozen
from udean.losses import discriminator_loss, generator_loss
from udean.metrics import psnr, ssim


@dataclass
class StepResult:
    skipped: bool  # a non-finite loss on some rank: no engine stepped
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # "g.total", "g.i_cyc", "d.d_lr", ...

    def scalars(self) -> dict[str, float]:
        """Python floats (a device sync: call on logging steps only)."""
        return {k: float(v) for k, v in self.terms.items()}


def train_step(engines: Engines, y_s: torch.Tensor, x_t: torch.Tensor, loss_cfg, dist,
               adapt: float = 1.0) -> StepResult:
    """y_s (B, 2S, 2h, 2w) source HR, x_t (B, S, h, w) target LR, float32 on any device;
    `adapt`: the adaptation weights' warm-up factor (`losses.adapt_scale`)."""
    g, d = engines.g, engines.d
    y_s = y_s.to(g.device, engines.dtype, non_blocking=True)
    x_t = x_t.to(g.device, engines.dtype, non_blocking=True)
    out = g(y_s, x_t)
    with frozen(d.module):
        g_loss, g_terms = generator_loss(out, y_s, x_t, d.module, loss_cfg, adapt)
    d_loss, d_terms = discriminator_loss(out, y_s, x_t, d.module, loss_cfg)
    terms = {**{f"g.{k}": v.detach() for k, v in g_terms.items()},
             **{f"d.{k}": v.detach() for k, v in d_terms.items()}}
    bad = not bool(torch.isfinite(g_loss.detach()) & torch.isfinite(d_loss.detach()))
    if dist.all_reduce_flag(bad):
        return StepResult(skipped=True, terms=terms)
    g.backward(g_loss)
    g.step()
    d.backward(d_loss)
    d.step()
    return StepResult(skipped=False, terms=terms)


@torch.no_grad()
def validate(engines: Engines, volumes: list[str | os.PathLike], cfg, dist) -> dict[str, float]:
    """Mean PSNR / SSIM of whole val volumes, SR by sliding window over each LR volume.

    Volumes are split across ranks and the sums all-reduced; SSIM is per slice along the slice
    axis with the loss's window, on the whole volume (background included)."""
    gen = engines.generator
    was_training = gen.training
    gen.eval()
    p = cfg.data.patches
    sums = np.zeros(3)
    for path in volumes[dist.rank::dist.world_size]:
        lr, hr = load_pair(path)
        sr = sr_volume(gen.sr, lr, p.lr_size, batch=cfg.train.batch_size, slab=p.slab,
                       device=engines.g.device, dtype=engines.dtype)
        # an odd HR extent has no LR voxel for its last slice: compare the common grid
        common = tuple(min(a, b) for a, b in zip(sr.shape, hr.shape))
        sr_t = torch.from_numpy(np.clip(sr[tuple(slice(0, n) for n in common)], 0.0, 1.0))
        hr_t = torch.from_numpy(hr[tuple(slice(0, n) for n in common)])
        sums += (float(psnr(sr_t, hr_t)), float(ssim(sr_t, hr_t, window=cfg.loss.ssim_window)), 1.0)
    gen.train(was_training)
    total = [dist.all_reduce_sum(v) for v in sums]
    n = max(total[2], 1.0)
    return {"psnr": total[0] / n, "ssim": total[1] / n, "volumes": total[2]}
