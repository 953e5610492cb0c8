"""Dimension-generic building blocks shared by every UDEAN component.

One code path serves both variants of the model:

- `thin_slab` (TS-RCAN, the paper's choice): the S slices of a slab are channels, `dims=2`.
  LR image (B, S, H, W), HR image (B, 2S, 2H, 2W), feature (B, F, H, W).
- `3d`: `dims=3`, the slab is a one-channel volume. Image-facing modules view the public
  layout (B, S, H, W) as (B, 1, S, H, W) on the way in and squeeze it back on the way out
  (`to_volume` / `from_volume`), so callers never care about the variant.
  Feature (B, F, S, H, W).
"""
from __future__ import annotations

import functools

import torch
from torch import nn

VARIANT_DIMS = {"thin_slab": 2, "3d": 3}


def conv(dims: int, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int | tuple = 1,
         bias: bool = True) -> nn.Module:
    """Conv2d or Conv3d with 'same' padding for odd kernels (stride 2 then halves each even axis
    and gives ceil(n/2) on an odd one)."""
    cls = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
    return cls(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)


def lrelu() -> nn.Module:
    # 0.2: the usual slope for SR/GAN encoders and VGG discriminators (ESRGAN, BasicSR)
    return nn.LeakyReLU(0.2, inplace=True)


