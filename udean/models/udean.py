"""UDEAN wiring (paper, Fig. 1): degradation learning network + SR reconstruction network.

Training (Y_s: source HR (B, 2S, 2H, 2W); X_t: target LR (B, S, H, W)):

    red:    Y_s --down_extractor--> f_s --lr_decoder--> X_{s~t} --lr_encoder--> f_{s~t~s}
                                                                 --sr_decoder--> Y_{s~t~s}
    blue:   f_s --sr_decoder--> Y^_s
    yellow: X_t --lr_encoder--> f_t --lr_decoder--> X^_t

Inference (yellow dotted): X_t --lr_encoder--> sr_decoder --> Y_t; only `SRNet` is needed, and
`inference_state_dict` / `load_inference` carry just those weights.

Image skip (`model.image_skip`, ours, not in the paper): every decoder learns a residual over a
fixed x2 resampling of the image it stands for (`upsample2` / `downsample2`):
X_{s~t} = lr_decoder(f_s) + down(Y_s), Y_{s~t~s} = sr_decoder(f_{s~t~s}) + up(X_{s~t}),
Y^_s = sr_decoder(f_s) + up(down(Y_s)), X^_t = lr_decoder(f_t) + X_t, SR = sr_decoder(f) + up(X).
Global residual learning (as in VDSR) starts the SR path at Lanczos interpolation instead of zero;
without it a CPU-sized run does not reach interpolation quality in its budget. The decoders'
output convs start at zero (`zero_residual`), so every path starts exactly at its resampling.

Every module takes and returns images in the public layout (LR (B, S, H, W), HR (B, 2S, 2H, 2W))
whatever the variant; features are (B, F, H, W) (thin slab) or (B, F, S, H, W) (3d).
"""
from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from udean.models.degradation import LearnedBlur, RicianNoise, magnitude
from udean.models.discriminators import VGGDiscriminator
from udean.models.encoders import DownExtractor, LREncoder
from udean.models.layers import VARIANT_DIMS, downsample2, image_channels, kspace_downsample2, upsample2
from udean.models.rcan import LRDecoder, SRDecoder

INFERENCE_PARTS = ("lr_encoder", "sr_decoder")
OUTPUTS = ("f_s", "x_st", "f_sts", "y_sts", "y_hat_s", "f_t", "x_hat_t")  # Generator.forward's, by default all
# the networks each output reads besides the degradation (physics: blur and noise; the paper's
# decoder: down_extractor, lr_decoder)
READS = {"f_s": ("down_extractor",), "x_st": (), "f_sts": ("lr_encoder",), "y_sts": ("lr_encoder", "sr_decoder"),
         "y_hat_s": ("down_extractor", "sr_decoder"), "f_t": ("lr_encoder",), "x_hat_t": ("lr_encoder", "lr_decoder"),
         "blur_excess": (), "blur_deficit": ()}
DISCRIMINATORS = ("d_lr", "d_feat", "d_hr")


def generator_parts(model_cfg, outputs: Collection[str] | None = None) -> tuple[str, ...]:
    """The Generator's networks that exist when it is built for `outputs` (None: all `OUTPUTS`):
    the SR path always (inference), the degradation, and what the outputs read (`READS`)."""
    keep = set(INFERENCE_PARTS) | {p for o in (OUTPUTS if outputs is None else outputs) for p in READS[o]}
    if model_cfg.degradation == "physics":
        keep |= {"blur"} | ({"noise"} if model_cfg.degradation_noise else set())
    else:
        keep |= {"down_extractor", "lr_decoder"} | ({"noise"} if model_cfg.degradation_noise else set())
    return tuple(sorted(keep))


def discriminator_parts(model_cfg, read: Collection[str] | None = None) -> tuple[str, ...]:
    """The discriminators that exist when built for `read` (None: all; d_hr only with
    `model.hr_discriminator`)."""
    read = DISCRIMINATORS if read is None else read
    return tuple(d for d in sorted(read) if d != "d_hr" or model_cfg.hr_discriminator)


def crop(t: torch.Tensor, margins: tuple[int, int, int]) -> torch.Tensor:
    """The centre of (..., S, H, W) without `margins` voxels on each side of the last three axes."""
    m = margins
    return t[..., m[0]:t.shape[-3] - m[0], m[1]:t.shape[-2] - m[1], m[2]:t.shape[-1] - m[2]]


