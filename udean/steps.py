"""One training step and one validation pass.

Training step (paper, II-A: "The discriminators are trained alternately with degradation mapping
module and SR reconstruction network"): one forward of the generators, then

- G step: Loss_G of Eq. 10 through the discriminators, whose parameters are frozen
  (`requires_grad_(False)`) so D's engine sees no gradient;
- D step: least-squares D loss on the same outputs, detached inside `discriminator_loss`.

Both losses are computed before either engine steps, so one all-reduced flag decides for every
rank whether the step is skipped (a non-finite loss anywhere): ranks never diverge, and no rank
waits in a gradient all-reduce that another rank skipped. The preemption request rides in the
same tensor: one small all-reduce and one host read per step (`step_flags`), the one sync the
step itself needs (the host must know before `engine.step()` whether to call it); the loss terms
stay on the device until a logging step reads them, all at once (`StepResult.scalars`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from udean.engines import Engines, frozen
from udean.evaluate import Evaluator
from udean.infer import Inferer
from udean.losses import discriminator_loss, forward_args, generator_loss


@dataclass
class StepResult:
    skipped: bool  # a non-finite loss on some rank: no engine stepped
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # "g.total", "g.i_cyc", "d.d_lr", ...
    stop: bool = False  # some rank was asked to stop (preemption): checkpoint and exit, every rank

    def scalars(self) -> dict[str, float]:
        """Python floats, read in one device-to-host copy (a sync: call on logging steps only)."""
        if not self.terms:
            return {}
        values = torch.stack([v.float().reshape(()) for v in self.terms.values()]).tolist()
        return dict(zip(self.terms, values))


def step_flags(nonfinite: torch.Tensor, stop: bool, dist) -> tuple[bool, bool]:
    """(skip, stop) as every rank sees them: this rank's non-finite flag (a bool tensor on the
    device) and preemption request, max over the ranks in one all-reduce, read in one host sync."""
    flags = dist.all_reduce_max(torch.stack((nonfinite, torch.full_like(nonfinite, stop))).float())
    code = int((flags[0] + 2 * flags[1]).item())  # the one host read of the step
    return bool(code & 1), bool(code & 2)


def train_step(engines: Engines, y_s: torch.Tensor, x_t: torch.Tensor, loss_cfg, dist,
               adapt: float = 1.0, stop: bool = False) -> StepResult:
    """y_s (B, 2S, 2h, 2w) source HR, x_t (B, S, h, w) target LR, float32 on any device;
    `adapt`: the adaptation weights' warm-up factor (`losses.adapt_scale`); `stop`: this rank's
    preemption request, agreed on with the other ranks in the step's flag all-reduce."""
    g, d = engines.g, engines.d
    # float32 on the device: each network casts its input to its weights' dtype, the physics
    # degradation and the image skip stay float32 (models/layers.py `as_weights`)
    y_s = y_s.to(g.device, torch.float32, non_blocking=True)
    x_t = x_t.to(g.device, torch.float32, non_blocking=True)
    out = g(y_s, x_t, **forward_args(loss_cfg))
    with frozen(d.module):
        g_loss, g_terms = generator_loss(out, y_s, x_t, d.module, loss_cfg, adapt)
    d_loss, d_terms = discriminator_loss(out, y_s, x_t, d.module, loss_cfg)
    terms = {**{f"g.{k}": v.detach() for k, v in g_terms.items()},
             **{f"d.{k}": v.detach() for k, v in d_terms.items()}}
    nonfinite = ~(torch.isfinite(g_loss.detach()) & torch.isfinite(d_loss.detach()))
    skip, stop = step_flags(nonfinite, stop, dist)
    if skip:
        return StepResult(skipped=True, terms=terms, stop=stop)
    g.backward(g_loss)
    g.step()
    engines.g_updated()
    d.backward(d_loss)
    d.step()
    return StepResult(skipped=False, terms=terms, stop=stop)


@torch.no_grad()
def validate(engines: Engines, volumes: list[str | os.PathLike], cfg, dist) -> dict[str, float]:
    """Mean PSNR / SSIM of whole val volumes and in their head (psnr_head, ssim_head), over those
    with HR (NaN without any), and the LR-consistency PSNR (over all, LR-only volumes included):
    the generator's SR path through the `Inferer` of `cfg.infer`, scored by the `Evaluator` of
    `udean evaluate` (the loss's SSIM window), the volumes split across ranks and the scores
    gathered on every rank. Tiles and scores on the training device."""
    gen = engines.generator
    was_training = gen.training
    gen.eval()
    inferer = Inferer.from_config(cfg.infer, cfg.data.patches, engines.g.device)

    def sr(tiles: torch.Tensor) -> torch.Tensor:  # float32 tiles; the networks cast them (as in training)
        return gen.sr(tiles)

    (res,) = Evaluator({"sr": lambda v: inferer(v.lr, sr)}, window=cfg.loss.ssim_window,
                       device=engines.g.device).run(volumes, dist)
    gen.train(was_training)
    return {**{k: res.mean(k) for k in ("psnr", "ssim", "psnr_head", "ssim_head", "lr_psnr")},
            "volumes": float(len(res.subjects)), "hr_volumes": float(sum("psnr" in s for s in res.subjects))}
