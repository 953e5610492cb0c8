"""Denoise + tricubic: what a careful user does without deep learning (issue 19's baseline).

Non-local means (Buades, Coll, Morel, CVPR 2005; scikit-image `denoise_nl_means`: patch 3,
search distance 4, fast mode, in 3D) on the LR volume, then `udean.evaluate.tricubic`. The
strength is h = k * sigma_hat, sigma_hat the LR volume's noise by the suite's one robust estimator
(`udean.fidelity.noise_sigma`: MAD of the finest Haar band, median over slices), with k chosen on the val volumes by PSNR in the head (`choose_strength`;
k = 0 is plain tricubic, so the row is never below tricubic on val).

Rician-biased data: NLM assumes additive Gaussian noise, while magnitude MR noise is Rician,
biased upward where the signal is low (the background keeps its noise floor, dark tissue is
lifted). scikit-image has no Rician correction (DIPY's `nlmeans(rician=True)` has one, a heavier
dependency); the tables say so next to the row.

Needs scikit-image: `pip install -e ".[bench]"` (install.sh installs it).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from preprocessing.shards import VolumePair

STRENGTHS = (0.0, 0.4, 0.6, 0.8, 1.0, 1.3, 1.6)  # k in h = k * sigma_hat
NOTE = "NLM assumes Gaussian noise; the data are Rician (magnitude), so dark regions stay biased"


def _skimage():
    try:
        from skimage.restoration import denoise_nl_means
    except ImportError:
        raise ImportError("denoise + tricubic needs scikit-image: pip install -e '.[bench]'") from None
    return denoise_nl_means


def nlm(lr: np.ndarray, k: float) -> np.ndarray:
    """Non-local means of an LR volume (D, H, W) in [0, 1] at strength k (0: unchanged), float32."""
    if k == 0:
        return np.asarray(lr, dtype=np.float32)
    import torch

    from udean.fidelity import noise_sigma

    denoise_nl_means = _skimage()
    sigma = noise_sigma(torch.as_tensor(np.asarray(lr, dtype=np.float32)))
    return denoise_nl_means(lr, patch_size=3, patch_distance=4, h=k * sigma, sigma=sigma,
                            fast_mode=True).astype(np.float32)


def denoise_tricubic(k: float) -> Callable[[VolumePair], np.ndarray]:
    """The evaluator method: volume -> tricubic(nlm(LR, k)) on its HR grid."""
    from udean.evaluate import tricubic

    return lambda v: tricubic(nlm(v.lr, k), v.hr.shape)


def choose_strength(val: Sequence[VolumePair], window: int = 7,
                    strengths: Sequence[float] = STRENGTHS) -> tuple[float, dict[str, float]]:
    """k of `strengths` with the best mean head PSNR on the val volumes, and every k's score."""
    from udean.evaluate import Evaluator

    if not val:
        raise ValueError("denoise + tricubic chooses its strength on val volumes: there are none")
    results = Evaluator({str(k): denoise_tricubic(k) for k in strengths}, window=window).run(list(val))
    scores = {r.name: r.mean("psnr_head") for r in results}
    best = max(strengths, key=lambda k: scores[str(k)])
    return float(best), scores