def zero_residual(*decoders: nn.Module) -> None:
    """Zero the output conv of each decoder: with the image skip, every path starts exactly at its
    fixed resampling (measured on the demo's test volumes: a random 0.1-scaled tail started the SR
    path 0.46 dB below its own skip). The tail's weight gradient is non-zero, so it learns at once."""
    with torch.no_grad():
        for d in decoders:
            d.tail.weight.zero_()
            d.tail.bias.zero_()


class SRNet(nn.Module):
    """SR reconstruction network: LR (B, S, H, W) -> SR (B, 2S, 2H, 2W).

    Paper: "SR reconstruction network" (Fig. 1, green): LR encoder + SR decoder.
    """

    def __init__(self, lr_encoder: nn.Module, sr_decoder: nn.Module, image_skip: bool = False):
        super().__init__()
        self.lr_encoder = lr_encoder
        self.sr_decoder = sr_decoder
        self.image_skip = image_skip
        if image_skip:
            zero_residual(sr_decoder)

    def forward(self, x_lr: torch.Tensor) -> torch.Tensor:
        y = self.sr_decoder(self.lr_encoder(x_lr))
        return y + upsample2(x_lr) if self.image_skip else y


class Generator(nn.Module):
    """Every generator of Fig. 1: degradation mapping (down_extractor, lr_decoder) and SR
    reconstruction (lr_encoder, sr_decoder). One module so one optimizer / engine owns them.

    Paper: Fig. 1, orange + green modules.
    """

    def __init__(self, variant: str, slab: int, features: int, n_groups: int, n_rcab: int,
                 reduction: int, encoder_layers: int, image_skip: bool = False, degradation: str = "decoder",
                 blur_size: int = 7, blur_odd: bool = False, degradation_noise: bool = False,
                 noise_spread: bool = False, cycle_detach: bool = False, source_margin: tuple[int, int] = (0, 0),
                 decimation: str = "lanczos", parts: Collection[str] | None = None):
        super().__init__()
        dims = VARIANT_DIMS[variant]
        self.variant, self.slab, self.image_skip = variant, slab, image_skip
        self.cycle_detach = cycle_detach
        self.source_margin = tuple(source_margin)
        self.decimate = kspace_downsample2 if decimation == "kspace" else downsample2
        self.down_extractor = DownExtractor(dims, slab, features, encoder_layers)
        self.lr_decoder = LRDecoder(dims, slab, features, n_groups, n_rcab, reduction)
        self.lr_encoder = LREncoder(dims, slab, features, encoder_layers)
        self.sr_decoder = SRDecoder(dims, slab, features, n_groups, n_rcab, reduction)
        if image_skip:
            zero_residual(self.lr_decoder, self.sr_decoder)
        # models/degradation.py: X_{s~t} = blur(downsample2(Y_s)) instead of lr_decoder(f_s)
        self.blur = LearnedBlur(blur_size, odd=blur_odd) if degradation == "physics" else None
        self.noise = RicianNoise(sigma_spread=noise_spread) if degradation_noise else None
        # `parts` (`generator_parts`): every network is built, then those left out are dropped, so
        # the others start from the weights a full build gives them (the same random draws)
        for name in ("down_extractor", "lr_decoder"):
            if parts is not None and name not in parts:
                setattr(self, name, None)

    def _clean(self, y_s: torch.Tensor, f_s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """X_{s~t} before the noise layer: (real part, imaginary part or None)."""
        if self.blur is not None:
            return self.blur(self.decimate(y_s))
        x_st = self.lr_decoder(self.down_extractor(y_s) if f_s is None else f_s)
        return (x_st + downsample2(y_s) if self.image_skip else x_st), None

    def _noisy(self, x: torch.Tensor, im: torch.Tensor | None, noise: bool = True) -> torch.Tensor:
        return self.noise(x, im, noise) if self.noise is not None else magnitude(x, im)

    def degrade(self, y_s: torch.Tensor, f_s: torch.Tensor | None = None, noise: bool = True) -> torch.Tensor:
        """X_{s~t} of source HR (B, 2S, 2H, 2W) -> (B, S, H, W); `f_s` (the decoder's input) is
        computed when not given; `noise=False`: without the noise layer (fidelity metrics)."""
        return self._noisy(*self._clean(y_s, f_s), noise)

    def forward(self, y_s: torch.Tensor, x_t: torch.Tensor, outputs: Collection[str] | None = None,
                sigma_branch: bool = False) -> dict[str, torch.Tensor]:
        """y_s (B, 2S, 2H, 2W) source HR, x_t (B', S, H', W') target LR (unpaired: B' and the
        grid may differ from y_s's) -> dict of the tensors the losses of Eq. 4-9 need (`OUTPUTS`):

        f_s, f_sts, f_t: features; x_st = X_{s~t}, x_hat_t = X^_t: LR images;
        y_sts = Y_{s~t~s}, y_hat_s = Y^_s: HR images. `outputs`: only these (and x_st, always),
        skipping the networks nothing asked for (`losses.forward_args`: a term weighted 0 costs
        nothing); None: all of `OUTPUTS` this Generator has the networks for (`built_outputs`;
        a build for some outputs leaves the others' networks out) (and "blur_excess", the learned blur's amplification, only
        when asked for: `loss.lambda_bound`). With `source_margin`, also y_s: the centre of the source patch, the
        Y_s every loss compares with; with `sigma_branch` (and the noise layer), also x_st_sigma:
        X_{s~t} with its noise-free part detached and its own noise draw, whose only gradient is
        into sigma (`losses.noise_loss`; off, the RNG stream is unchanged).
        """
        want = set(self.built_outputs() if outputs is None else outputs)
        missing = sorted({p for o in want for p in READS[o] if getattr(self, p) is None})
        if missing:
            raise ValueError(f"Generator outputs {sorted(want)} need {missing}, which this Generator was built without")
        out: dict[str, torch.Tensor] = {}
        f_s = None
        if any(self.source_margin):  # degrade with real context, then keep the centre (noise is pointwise)
            m0, m1 = self.source_margin
            x, im = (None if v is None else crop(v, (m0, m1, m1)) for v in self._clean(y_s, None))
            y_s = out["y_s"] = crop(y_s, (2 * m0, 2 * m1, 2 * m1))
        else:
            if self.blur is None:  # the decoder degradation reads f_s
                f_s = self.down_extractor(y_s)
            x, im = self._clean(y_s, f_s)
        x_st = out["x_st"] = self._noisy(x, im)
        if self.blur is not None and "blur_excess" in want:  # losses: loss.lambda_bound
            out["blur_excess"] = self.blur.excess()
        if self.blur is not None and "blur_deficit" in want:  # losses: loss.lambda_prior
            out["blur_deficit"] = self.blur.deficit()
        if sigma_branch and self.noise is not None:
            out["x_st_sigma"] = self.noise(x.detach(), None if im is None else im.detach())
        if want & {"f_s", "y_hat_s"}:
            f_s = self.down_extractor(y_s) if f_s is None else f_s
            if "f_s" in want:
                out["f_s"] = f_s
            if "y_hat_s" in want:
                y = self.sr_decoder(f_s)
                out["y_hat_s"] = y + upsample2(downsample2(y_s)) if self.image_skip else y
        if want & {"f_sts", "y_sts"}:
            x_in = x_st.detach() if self.cycle_detach else x_st  # pseudo-supervision: SR learns, D is not fooled for it
            f_sts = out["f_sts"] = self.lr_encoder(x_in)
            if "y_sts" in want:
                y = self.sr_decoder(f_sts)
                out["y_sts"] = y + upsample2(x_in) if self.image_skip else y
        if want & {"f_t", "x_hat_t"}:
            f_t = self.lr_encoder(x_t)
            if "f_t" in want:
                out["f_t"] = f_t
            if "x_hat_t" in want:
                x_hat = self.lr_decoder(f_t)
                out["x_hat_t"] = x_hat + x_t if self.image_skip else x_hat
        return out

    def built_outputs(self) -> tuple[str, ...]:
        """The outputs whose networks this Generator has (all of `OUTPUTS` for a full build)."""
        return tuple(o for o in OUTPUTS if all(getattr(self, p) is not None for p in READS[o]))

    def sr(self, x_lr: torch.Tensor) -> torch.Tensor:
        """Inference path: LR (B, S, H, W) -> SR (B, 2S, 2H, 2W) through lr_encoder + sr_decoder."""
        y = self.sr_decoder(self.lr_encoder(x_lr))
        return y + upsample2(x_lr) if self.image_skip else y


class Discriminators(nn.Module):
    """The identification module: d_lr (D_da, Eq. 7-8), d_feat (D_fa, Eq. 9) and, optionally,
    d_hr (our HR adversary for Eq. 4 and 6; None when disabled). One module so one engine owns them.

    Paper: Fig. 1, blue modules.
    """

    def __init__(self, variant: str, slab: int, features: int, disc_features: int, disc_blocks: int,
                 hr_discriminator: bool, spectral_norm: bool = False, parts: Collection[str] | None = None):
        super().__init__()
        dims = VARIANT_DIMS[variant]
        sn = dict(spectral_norm=spectral_norm)
        self.d_lr = VGGDiscriminator(dims, image_channels(dims, slab), disc_features, disc_blocks, image=True, **sn)
        self.d_feat = VGGDiscriminator(dims, features, disc_features, disc_blocks, image=False, **sn)
        self.d_hr = (VGGDiscriminator(dims, image_channels(dims, 2 * slab), disc_features, disc_blocks, image=True, **sn)
                     if hr_discriminator else None)
        if parts is not None:  # built, then dropped: the others keep a full build's weights
            assert "d_lr" in parts, "the D step always trains d_lr"
            for name in ("d_feat", "d_hr"):
                if name not in parts:
                    setattr(self, name, None)

    def forward(self, x_lr: torch.Tensor, f: torch.Tensor | None = None, y_hr: torch.Tensor | None = None):
        """Scores of the discriminators that exist for an LR image, a feature and an HR image; the
        loss functions call the submodules directly, this exists so an engine has a forward."""
        pairs = ((self.d_lr, x_lr), (self.d_feat, f), (self.d_hr, y_hr))
        return tuple(d(x) for d, x in pairs if d is not None and x is not None)


def build(model_cfg, slab: int = 3, outputs: Collection[str] | None = None,
          discriminators: Collection[str] | None = None) -> tuple[Generator, Discriminators]:
    """`cfg.model` (ModelConfig) -> (Generator, Discriminators). `slab`: LR slices per patch,
    `cfg.data.patches.slab` (paper: 3); the 3d variant's weights do not depend on it.
    `outputs` / `discriminators` (None: all): only the networks these read
    (`generator_parts`, `discriminator_parts`; training passes `losses.model_parts(cfg.loss)`:
    a network no active loss term reads gets no gradient, and in an engine it would cost
    per-tensor work every step). The networks built have the weights of a full build."""
    m = model_cfg
    gen = Generator(m.variant, slab, m.features, m.n_groups, m.n_rcab, m.reduction, m.encoder_layers,
                    m.image_skip, m.degradation, m.blur_size, m.blur_odd, m.degradation_noise, m.noise_spread,
                    m.cycle_detach, m.source_margin, m.decimation, parts=generator_parts(m, outputs))
    discs = Discriminators(m.variant, slab, m.features, m.disc_features, m.disc_blocks, m.hr_discriminator,
                           m.spectral_norm, parts=discriminator_parts(m, discriminators))
    return gen, discs


def built_parts(gen: nn.Module, discs: nn.Module) -> dict[str, list[str]]:
    """The networks two built modules hold (checkpoints record them: udean/checkpoint.py)."""
    return {k: sorted(n for n, c in m.named_children() if c is not None) for k, m in (("g", gen), ("d", discs))}


def inference_state_dict(gen: nn.Module) -> dict[str, torch.Tensor]:
    """Only the weights inference needs: keys `lr_encoder.*` and `sr_decoder.*`."""
    return {k: v.detach().clone() for k, v in gen.state_dict().items() if k.split(".", 1)[0] in INFERENCE_PARTS}


def load_inference(state: dict[str, torch.Tensor], model_cfg) -> SRNet:
    """Rebuild the SR network from `inference_state_dict` output (strict: every key must match).

    The thin-slab slab size is read from the LR encoder's first conv (its input channels)."""
    m = model_cfg
    dims = VARIANT_DIMS[m.variant]
    key = "lr_encoder.layers.0.weight"
    if key not in state:
        raise ValueError(f"not an inference state dict: missing {key!r}")
    if state[key].dim() != dims + 2:
        raise ValueError(f"inference weights are not for model.variant={m.variant!r}")
    net = build_sr(m, slab=state[key].shape[1] if dims == 2 else 1)
    net.load_state_dict(state, strict=True)
    return net


def build_sr(model_cfg, slab: int = 3) -> SRNet:
    """A fresh SR reconstruction network (LR encoder + SR decoder, with the configured image skip),
    the inference path on its own; baselines train it directly."""
    m = model_cfg
    dims = VARIANT_DIMS[m.variant]
    return SRNet(LREncoder(dims, slab, m.features, m.encoder_layers),
                 SRDecoder(dims, slab, m.features, m.n_groups, m.n_rcab, m.reduction), m.image_skip)
