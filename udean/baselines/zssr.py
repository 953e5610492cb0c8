"""ZSSR: "zero-shot" super-resolution by internal learning on the test volume itself.

Paper: Shocher, Cohen, Irani, "Zero-Shot Super-Resolution using Deep Internal Learning",
CVPR 2018 (UDEAN's [9], Table II).

For every test LR volume: downscale it once more (LR -> "LLR"), train a fresh SR network on
(LLR crop, LR crop) pairs cut from that one volume, then super-resolve the LR volume with it.
The learnt degradation is LR -> LLR, not the unknown HR -> LR: the degradation shift UDEAN's
paper blames for ZSSR's blur.

Departures from the original:
- network: UDEAN's SR path (`supervised.sr_network`, thin slabs x2 along every axis) instead of
  ZSSR's 8-layer 2D residual CNN; loss L1 + alpha * SSIM instead of L1 alone.
- downscaling kernel: Gaussian prefilter (sigma `sigma` LR voxels) + decimation by 2 on every
  axis, keeping the suite's geometry (LLR voxel j at LR voxel 2j), instead of MATLAB bicubic.
- crops: a regular lattice of thin-slab crops, drawn uniformly, with the 8 in-plane flips and
  rotations; the original samples crops by gradient magnitude, also augments by scale, and
  averages a geometric self-ensemble at test time (not done here).
- schedule: the suite's budget (Adam, cosine LR, `Budget.steps` per test volume), not ZSSR's
  adaptive learning-rate policy; so ZSSR spends steps x test volumes in all.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from preprocessing import patches as patching
from preprocessing.shards import VolumePair
from udean.baselines.loop import Budget
from udean.baselines.supervised import SupervisedTSRCAN
from udean.infer import Inferer


def downscale(lr: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """(D, H, W) -> (D/2, H/2, W/2): Gaussian prefilter then every second voxel (LLR j = LR 2j)."""
    d = np.asarray(lr, dtype=np.float32)
    d = d[tuple(slice(0, (n // 2) * 2) for n in d.shape)]
    return np.ascontiguousarray(ndimage.gaussian_filter(d, sigma, mode="nearest")[::2, ::2, ::2])


def internal_pairs(lr: np.ndarray, slab: int, patch: tuple[int, int], sigma: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(D, H, W) LR volume, slices first -> (LLR crops (N, S, h, w), LR crops (N, 2S, 2h, 2w)),
    h, w = `patch` or the LLR's size where that is smaller."""
    llr = downscale(lr, sigma)
    if llr.shape[0] < slab or min(llr.shape[1:]) < 4:
        raise ValueError(f"ZSSR: LR volume {lr.shape} is too small for {slab}-slice crops of its x2 downscale")
    size = (slab, min(patch[0], llr.shape[1]), min(patch[1], llr.shape[2]))
    origins = patching.lattice(llr.shape, size, (1, max(1, size[1] // 4), max(1, size[2] // 4)))
    x = patching.extract(llr, origins, size)
    y = patching.extract(lr, origins * 2, tuple(2 * s for s in size))
    return x, y


class ZSSR:
    """Per-volume internal learning, an evaluator method: `zssr(volume)` trains a fresh network
    (same seeded initialisation) on the volume's LR alone (`fit_volume`), then super-resolves it
    with `inferer`, the suite's sliding window. LR (B, S, H, W) -> SR (B, 2S, 2H, 2W)."""

    def __init__(self, model_cfg, budget: Budget, inferer: Inferer, alpha: float = 0.5, window: int = 7,
                 sigma: float = 1.0):
        self.model_cfg, self.budget, self.inferer = model_cfg, budget, inferer
        self.slab, self.patch = inferer.slab, inferer.patch
        self.alpha, self.window, self.sigma = alpha, window, sigma
        self.net: SupervisedTSRCAN | None = None
        self.histories: list[list[dict[str, float]]] = []

    def fit_volume(self, lr: np.ndarray, progress: Callable[[int, dict], None] | None = None) -> SupervisedTSRCAN:
        """Train on one LR volume (D, H, W), slices first; returns the trained network."""
        x, y = internal_pairs(lr, self.slab, self.patch, self.sigma)
        torch.manual_seed(self.budget.seed)
        self.net = SupervisedTSRCAN(self.model_cfg, self.slab, self.alpha, self.window)
        self.net.window = min(self.window, 2 * min(x.shape[-2:]) - 1)  # the SSIM window must fit the crop
        self.histories.append(self.net.fit(x, y, self.budget, augment=True, progress=progress))
        return self.net

    def __call__(self, vol: VolumePair) -> np.ndarray:
        """SR of `vol` (stored layout, its HR grid): internal training, then the sliding window."""
        return self.inferer(vol.lr, self.fit_volume(vol.lr))
