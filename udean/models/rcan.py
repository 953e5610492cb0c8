"""TS-RCAN backbone and the two decoders built on it (paper, Fig. 2 and section II-D).

Paper: "TS-RCAN [8] with 5 residual groups (RG) and 5 residual blocks (RCAB) in each RG as the
backbone of the decoders". TS-RCAN is RCAN (Zhang et al., ECCV 2018) run on thin slabs: the
slices of a slab are channels of a 2D network (`dims=2`); `dims=3` is the same tree in Conv3d.

Shapes (F features, S slices per LR slab):
    feature f         (B, F, H, W)      | 3d: (B, F, S, H, W)
    LRDecoder(f)      (B, S, H, W)      LR image at the feature grid
    SRDecoder(f)      (B, 2S, 2H, 2W)   SR image, x2 along every axis
"""
from __future__ import annotations

import torch
from torch import nn

from udean.models.layers import Upsampler, conv, from_volume, global_pool, image_channels


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation gate: (B, F, *spatial) -> same shape, channels rescaled in (0, 1).

    Paper: RCAN channel attention (CA), squeeze ratio `reduction`.
    """

    def __init__(self, dims: int, features: int, reduction: int):
        super().__init__()
        squeezed = max(1, features // reduction)  # tiny test widths would otherwise squeeze to 0
        self.pool = global_pool(dims)
        self.squeeze = conv(dims, features, squeezed, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.excite = conv(dims, squeezed, features, kernel_size=1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.excite(self.act(self.squeeze(self.pool(x)))))


class RCAB(nn.Module):
    """Residual channel attention block: x + CA(conv(ReLU(conv(x)))); (B, F, *spatial) -> same.

    Paper: RCAB (RCAN, Fig. 4 there; UDEAN Fig. 2).
    """

    def __init__(self, dims: int, features: int, reduction: int):
        super().__init__()
        self.body = nn.Sequential(
            conv(dims, features, features),
            nn.ReLU(inplace=True),
            conv(dims, features, features),
            ChannelAttention(dims, features, reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResidualGroup(nn.Module):
    """`n_rcab` RCABs and a conv, with a short skip; (B, F, *spatial) -> same.

    Paper: residual group (RG) of RCAN / TS-RCAN.
    """

    def __init__(self, dims: int, features: int, n_rcab: int, reduction: int):
        super().__init__()
        self.body = nn.Sequential(
            *[RCAB(dims, features, reduction) for _ in range(n_rcab)],
            conv(dims, features, features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class TSRCAN(nn.Module):
    """TS-RCAN backbone: head conv, `n_groups` residual groups and a conv, long skip over the body.

    (B, C_in, *spatial) -> (B, F, *spatial), same grid. Paper: TS-RCAN [8], 5 RG x 5 RCAB.
    """

    def __init__(self, dims: int, in_ch: int, features: int, n_groups: int, n_rcab: int, reduction: int):
        super().__init__()
        self.head = conv(dims, in_ch, features)
        self.body = nn.Sequential(
            *[ResidualGroup(dims, features, n_rcab, reduction) for _ in range(n_groups)],
            conv(dims, features, features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(x)
        return x + self.body(x)  # long skip (RCAN's residual-in-residual)


class LRDecoder(nn.Module):
    """Feature -> LR image at the same grid: backbone + output conv.

    f (B, F, H, W) -> (B, S, H, W); 3d: f (B, F, S, H, W) -> (B, S, H, W) (public layout).
    Paper: "LR decoder" (Fig. 1, orange), TS-RCAN backbone.
    """

    def __init__(self, dims: int, slab: int, features: int, n_groups: int, n_rcab: int, reduction: int):
        super().__init__()
        self.dims = dims
        self.backbone = TSRCAN(dims, features, features, n_groups, n_rcab, reduction)
        self.tail = conv(dims, features, image_channels(dims, slab))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return from_volume(self.tail(self.backbone(f)), self.dims)


class SRDecoder(nn.Module):
    """Feature -> SR image, x2 along every axis: backbone + x2 upsampler + output conv.

    thin slab: f (B, F, H, W) -> (B, 2S, 2H, 2W): pixel shuffle doubles H and W, the output conv
    emits 2S channels, i.e. the 2S HR slices of the slab (the slice axis is doubled by channels).
    3d: f (B, F, S, H, W) -> 3D pixel shuffle -> (B, 2S, 2H, 2W) (public layout).
    Paper: "SR decoder" (Fig. 1, green), TS-RCAN backbone with RCAN's upscale module.
    """

    def __init__(self, dims: int, slab: int, features: int, n_groups: int, n_rcab: int, reduction: int):
        super().__init__()
        self.dims = dims
        self.backbone = TSRCAN(dims, features, features, n_groups, n_rcab, reduction)
        self.upsample = Upsampler(dims, features)
        self.tail = conv(dims, features, image_channels(dims, 2 * slab))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return from_volume(self.tail(self.upsample(self.backbone(f))), self.dims)
