"""Acquisition-shaped pieces of the degradation network (ours, not the paper's; off by default).

The paper's degradation mapping is free-form: X_{s~t} = lr_decoder(down_extractor(Y_s)). An MRI
acquisition is, to first order, a linear shift-invariant blur of the band-limited image (the
k-space weighting: truncation, partial Fourier, elliptical sampling, k-space filters, the slice
profile) followed by complex Gaussian noise, whose magnitude is Rician. Two modules model that:

- `RicianNoise` (`model.degradation_noise`): X -> |X + sigma (n1 + i n2)|, n1, n2 ~ N(0, 1) drawn
  every call, sigma learned. A deterministic decoder cannot draw noise: to match a noisy target it
  must hide a content-dependent texture in X_{s~t}, which the SR network then learns to read
  (CycleGAN steganography) and which real LR never has. `sigma_spread` > 0 also learns a spread of
  log sigma across samples (targets from several scanners have several noise levels).
- `LearnedBlur` (`model.degradation: physics`): X_{s~t} = blur(downsample2(Y_s)): a learned
  in-plane k x k kernel and a slab-axis kernel on the LR grid after the fixed Lanczos decimation,
  each summing to 1 (the DC of the image is kept, as the k-space degradation keeps it). Every
  k-space weighting of the LR band is such a kernel (the real part of partial Fourier
  zero-filling included; its imaginary part is the one thing it does not represent), and a slice
  profile before truncation acts on the LR band as a slab-axis kernel. It has no content path,
  so it cannot encode HR detail.

Both start at the identity (kernel = delta, sigma = `sigma_init`), so a fresh model is the image
skip's Lanczos decimation (plus a little noise). Parameters are scaled by `GAIN` so that an Adam
step of the generator's learning rate (1e-3) moves log sigma and the kernel taps by 1e-2: the
degradation adapts in hundreds of steps instead of thousands.

Both are float32 islands (`keep_fp32`): their parameters are read through `fp32` and their
arithmetic runs in float32 whatever the engine's precision. In bf16 a kernel tap near 1 moves in
steps of 2^-7 = 0.0078 (an Adam step moves it by ~1e-3: it could not learn), the kernel summed
to 1.0038, and GAIN * log sigma moved in 2-4 % jumps of sigma.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

GAIN = 10.0


def fp32(p: torch.Tensor) -> torch.Tensor:
    """Parameter `p` as float32. A bf16 / fp16 engine keeps a rounded copy in `p` and its float32
    master in the optimizer; udean/engines.py attaches that master as `p.master`, and the value
    is the master's while the gradient goes to `p` (the master + an exact zero that carries it)."""
    master = getattr(p, "master", None)
    return p.float() if master is None else master + (p - p.detach()).float()


def magnitude(re: torch.Tensor, im: torch.Tensor | None) -> torch.Tensor:
    """|re + i im| (re alone when im is None); a floor far below any noise level keeps the
    gradient finite at 0."""
    return re if im is None else torch.sqrt(re ** 2 + im ** 2 + 1e-12)


class RicianNoise(nn.Module):
    """(B, S, H, W) real (and imaginary) part -> |re + sigma_b n1 + i (im + sigma_b n2)|,
    sigma_b = sigma * exp(spread * e_b), e_b ~ N(0, 1) per sample (spread learned only when
    `sigma_spread`). `noise=False` in `forward` returns the noise-free magnitude. float32 whatever
    the input's dtype (module docstring)."""

    keep_fp32 = True  # udean/engines.py keeps its parameters' float32 masters where `fp32` reads them

    def __init__(self, sigma_init: float = 0.002, sigma_spread: bool = False):
        super().__init__()
        # shape (1,), not (): DeepSpeed's broadcast views every parameter as bytes, which a 0-d one refuses
        self.log_sigma = nn.Parameter(torch.full((1,), math.log(sigma_init) / GAIN))
        # not 0: the gradient of |spread| vanishes there, and the spread never left it
        self.spread = nn.Parameter(torch.full((1,), 1e-3)) if sigma_spread else None

    def sigma(self) -> torch.Tensor:
        return torch.exp(GAIN * fp32(self.log_sigma))

    def forward(self, x: torch.Tensor, im: torch.Tensor | None = None, noise: bool = True) -> torch.Tensor:
        x, im = x.float(), None if im is None else im.float()
        if not noise:
            return magnitude(x, im)
        b = x.shape[0]
        s = self.sigma().reshape(()).expand(b)
        if self.spread is not None:
            s = s * torch.exp(GAIN * fp32(self.spread).abs() * torch.randn(b, device=x.device))
        s = s.view(b, *([1] * (x.dim() - 1)))
        n = torch.randn((2,) + tuple(x.shape), device=x.device, dtype=x.dtype)
        return magnitude(x + s * n[0], s * n[1] if im is None else im + s * n[1])


