"""Fidelity of the learned degradation during training (issue 19): is X_{s~t} becoming the
target's degradation of Y_s?

Three measurements, each a function of image batches (LR (B, S, H, W) in [0, 1]):

- `noise_sigma` (and `noise_level`, its differentiable twin for `loss.lambda_noise`): the noise level of an LR batch, robustly: the finest in-plane Haar diagonal
  band d = (x00 - x01 - x10 + x11) / 2 (white Gaussian noise of std sigma gives d of std sigma;
  smooth anatomy gives d ~ 0), median |d| / 0.6745 per patch (the MAD estimator of Donoho and
  Johnstone), the median over patches. Compared between X_{s~t} and X_t.
- `radial_profile` / `profile_distance`: the in-plane k-space energy of a batch by radial
  frequency (Hann window, patch mean removed, mean power per ring, log10), and the mean absolute
  difference of two such profiles (decades). Blur lowers the outer rings, noise lifts them:
  X_{s~t} should approach X_t's profile.
- `psnr_truth`: PSNR of the noise-free X_{s~t} against the true noise-free degradation of the
  same Y_s, when the data carry it (synthetic degradations with `data.degradation.truth`: the
  source shards' `truth` dataset). +inf for the true operator.

`Probe` holds fixed patches (evenly spaced over the source and target pools) and measures the
generator on them every `train.fidelity_every` steps (`udean.train`), without touching the
training RNG; `images` gives the image summaries (Y_s, X_{s~t}, X_t, SR of X_t) every
`train.image_every` steps. Own data (no truth) get the target-side statistics alone.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from udean.metrics import psnr

MAD = 0.6745  # median |N(0, 1)|
LOW_HALF = 4 * (1 - math.exp(-MAD ** 2 / 2)) / math.sqrt(2 * math.pi)  # E |N(0,1)| over its smaller half: 0.3247


def haar_diagonal(x: torch.Tensor) -> torch.Tensor:
    """The finest in-plane Haar diagonal band (x00 - x01 - x10 + x11) / 2 of a batch (any leading
    shape, last two the image plane; an odd row / column dropped), float32: std sigma for white
    noise of std sigma, about 0 on smooth anatomy."""
    x = torch.as_tensor(x).float()
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :h, :w]
    return (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2


def noise_sigma(x: torch.Tensor) -> float:
    """Robust noise std of a batch (B, S, H, W): median |d| / 0.6745 per patch (`haar_diagonal`),
    the median over patches (for the logs)."""
    d = haar_diagonal(x)
    per_patch = d.reshape(d.shape[0], -1).abs().median(dim=1).values / MAD
    return float(per_patch.median())


def noise_level(x: torch.Tensor) -> torch.Tensor:
    """A differentiable robust noise std of a batch (`loss.lambda_noise`): the mean of the smaller
    half of |d| over the whole batch, divided by its value for unit white Gaussian noise (0.3247),
    so that edges (the large |d|) do not count and every voxel of the smaller half carries a
    gradient (a median passes it to one voxel). A 0-d tensor."""
    return _low_half(haar_diagonal(x).abs().flatten())


def noise_levels(x: torch.Tensor) -> torch.Tensor:
    """`noise_level` of each patch of a batch (B, ...): (B,)."""
    return _low_half(haar_diagonal(x).abs().flatten(1))


def _low_half(d: torch.Tensor) -> torch.Tensor:
    """The mean of the smaller half of |d| along its last axis, over LOW_HALF."""
    return torch.topk(d, max(1, d.shape[-1] // 2), dim=-1, largest=False, sorted=False).values.mean(-1) / LOW_HALF


def radial_profile(x: torch.Tensor, bins: int | None = None) -> torch.Tensor:
    """log10 of the mean in-plane power per radial frequency ring of a batch (B, S, H, W):
    (bins,), rings of equal width over 0 < |nu| <= 1/2 cycles per voxel (DC excluded); default
    min(H, W) // 2 rings."""
    x = torch.as_tensor(x).float()
    h, w = x.shape[-2:]
    bins = bins or min(h, w) // 2
    win = torch.hann_window(h, periodic=False)[:, None] * torch.hann_window(w, periodic=False)[None, :]
    p = torch.fft.fft2((x - x.mean(dim=(-1, -2), keepdim=True)) * win).abs() ** 2
    p = p.reshape(-1, h, w).mean(0)
    r = torch.sqrt(torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w)[None, :] ** 2)
    ring = torch.ceil(r / 0.5 * bins).long() - 1  # DC -> -1; |nu| in ((i)/2bins, (i+1)/2bins] -> i
    keep = (ring >= 0) & (ring < bins)
    total = torch.zeros(bins).index_add_(0, ring[keep], p[keep])
    count = torch.zeros(bins).index_add_(0, ring[keep], torch.ones_like(p[keep]))
    return torch.log10(total / count.clamp(min=1) + 1e-12)


