"""The two encoders of UDEAN (paper, Fig. 2 and section II-D).

Paper: "For the encoders, we used 6 convolution layers with Leaky ReLU between each two layers,
and the head layer of the downsampling feature extractor downsamples the input HR image to the
same size of the LR image."

Shapes (F features, S slices per LR slab):
    LREncoder:          LR (B, S, H, W)       -> f (B, F, H, W)     | 3d: f (B, F, S, H, W)
    DownExtractor:      HR (B, 2S, 2H, 2W)    -> f (B, F, H, W)     | 3d: f (B, F, S, H, W)
"""
from __future__ import annotations

import torch
from torch import nn

from udean.models.layers import as_weights, conv, image_channels, lrelu, to_volume


def _conv_stack(dims: int, head: nn.Module, features: int, layers: int) -> nn.Sequential:
    """head conv, then `layers - 1` convs, LeakyReLU between each two (none after the last:
    the feature map is linear, the decoders and the feature discriminator read it as is)."""
    mods: list[nn.Module] = [head]
    for _ in range(layers - 1):
        mods += [lrelu(), conv(dims, features, features)]
    return nn.Sequential(*mods)


class LREncoder(nn.Module):
    """LR image -> feature map on the LR grid; `layers` convs with LeakyReLU between.

    (B, S, H, W) -> (B, F, H, W); 3d: (B, S, H, W) viewed as (B, 1, S, H, W) -> (B, F, S, H, W).
    Paper: "LR encoder" (Fig. 1, green); used for training and inference.
    """

    def __init__(self, dims: int, slab: int, features: int, layers: int):
        super().__init__()
        self.dims = dims
        self.layers = _conv_stack(dims, conv(dims, image_channels(dims, slab), features), features, layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(to_volume(as_weights(x, self), self.dims))


class DownExtractor(nn.Module):
    """HR image -> feature map on the LR grid; the head conv has stride 2 along every axis.

    (B, 2S, 2H, 2W) -> (B, F, H, W): stride 2 in-plane, the 2S HR slices enter as channels;
    3d: viewed as (B, 1, 2S, 2H, 2W) -> (B, F, S, H, W), stride 2 in all three axes.
    Paper: "downsampling feature extractor" (Fig. 1, orange).
    """

    def __init__(self, dims: int, slab: int, features: int, layers: int):
        super().__init__()
        self.dims = dims
        head = conv(dims, image_channels(dims, 2 * slab), features, stride=2)
        self.layers = _conv_stack(dims, head, features, layers)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.layers(to_volume(as_weights(y, self), self.dims))
