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

Validation and what chooses best/ (`criterion`, `train.best_by`). Val PSNR against HR measures
the model only where the val LR carries the target's degradation: HCP and the synthetic cohort
(val LR made by the target's own data.degradation) and paired own scans. Own data without pairs
holds out HR scans with synthetic LR (k-space truncation), a degradation the model adapts *away*
from by design: its PSNR falls as training works (issue 27: 27.14 -> 25.70 dB over 400 steps,
best/ stuck at step 40). There best/ is chosen by `learned`: the held-out HR degraded by the
model's own learned degradation of that step (X_{s~t}, noise drawn from a fixed seed in a forked
RNG), super-resolved and scored against the HR, with the previous best's SR network rescored on
that same LR, so a step never wins only because the degradation it is scored on changed. Without
any val HR, no score measures the SR: best/ = last/ (`last`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.nn.utils import parametrize

from udean.engines import Engines, frozen
from udean.evaluate import Evaluator
from udean.infer import Inferer, tile_starts
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
    # spectral normalization (model.spectral_norm): one power iteration per discriminator conv per
    # update, Miyato et al.'s Algorithm 1; uncached, each call of a discriminator ran one (~14 ops
    # per conv and call, 5 calls in each step's half)
    with frozen(d.module), parametrize.cached():
        g_loss, g_terms = generator_loss(out, y_s, x_t, d.module, loss_cfg, adapt)
    with parametrize.cached():
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


# what each criterion is, for the logs, best.json and the run's last line
CRITERIA = {
    "psnr": "val PSNR against HR, on val volumes whose LR has the target's degradation",
    "learned": "held-out HR degraded by the model's own learned degradation, the previous best rescored on that LR",
    "last": "no val volume with HR measures the target's degradation: best/ = last/",
}
SCORE_OF = {"psnr": "psnr", "learned": "learned_psnr"}  # the validate() key each criterion compares


def criterion(setting: str, manifest, volumes: Sequence[str], root: Path | None = None) -> tuple[str, list[str]]:
    """(the criterion that chooses best/ under `train.best_by` = `setting`, the val volumes
    (`volumes`: paths of manifest's, under `root`: the data folder or its staged copy, default
    the manifest's folder) it degrades itself: `learned`'s held-out HR). A val LR
    has the target's degradation when it is of the same kind as the target's: acquired for own
    data, synthetic (the same data.degradation) otherwise. ValueError when `setting` asks for a
    score that no val volume can give."""
    target = "acquired" if manifest.config.get("own") else "synthetic"
    subject = {str((root or manifest.out) / s.path): s.subject for s in manifest.shards if s.kind == "volume"}
    rows = {r.id: r for r in manifest.subjects}
    with_hr = [p for p in volumes if rows[subject[str(p)]].group != "target"]  # target rows: LR-only volumes
    honest = [p for p in with_hr if (rows[subject[str(p)]].lr_source or "synthetic") == target]
    chosen = setting if setting != "auto" else "psnr" if honest else "learned" if with_hr else "last"
    if chosen in ("psnr", "learned") and not with_hr:
        raise ValueError(f"train.best_by={setting}: no val volume has an HR scan to score against (set "
                         "train.best_by=auto or last)")
    return chosen, (with_hr if chosen == "learned" else [])


@torch.no_grad()
def learned_lr(gen, hr: np.ndarray, slab: int, dtype: torch.dtype, seed: int) -> np.ndarray:
    """HR (D, H, W) in [0, 1], stored layout -> (D // 2, H // 2, W // 2) float32 in [0, 1]: the
    generator's learned degradation X_{s~t} of it, with its noise drawn from `seed` in a forked
    RNG (validation never moves the training streams). The physics degradation takes the whole
    volume; a decoder takes thin slabs of 2 `slab` HR slices, as it was trained."""
    device = next(gen.parameters()).device
    d, h, w = (n // 2 * 2 for n in hr.shape)
    y = torch.as_tensor(np.ascontiguousarray(hr[:d, :h, :w], dtype=np.float32), device=device)[None].to(dtype)
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.manual_seed(seed)
        if gen.blur is not None:
            x = gen.degrade(y)
        else:
            x = torch.empty((1, d // 2, h // 2, w // 2), dtype=y.dtype, device=device)
            for s in tile_starts(d // 2, slab, slab):
                x[:, s:s + slab] = gen.degrade(y[:, 2 * s:2 * (s + slab)])
    return x[0].float().clamp_(0, 1).cpu().numpy()


class _Degraded(Sequence):
    """Val volume files whose LR is replaced by `lr_of(volume)` as they are read (on the rank that
    scores them)."""

    def __init__(self, paths: Sequence[str | os.PathLike], lr_of):
        self.paths, self.lr_of = list(paths), lr_of

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):
        from preprocessing.shards import read_volume

        v = read_volume(self.paths[i])
        return dataclasses.replace(v, lr=self.lr_of(v), lr_source="learned")


@torch.no_grad()
def validate(engines: Engines, volumes: list[str | os.PathLike], cfg, dist, learned: Sequence[str | os.PathLike] = (),
             incumbent: torch.nn.Module | None = None) -> dict[str, float]:
    """Mean PSNR / SSIM of whole val volumes and in their head (psnr_head, ssim_head), over those
    with HR (NaN without any), and the LR-consistency PSNR (over all, LR-only volumes included):
    the generator's SR path through the `Inferer` of `cfg.infer`, scored by the `Evaluator` of
    `udean evaluate` (the loss's SSIM window), the volumes split across ranks and the scores
    gathered on every rank. Tiles and scores on the training device. Counts: `volumes`, `hr_volumes`.

    `learned` (criterion `learned`): these volumes' HR degraded by the generator's learned
    degradation (`learned_lr`), scored the same way: learned_psnr, learned_ssim, learned_psnr_head;
    `incumbent` (the best SR network so far) on the same LR: best_learned_psnr."""
    gen = engines.generator
    was_training = gen.training
    gen.eval()
    inferer = Inferer.from_config(cfg.infer, cfg.data.patches, engines.g.device)

    def sr(tiles: torch.Tensor) -> torch.Tensor:  # float32 tiles; the networks cast them (as in training)
        return gen.sr(tiles)

    device = engines.g.device
    (res,) = Evaluator({"sr": lambda v: inferer(v.lr, sr)}, window=cfg.loss.ssim_window, device=device).run(volumes, dist)
    out = {**{k: res.mean(k) for k in ("psnr", "ssim", "psnr_head", "ssim_head", "lr_psnr")},
           "volumes": len(res.subjects), "hr_volumes": sum("psnr" in s for s in res.subjects)}
    if learned:
        methods = {"sr": lambda v: inferer(v.lr, sr)}
        if incumbent is not None:
            methods["best"] = lambda v: inferer(v.lr, incumbent)  # the networks cast their input (as in training)
        lr_of = lambda v: learned_lr(gen, v.hr, cfg.data.patches.slab, engines.dtype, cfg.train.seed)  # noqa: E731
        got = Evaluator(methods, window=cfg.loss.ssim_window, device=device).run(_Degraded(learned, lr_of), dist)
        out.update({f"learned_{k}": got[0].mean(k) for k in ("psnr", "ssim", "psnr_head")})
        if incumbent is not None:
            out["best_learned_psnr"] = got[1].mean("psnr")
    gen.train(was_training)
    return out
