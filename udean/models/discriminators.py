"""VGG-style discriminators of UDEAN (paper, Fig. 1 blue "identification module", section II-D).

Paper: "VGG [23] as the discriminators". Three instances:

- LR discriminator `d_lr` (the paper's D_da): target LR X_t (real) vs X_{s~t} (fake). Eq. 8, and
  the adversarial term L_adv(X^_t) of Eq. 7.
- feature discriminator `d_feat` (the paper's D_fa): f_t (real, the target domain the source
  features must adapt to) vs f_s (fake). Eq. 9.
- HR discriminator `d_hr` (ours, when `model.hr_discriminator: true`): Eq. 4 and 6 put an
  adversarial term on the HR-grid images Y_{s~t~s} and Y^_s without naming a discriminator.
  We add one on HR images with real = Y_s (the only real HR images in training) and
  fake = Y_{s~t~s}, Y^_s. With `hr_discriminator: false` those two beta terms are dropped.

Outputs are unbounded patch scores (no sigmoid): the discriminators are trained with least
squares (real -> 1, fake -> 0; paper: "we use the least square loss"), so a score is a
regression target, and Eq. 8/9 push the generator toward the midpoint 0.5.
A patch map instead of a dense head keeps odd and non-paper patch sizes working; the losses
average it (the 1/N sum of Eq. 3, 8, 9). No normalization layers: batches are small (8 per
rank) and BatchNorm statistics would couple the real and fake passes. `model.spectral_norm`
(ours) reparametrizes every conv by spectral normalization instead, which needs no batch
statistics.

Shapes (Fd = disc_features, k = disc_blocks):
    image (B, C, H, W) -> (B, 1, ceil(H/2^k), ceil(W/2^k))          thin slab, C = S or 2S
    image (B, C, H, W) -> (B, 1, C, ceil(H/2^k), ceil(W/2^k))       3d (C is the depth axis)
    feature (B, F, H, W) -> (B, 1, h, w);  3d: (B, F, S, H, W) -> (B, 1, S, h, w)
"""
from __future__ import annotations

import torch
from torch import nn

from udean.models.layers import as_weights, conv, lrelu, to_volume


class VGGDiscriminator(nn.Module):
    """conv-LReLU, then `blocks` VGG stages [conv, LReLU, stride-2 conv, LReLU] doubling the width
    (capped at 8 * features), then a 1-channel conv: an unbounded least-squares patch score.

    `image=True`: the input is an image in the public (B, S, H, W) layout (viewed as a volume in
    3d); `image=False`: the input is a feature map already in network layout.
    In 3d the stride is 2 in-plane only: a slab is 3 (LR) or 6 (HR) voxels deep and would
    vanish after two halvings.
    Paper: VGG discriminator (Fig. 2).
    """

    def __init__(self, dims: int, in_ch: int, features: int, blocks: int, image: bool,
                 spectral_norm: bool = False):
        super().__init__()
        self.dims = dims
        self.image = image
        stride = 2 if dims == 2 else (1, 2, 2)
        mods: list[nn.Module] = [conv(dims, in_ch, features), lrelu()]
        width = features
        for i in range(blocks):
            nxt = features * min(2 ** (i + 1), 8)
            mods += [conv(dims, width, nxt), lrelu(), conv(dims, nxt, nxt, stride=stride), lrelu()]
            width = nxt
        mods.append(conv(dims, width, 1))
        if spectral_norm:
            mods = [nn.utils.parametrizations.spectral_norm(m) if isinstance(m, (nn.Conv2d, nn.Conv3d)) else m
                    for m in mods]
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_weights(x, self)
        return self.layers(to_volume(x, self.dims) if self.image else x)
