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


def global_pool(dims: int) -> nn.Module:
    return {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[dims](1)


def image_channels(dims: int, slab: int) -> int:
    """Channels of an image tensor as the network sees it: S slices (2D) or one volume (3D)."""
    return slab if dims == 2 else 1


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
def _interleave(even: torch.Tensor, odd: torch.Tensor, axis: int) -> torch.Tensor:
    shape = list(even.shape)
    shape[axis] *= 2
    return torch.stack((even, odd), dim=axis + 1).reshape(shape)


def upsample2_cubic(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, W) LR -> (B, 2S, 2H, 2W): separable cubic convolution (Keys, a = -1/2) on the last
    three axes with HR 2j = LR j and HR 2j+1 = (-x[j-1] + 9 x[j] + 9 x[j+1] - x[j+2]) / 16 (edges
    replicated); exact for quadratics away from the edges, like tricubic interpolation."""
    for axis in (-3, -2, -1):
        n = x.shape[axis]
        idx = torch.arange(n, device=x.device)

        def tap(shift: int) -> torch.Tensor:
            return x.index_select(x.dim() + axis, (idx + shift).clamp(0, n - 1))

        odd = (9.0 * (x + tap(1)) - tap(-1) - tap(2)) / 16.0
        x = _interleave(x, odd, x.dim() + axis)
    return x


def downsample2_linear(y: torch.Tensor) -> torch.Tensor:
    """(B, 2S, 2H, 2W) HR -> (B, S, H, W): [1/4, 1/2, 1/4] low-pass on the last three axes, then the
    even samples (HR 2j -> LR j; edges replicated)."""
    for axis in (-3, -2, -1):
        n = y.shape[axis]
        prev = torch.cat((y.narrow(axis, 0, 1), y.narrow(axis, 0, n - 1)), dim=axis)
        nxt = torch.cat((y.narrow(axis, 1, n - 1), y.narrow(axis, n - 1, 1)), dim=axis)
        y = (0.25 * prev + 0.5 * y + 0.25 * nxt).narrow(axis, 0, n).unfold(y.dim() + axis, 1, 2).squeeze(-1)
    return y
