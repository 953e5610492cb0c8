"""Image quality metrics: the ONE SSIM and PSNR used by the training loss (Eq. 2), validation and
evaluation, so loss and reported numbers cannot disagree.

SSIM (Wang et al., IEEE TIP 2004): 2D Gaussian window (`window` x `window`, sigma 1.5),
K1 = 0.01, K2 = 0.03, computed per 2D slice over the 'valid' part of the image (no padding, as
Wang's reference MATLAB code), then averaged over the slice's map. 2D per slice because a thin
slab holds only 3 (LR) or 6 (HR) slices, too few for a 3D window, and because the paper's
metric (Matlab `ssim` on slices) is 2D. Always computed in float32, even under autocast:
the C1 = 1e-4 constant and the variance differences underflow in bf16/fp16.

Inputs are torch tensors (numpy arrays are accepted and converted with `torch.as_tensor`).
"""
from __future__ import annotations

import torch

SIGMA = 1.5
K1, K2 = 0.01, 0.03


def gaussian_window(window: int, sigma: float = SIGMA, device=None) -> torch.Tensor:
    """Normalized 1D Gaussian, shape (window,), float32."""
    x = torch.arange(window, dtype=torch.float32, device=device) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of the last two axes: (..., H, W) -> (..., H-w+1, W-w+1).

    Written as `w` shifted multiply-adds per axis, never a convolution: on a GPU, float32
    convolutions run on TF32 tensor cores by default (inputs rounded to 10 mantissa bits), and
    SSIM's variance E[x^2] - mu^2 then loses the precision the constant C2 = 9e-4 needs in flat
    regions. Element-wise float32 arithmetic is the same on every device (and, for these
    1-channel images, faster than cuDNN's convolutions)."""
    w = g.numel()
    h = x.shape[-2] - w + 1
    x = sum(g[k] * x[..., k:k + h, :] for k in range(w))
    n = x.shape[-1] - w + 1
    return sum(g[k] * x[..., k:k + n] for k in range(w))


def ssim(x, y, window: int = 7, data_range: float = 1.0, reduction: str = "mean",
         slice_axis: int | None = None) -> torch.Tensor:
    """Mean SSIM of 2D slices.

    x, y: (..., H, W); every leading index is one 2D slice: (B, C, H, W) with C slab slices, or a
    whole volume (D, H, W) as a stack of D slices. `slice_axis` first moves that axis next to the
    slice plane (a volume (X, Y, Z) with slice_axis=0 gives slices x[i, :, :]; with slice_axis=2
    slices x[:, :, k]).
    reduction: "mean" -> scalar, the mean over all slices; "none" -> per-slice SSIM with the
    leading shape (e.g. (B, C)); "map" -> the SSIM map, (..., H - window + 1, W - window + 1),
    entry (i, j) the window centred on pixel (i + window // 2, j + window // 2) (a region's score).
    Differentiable; float32 whatever the input dtype or autocast state.
    """
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.shape != y.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() < 2:
        raise ValueError(f"ssim: need at least (H, W), got shape {tuple(x.shape)}")
    if slice_axis is not None:
        x, y = x.movedim(slice_axis, -3), y.movedim(slice_axis, -3)
    h, w = x.shape[-2:]
    if window % 2 == 0 or window > min(h, w):
        raise ValueError(f"ssim: window {window} must be odd and fit in the {h}x{w} slice")
    if reduction not in ("mean", "none", "map"):
        raise ValueError(f"ssim: reduction must be 'mean', 'none' or 'map', got {reduction!r}")
    lead = x.shape[:-2]
    with torch.autocast(device_type=x.device.type, enabled=False):
        a = x.reshape(-1, h, w).float()
        b = y.reshape(-1, h, w).float()
        g = gaussian_window(window, device=a.device)
        c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
        # the five local statistics in one filter pass: E[a], E[b], E[a^2], E[b^2], E[ab]
        mu_a, mu_b, e_aa, e_bb, e_ab = _filter(torch.stack((a, b, a * a, b * b, a * b)), g)
        s_aa = e_aa - mu_a**2
        s_bb = e_bb - mu_b**2
        s_ab = e_ab - mu_a * mu_b
        smap = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (s_aa + s_bb + c2))
        if reduction == "map":
            return smap.reshape(*lead, *smap.shape[-2:])
        per_slice = smap.mean(dim=(1, 2)).reshape(lead)
    return per_slice.mean() if reduction == "mean" else per_slice


def psnr(x, y, data_range: float = 1.0, per_sample: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio 10 log10(L^2 / MSE), in dB, float32 (float64 for float64 input).

    per_sample=False: one MSE over all elements (a whole volume's PSNR); True: one PSNR per index
    of dim 0, shape (B,). Identical inputs give +inf.
    """
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if data_range <= 0:
        raise ValueError(f"psnr: data_range must be > 0, got {data_range}")
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = (x.to(dt) - y.to(dt)) ** 2
    mse = d.flatten(1).mean(1) if per_sample else d.mean()
    return 10 * torch.log10(data_range**2 / mse)