def profile_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean |log10 P_a - log10 P_b| over the radial rings of two batches of the same patch size."""
    return float((radial_profile(a) - radial_profile(b)).abs().mean())


def psnr_truth(x_clean: torch.Tensor, truth: torch.Tensor) -> float:
    """PSNR (dB, data range 1) of the noise-free X_{s~t} against the true noise-free degradation."""
    return float(psnr(torch.as_tensor(x_clean).float(), torch.as_tensor(truth).float(), data_range=1.0))


def _crop(t: torch.Tensor, margin: Sequence[int]) -> torch.Tensor:
    m0, m1 = margin
    return t[..., m0:t.shape[-3] - m0, m1:t.shape[-2] - m1, m1:t.shape[-1] - m1]


def _spread(n: int, k: int) -> list[int]:
    """k indices evenly spaced over 0..n-1 (all of them if k >= n)."""
    return sorted({int(i) for i in np.linspace(0, n - 1, min(n, k)).round()})


class Probe:
    """Fixed probe patches and the measurements on them.

    y_s: (N, 2S', 2H', 2W') source HR, with the model's `source_margin` (LR voxels) of context
    when it has one; x_t: (M, S, H, W) target LR; truth: (N, S, H, W) noise-free true
    degradations of y_s's centres, or None."""

    def __init__(self, y_s: torch.Tensor, x_t: torch.Tensor, truth: torch.Tensor | None = None,
                 margin: Sequence[int] = (0, 0), seed: int = 0):
        self.y_s, self.x_t, self.truth = y_s.float(), x_t.float(), None if truth is None else truth.float()
        self.margin, self.seed = tuple(margin), seed

    @classmethod
    def from_shards(cls, source, target, n: int = 32, margin: Sequence[int] = (0, 0), seed: int = 0) -> "Probe":
        """`source`, `target`: udean.data.shards.PatchShards; n patches of each, evenly spaced.
        The truth is read when every probed source shard carries it (only those are opened)."""
        import h5py

        from preprocessing.shards import read_patches

        si, ti = _spread(len(source), n), _spread(len(target), n)
        y = torch.from_numpy(np.stack([source[i] for i in si]))
        x = torch.from_numpy(np.stack([target[i] for i in ti]))
        truth = None
        def has_truth(path) -> bool:
            with h5py.File(path, "r") as f:
                return "truth" in f

        shard = [int(np.searchsorted(source.offsets, i, side="right") - 1) for i in si]
        if all(has_truth(source.paths[k]) for k in sorted(set(shard))):
            truth = torch.from_numpy(np.stack([read_patches(source.paths[k], [int(i - source.offsets[k])], name="truth")[0]
                                               for i, k in zip(si, shard)]))
        return cls(y, x, truth, margin, seed)

    @torch.no_grad()
    def _run(self, gen, dtype, fn):
        """fn(device) under eval mode and a forked RNG (seeded: the same noise every time), so
        measuring never changes what training draws."""
        device = next(gen.parameters()).device
        was = gen.training
        gen.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            try:
                return fn(device)
            finally:
                gen.train(was)

    def _degrade(self, gen, device, dtype, noise: bool) -> torch.Tensor:
        x = gen.degrade(self.y_s.to(device, dtype), noise=noise).float().cpu()
        return _crop(x, self.margin) if any(self.margin) else x

    def measure(self, gen, dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """{noise_st, noise_t, noise_spread_st, noise_spread_t, profile_distance, psnr_truth (with
        truth)} of the generator's degradation (`Generator.degrade`) on the probe patches;
        noise_spread_*: the std of the patches' log noise levels (`noise_levels`): large where the
        scans' noise differs (level mixed; clinical scans from several scanners)."""
        def fn(device):
            x_st = self._degrade(gen, device, dtype, noise=True)
            spread = lambda x: float(torch.log(noise_levels(x)).std()) if len(x) > 1 else 0.0  # noqa: E731
            out = {"noise_st": noise_sigma(x_st), "noise_t": noise_sigma(self.x_t),
                   "noise_spread_st": spread(x_st), "noise_spread_t": spread(self.x_t),
                   "profile_distance": profile_distance(x_st, self.x_t)}
            if self.truth is not None:
                out["psnr_truth"] = psnr_truth(self._degrade(gen, device, dtype, noise=False), self.truth)
            return {k: v if math.isfinite(v) else 1e9 for k, v in out.items()}  # +inf: JSON has none
        return self._run(gen, dtype, fn)

    def images(self, gen, dtype: torch.dtype = torch.float32) -> dict[str, np.ndarray]:
        """The middle slice of the first probe patch of each: Y_s, X_{s~t}, X_t and SR(X_t),
        (h, w) float32 arrays in [0, 1] (HR ones at twice the size)."""
        def fn(device):
            m0, m1 = self.margin
            y = self.y_s[:1]
            y_c = y[..., 2 * m0:y.shape[-3] - 2 * m0, 2 * m1:y.shape[-2] - 2 * m1, 2 * m1:y.shape[-1] - 2 * m1]
            x_st = self._degrade(gen, device, dtype, noise=True)[:1]
            sr = gen.sr(self.x_t[:1].to(device, dtype)).float().cpu()
            mid = lambda t: t[0, t.shape[1] // 2].clamp(0, 1).numpy()  # noqa: E731
            return {"y_s": mid(y_c), "x_st": mid(x_st), "x_t": mid(self.x_t[:1]), "sr_x_t": mid(sr)}
        return self._run(gen, dtype, fn)