class GlobalAvgPool(nn.Module):
    """(B, F, *spatial) -> (B, F, 1, ...): the mean over the `dims` spatial axes.

    What AdaptiveAvgPool(1) computes, as a plain mean: adaptive pooling has no deterministic
    CUDA backward, so `train.deterministic` raised in channel attention."""

    def __init__(self, dims: int):
        super().__init__()
        self.axes = tuple(range(-dims, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.axes, keepdim=True)


def global_pool(dims: int) -> nn.Module:
    return GlobalAvgPool(dims)


def image_channels(dims: int, slab: int) -> int:
    """Channels of an image tensor as the network sees it: S slices (2D) or one volume (3D)."""
    return slab if dims == 2 else 1


def as_weights(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`x` in the dtype of `module`'s parameters: a bf16 / fp16 engine keeps the networks' weights
    in low precision while images (the batch, the physics degradation, the image skip) stay
    float32; each network casts its image input on the way in (no-op when they agree)."""
    return x.to(next(module.parameters()).dtype)


def to_volume(x: torch.Tensor, dims: int) -> torch.Tensor:
    """(B, S, H, W) public image layout -> network layout: unchanged (2D) or (B, 1, S, H, W) (3D)."""
    if x.dim() != 4:
        raise ValueError(f"expected an image batch (B, S, H, W), got shape {tuple(x.shape)}")
    return x if dims == 2 else x.unsqueeze(1)


def from_volume(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Network layout -> public (B, S, H, W) image layout (inverse of `to_volume`)."""
    return x if dims == 2 else x.squeeze(1)


class PixelShuffle3d(nn.Module):
    """Sub-pixel shuffle in three axes: (B, C*r^3, D, H, W) -> (B, C, rD, rH, rW).

    Paper: the TS-RCAN upsampler is a pixel shuffle; the 3D variant needs it along the slice
    axis too, and torch only ships the 2D one.
    """

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        r = self.r
        x = x.view(b, c // r**3, r, r, r, d, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, c // r**3, d * r, h * r, w * r)


class Upsampler(nn.Module):
    """x2 sub-pixel upsampler: (B, F, H, W) -> (B, F, 2H, 2W) or (B, F, D, H, W) -> (B, F, 2D, 2H, 2W).

    Paper: RCAN's upscale module (conv to r^dims * F channels, then pixel shuffle).
    """

    def __init__(self, dims: int, features: int):
        super().__init__()
        self.conv = conv(dims, features, features * 2**dims)
        self.shuffle = nn.PixelShuffle(2) if dims == 2 else PixelShuffle3d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


# --------------------------------------------------------------------------- fixed x2 resampling
# Geometry of the data (preprocessing/kspace.py): LR voxel j sits at HR voxel 2j on every axis.
# Both directions use the Lanczos (windowed-sinc) kernel sinc(t) sinc(t / a), a = LANCZOS_A LR
# voxels: the degradation of the paper (k-space truncation) is an ideal low-pass, which a windowed
# sinc approximates far better than cubic convolution or a [1/4, 1/2, 1/4] filter. Measured on the
# demo's test volumes: Lanczos decimation of HR is 35.4 dB from the real LR (linear 30.1 dB), and
# Lanczos upsampling of LR is 0.6 dB above Keys cubic convolution, level with scipy's cubic B-spline.
LANCZOS_A = 3


def _interleave(even: torch.Tensor, odd: torch.Tensor, axis: int) -> torch.Tensor:
    shape = list(even.shape)
    shape[axis] *= 2
    return torch.stack((even, odd), dim=axis + 1).reshape(shape)


def _lanczos(t: torch.Tensor) -> torch.Tensor:
    w = torch.sinc(t) * torch.sinc(t / LANCZOS_A)
    return w / w.sum()


# computed once: taps of upsample2 (offsets of LR j-a+1 .. j+a from LR j + 1/2) and downsample2
# (HR offsets -(2a-1) .. 2a-1, in LR units)
_UP_KERNEL = _lanczos(torch.arange(LANCZOS_A - 0.5, -LANCZOS_A, -1.0, dtype=torch.float64))
_DOWN_KERNEL = _lanczos(torch.arange(1 - 2 * LANCZOS_A, 2 * LANCZOS_A, dtype=torch.float64) / 2)


@functools.lru_cache(maxsize=None)
def _taps(kernel: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`kernel` (one of the two above) as a conv1d weight on `device` in `dtype`, made once: a
    copy per call was a blocking host-to-device copy of CPU float64 taps, 3 per training step."""
    return kernel.to(device, dtype).view(1, 1, -1)


def _filter_axis(x: torch.Tensor, dim: int, kernel: torch.Tensor, left: int, right: int, stride: int = 1):
    """1D correlation with `kernel` along `dim` (edges replicated `left` / `right` samples)."""
    moved = x.movedim(dim, -1)
    flat = torch.nn.functional.pad(moved.reshape(-1, 1, moved.shape[-1]), (left, right), mode="replicate")
    out = torch.nn.functional.conv1d(flat, _taps(kernel, flat.device, flat.dtype), stride=stride)
    return out.reshape(*moved.shape[:-1], out.shape[-1]).movedim(-1, dim)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, W) LR -> (B, 2S, 2H, 2W) on the last three axes: HR 2j = LR j exactly, HR 2j+1 =
    Lanczos interpolation at LR j + 1/2 from LR j-a+1 .. j+a (edges replicated)."""
    a = LANCZOS_A
    for dim in (x.dim() - 3, x.dim() - 2, x.dim() - 1):
        x = _interleave(x, _filter_axis(x, dim, _UP_KERNEL, a - 1, a), dim)
    return x


def downsample2(y: torch.Tensor) -> torch.Tensor:
    """(B, 2S, 2H, 2W) HR -> (B, S, H, W) on the last three axes: Lanczos low-pass at half the HR
    band (2a - 1 taps each side), sampled at the even HR voxels (HR 2j -> LR j; edges replicated;
    an odd extent n gives ceil(n / 2))."""
    r = 2 * LANCZOS_A - 1
    for dim in (y.dim() - 3, y.dim() - 2, y.dim() - 1):
        y = _filter_axis(y, dim, _DOWN_KERNEL, r, r, stride=2)
    return y


def _kspace_axis_fft(x: torch.Tensor, d: int) -> torch.Tensor:
    """Forward half of the x2 truncation along axis `d`: the FFT of the mirror extension, cut to the
    central n // 2 bins of the centred spectrum (frequencies 0 .. ceil(m/2)-1, then -floor(m/2) .. -1)."""
    n = 2 * x.shape[d]
    k = torch.fft.fft(torch.cat([x, x.flip(d)], d), dim=d)
    m = n // 2
    return torch.cat([k.narrow(d, 0, (m + 1) // 2), k.narrow(d, n - m // 2, m // 2)], d)


@functools.lru_cache(maxsize=64)
def _kspace_matrix(n: int, device: torch.device) -> torch.Tensor:
    """(n // 2, n) complex64 on `device`: the x2 truncation along one axis of length n as a matrix
    (mirror extension, FFT, central half, inverse FFT, first half), the rows of
    `kspace_downsample2`'s separable operator, computed once per length and device (in float64)
    by running the FFT pipeline on the identity."""
    x = _kspace_axis_fft(torch.eye(n, dtype=torch.float64), -1)
    a = torch.fft.ifft(x, dim=-1).narrow(-1, 0, x.shape[-1] // 2).T
    return a.to(device=device, dtype=torch.complex64).contiguous()


def kspace_downsample2(y: torch.Tensor) -> torch.Tensor:
    """(B, 2S, 2H, 2W) HR -> (B, S, H, W): x2 k-space truncation (preprocessing/kspace.py's
    degradation: central half of the centred spectrum on each axis, mean kept, magnitude) of each
    patch's mirror extension, so its edges do not wrap (LR voxel j = HR voxel 2j). Closer than
    `downsample2` to truncating the whole volume (measured on 96x96x80 source patches with 2 / 4
    LR voxels of context, centre compared: 34.8 dB vs Lanczos 32.5 dB): Lanczos loses energy near
    the LR Nyquist frequency, which a degradation learned from the target's spectrum then fills
    with independent noise.

    Separable (the 3D FFT is separable and mirroring one axis commutes with the FFT along
    another): per axis a fixed complex (n/2, n) matrix (`_kspace_matrix`, the FFT pipeline run once
    on the identity), then the magnitude. Three small matrix products instead of mirror, FFT and
    inverse FFT per axis: the same operator (max |diff| ~1e-6, tests) at a fraction of the CPU step
    and of the dispatched ops."""
    x = y.float().to(torch.complex64)
    for d in (-3, -2, -1):
        x = torch.movedim(torch.matmul(torch.movedim(x, d, -1), _kspace_matrix(x.shape[d], x.device).T), -1, d)
    return (x.abs() / 8).to(y.dtype)
