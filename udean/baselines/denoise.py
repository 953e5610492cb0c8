"""Denoise + tricubic: what a careful user does without deep learning (issues 19 and 30).

Rician-aware non-local means on the LR volume, then `udean.evaluate.tricubic`: DIPY's `nlmeans`
(Wiest-Daesslé et al., MICCAI 2007 and Descoteaux et al., MICCAI 2008: NLM with the Rician bias
removed, sqrt(max(NLM(x^2) - 2 sigma^2, 0)); `method="classic"`, its voxelwise implementation,
patch radius 1, search radius 5, DIPY's defaults) with sigma = k * sigma_hat, sigma_hat DIPY's
own noise estimate of the LR volume (`estimate_sigma`, N=1: one receive channel's magnitude,
Koay's correction to the Gaussian sigma that the Rician model wants). k is chosen on the val
volumes by PSNR in the head (`choose_strength`; k = 0 is plain tricubic, so the row is never
below tricubic on val). Without a paired val volume (own data whose HR and LR are different
scans: benchmarks/shift.py's mismatch case) there is nothing to choose on: k = 1, DIPY's estimate
as it is (`DEFAULT_STRENGTH`), and the info says so.

Why "classic": DIPY 1.12 made its blockwise variant the default; on the suite's LR (partial
Fourier + noise sigma 0.01, a 96x96x80 phantom) it took the head PSNR against the noise-free LR
from 40.0 dB (the noisy input) to 27.3 dB at the true sigma, blurring edges away, where classic
gave 39.8 (docs/shift.md, "Denoise + tricubic").

Needs DIPY: `pip install -e ".[bench]"` (install.sh installs it).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from preprocessing.shards import VolumePair

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)  # k in sigma = k * sigma_hat
DEFAULT_STRENGTH = 1.0  # no paired val volume: DIPY's noise estimate as it is
NOTE = "DIPY nlmeans (classic, Rician bias removed), sigma = k x DIPY's estimate_sigma (N=1)"


def dipy_api():
    """DIPY's nlmeans and estimate_sigma, or one ImportError saying how to install it."""
    try:
        from dipy.denoise.nlmeans import nlmeans
        from dipy.denoise.noise_estimate import estimate_sigma
    except ImportError:
        raise ImportError("denoise + tricubic needs DIPY: pip install -e '.[bench]'") from None
    return nlmeans, estimate_sigma


def dipy_sigma(lr: np.ndarray) -> float:
    """DIPY's estimate of the Gaussian sigma under the LR volume's Rician noise (one channel)."""
    _, estimate_sigma = dipy_api()
    return float(np.asarray(estimate_sigma(np.asarray(lr, dtype=np.float32), N=1)).ravel()[0])


def nlm(lr: np.ndarray, k: float) -> np.ndarray:
    """Rician non-local means of an LR volume (D, H, W) in [0, 1] at strength k (0: unchanged),
    float32, one thread (the benchmarks run one process per core)."""
    lr = np.asarray(lr, dtype=np.float32)
    if k == 0:
        return lr
    nlmeans, _ = dipy_api()
    sigma = k * dipy_sigma(lr)
    if not sigma > 0:  # a noise-free LR (level truncation of a noise-free scan): nothing to remove
        return lr
    return nlmeans(lr, sigma, rician=True, method="classic", num_threads=1).astype(np.float32)


def denoise_tricubic(k: float) -> Callable[[VolumePair], np.ndarray]:
    """The evaluator method: volume -> tricubic(nlm(LR, k)) on its HR grid."""
    from udean.evaluate import hr_grid_shape, tricubic

    return lambda v: tricubic(nlm(v.lr, k), hr_grid_shape(v))


def choose_strength(val: Sequence[VolumePair], window: int = 7,
                    strengths: Sequence[float] = STRENGTHS) -> tuple[float, dict[str, float]]:
    """k of `strengths` with the best mean head PSNR on the val volumes that have an HR, and
    every k's score; ({}: no such volume) DEFAULT_STRENGTH."""
    from udean.evaluate import Evaluator

    paired = [v for v in val if v.hr is not None]
    if not paired:
        return DEFAULT_STRENGTH, {}
    results = Evaluator({str(k): denoise_tricubic(k) for k in strengths}, window=window).run(paired)
    scores = {r.name: r.mean("psnr_head") for r in results}
    best = max(strengths, key=lambda k: scores[str(k)])
    return float(best), scores