class LearnedBlur(nn.Module):
    """(B, S, H, W) LR -> (real part, imaginary part or None), same shape: a `slab_size`-tap
    kernel along the slab axis, then a `size` x `size` in-plane kernel. Each real kernel is
    delta + GAIN * (r - mean r) with r symmetrised (even in every axis), so it sums to 1 whatever
    r (a free 7x7 kernel driven by the LR adversary wandered, issue 19); edges replicated.

    `odd`: also an in-plane point-odd kernel (h(-u) = -h(u)) for the imaginary part. The PSF of
    any real k-space weighting is Hermitian (even real part, odd imaginary part); partial Fourier
    zero-filling has a large one, and its magnitude |even * x + i odd * x| is what the scanner
    returns. It starts at 1e-3 along each axis: at exactly 0 its gradient through |.| vanishes.
    float32 whatever the input's dtype (module docstring)."""

    keep_fp32 = True  # udean/engines.py keeps its parameters' float32 masters where `fp32` reads them

    def __init__(self, size: int = 7, slab_size: int = 3, odd: bool = False):
        super().__init__()
        if size % 2 == 0 or slab_size % 2 == 0:
            raise ValueError(f"blur kernel sizes must be odd, got {size}, {slab_size}")
        self.plane = nn.Parameter(torch.zeros(size, size))
        self.slab = nn.Parameter(torch.zeros(slab_size))
        self.odd = None
        if odd:
            c = size // 2
            r = torch.zeros(size, size)
            r[c + 1, c] = r[c, c + 1] = 1e-3 / GAIN
            self.odd = nn.Parameter(r)

    @staticmethod
    def _kernel(r: torch.Tensor) -> torch.Tensor:
        for d in range(r.dim()):  # even in every axis, as the real part of a k-space weighting's PSF
            r = 0.5 * (r + r.flip(d))
        # the centre tap, padded with zeros: made where r is (`delta[c] = 1.0` copied a CPU scalar
        # to the device every step)
        delta = F.pad(r.new_ones((1,) * r.dim()), [n // 2 for n in reversed(r.shape) for _ in (0, 1)])
        return delta + GAIN * (r - r.mean())

    def kernels(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(in-plane even (k, k), slab (k_s,), in-plane odd (k, k) or None) as applied (correlation), float32."""
        odd = None if self.odd is None else GAIN * 0.5 * (fp32(self.odd) - fp32(self.odd).flip(0).flip(1))
        return self._kernel(fp32(self.plane)), self._kernel(fp32(self.slab)), odd

    def responses(self, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """|H(k)| of the in-plane kernel (even + i odd) on an n x n grid and of the slab kernel on n points."""
        plane, slab, odd = self.kernels()
        return (torch.fft.fft2(plane if odd is None else torch.complex(plane, odd), s=(n, n)).abs(),
                torch.fft.fft(slab, n=n).abs())

    def excess(self, n: int = 32) -> torch.Tensor:
        """Mean over the frequency grid of relu(|H(k)| - 1)^2 (in-plane + slab): how much the blur
        amplifies any frequency. A k-space weighting never does (it keeps, attenuates or drops),
        so `loss.lambda_bound` penalises it: a scalar, 0 for any physical blur."""
        return sum((torch.relu(h - 1.0) ** 2).mean() for h in self.responses(n))

    def deficit(self, n: int = 32) -> torch.Tensor:
        """Mean over the frequency grid of relu(1 - |H(k)|)^2 (in-plane + slab): how much the blur
        attenuates, 0 for the identity (`loss.lambda_prior`: extra blur only where the data ask)."""
        return sum((torch.relu(1.0 - h) ** 2).mean() for h in self.responses(n))

    @staticmethod
    def _plane(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        b, s, h, w = x.shape
        p = k.shape[0] // 2
        y = F.conv2d(F.pad(x.reshape(b * s, 1, h, w), (p, p, p, p), mode="replicate"), k[None, None])
        return y.reshape(b, s, h, w)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x.float()
        plane, slab, odd = self.kernels()
        b, s, h, w = x.shape
        q = slab.shape[0] // 2
        if q:  # the slice profile acts before the in-plane k-space weighting
            z = x.permute(0, 2, 3, 1).reshape(-1, 1, s)
            z = F.conv1d(F.pad(z, (q, q), mode="replicate"), slab[None, None])
            x = z.reshape(b, h, w, s).permute(0, 3, 1, 2)
        return self._plane(x, plane), None if odd is None else self._plane(x, odd)
