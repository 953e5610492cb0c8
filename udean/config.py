"""One config tree: YAML files -> typed, validated pydantic models.

Every hyper-parameter of the paper (section II-B/C/D) lives here with its paper default;
the shipped configs (package data in `udean/configs/`, named by `--config NAME`): `paper.yaml`
spells them out, `recommended.yaml` (`DEFAULT`: what a command without --config gets) is the
paper's sizes with the switches the shift benchmark keeps, `demo.yaml` and `tiny.yaml` shrink
them for a CPU. A config may name a `base:` (a shipped name, or a path relative to itself) and
holds only what differs from it (`_read_tree`). Validation happens on load, before any work: an
unknown key, a wrong type or an out-of-range value raises `ConfigError` naming the dotted key
and what is allowed.

CLI overrides are `key.sub=value`; the value is parsed as YAML (`train.lr=3e-4`,
`data.patches.lr_size=[32,32]`, `model.variant=3d`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator, model_serializer, model_validator

from hpc.atomic import atomic_write_text
from preprocessing.config import ConfigError, DataConfig, Section


# --------------------------------------------------------------------------- model (II-A, II-D)
class ModelConfig(Section):
    """Paper: encoders 6 conv + LeakyReLU; decoders TS-RCAN 5 RG x 5 RCAB; VGG discriminators."""

    variant: Literal["thin_slab", "3d"] = "thin_slab"
    features: int = Field(64, ge=1)
    n_groups: int = Field(5, ge=1)
    n_rcab: int = Field(5, ge=1)
    reduction: int = Field(16, ge=1)  # channel-attention squeeze ratio
    encoder_layers: int = Field(6, ge=2)
    disc_features: int = Field(64, ge=1)
    disc_blocks: int = Field(3, ge=1)  # stride-2 VGG stages per discriminator
    # Eq. 4 and 6 put an adversarial term on HR images without naming its discriminator:
    # `true` adds an HR discriminator (real: Y_s); `false` drops those beta terms.
    hr_discriminator: bool = True
    # ours: spectral normalization of every discriminator conv (Miyato et al. 2018)
    spectral_norm: bool = False
    # ours, not the paper's: decoders learn residuals over fixed x2 Lanczos resampling (models/udean.py)
    image_skip: bool = True
    # ours, not the paper's (models/degradation.py): "decoder" is the paper's X_{s~t} =
    # lr_decoder(f_s); "physics" is a learned blur after the fixed Lanczos decimation, no content path
    degradation: Literal["decoder", "physics"] = "decoder"
    blur_size: int = Field(7, ge=1)  # in-plane kernel of the physics degradation (odd)
    blur_odd: bool = False  # ... with a point-odd imaginary kernel too: a Hermitian PSF (partial Fourier)
    # ours: learned-sigma complex Gaussian noise on X_{s~t}, Rician magnitude; `noise_spread`
    # also learns a spread of log sigma across samples
    degradation_noise: bool = False
    noise_spread: bool = False
    # ours: the cycle Y_{s~t~s} reads X_{s~t} detached (pseudo-supervision): the SR path learns
    # from (X_{s~t}, Y_s) pairs and cannot make the degradation hide HR detail for it to decode
    cycle_detach: bool = False
    # ours: LR voxels of real context around every source HR patch (slab axis, in-plane); the
    # physics degradation runs on the whole patch, then X_{s~t} and Y_s are cropped to the centre,
    # so X_{s~t} has no replicated edges (a 3-slice slab has 2 edge slices of 3). The source
    # shards must hold patches 2 * (slab + 2 m0, size + 2 m1) HR voxels (data.patches.source_margin, the same values).
    source_margin: tuple[int, int] = (0, 0)
    # the physics degradation's fixed x2 decimation: the image skip's Lanczos, or k-space
    # truncation of the mirror-extended patch (layers.kspace_downsample2), closer to the data's
    decimation: Literal["lanczos", "kspace"] = "lanczos"

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.blur_size % 2 == 0:
            raise ValueError("blur_size must be odd")
        if any(m < 0 for m in self.source_margin):
            raise ValueError("source_margin entries must be >= 0")
        if (any(self.source_margin) or self.decimation != "lanczos") and self.degradation != "physics":
            raise ValueError("source_margin and decimation need degradation: physics")
        if self.noise_spread and not self.degradation_noise:
            raise ValueError("noise_spread needs degradation_noise: true")
        return self


class LossConfig(Section):
    """Eq. 1-10. lambdas are (i_cyc, f_cyc, hr_con, lr_con, da, fa)."""

    alpha: float = Field(0.5, ge=0.0)
    beta: float = Field(0.01, ge=0.0)
    lambdas: tuple[float, float, float, float, float, float] = (1.0, 0.1, 1.0, 1.0, 0.1, 0.1)
    # Eq. 3 as written: mean |D(x) - 1|; "lsq": mean (D(x) - 1)^2 as the text says
    adversarial: Literal["abs", "lsq"] = "abs"
    ssim_window: int = Field(7, ge=3)  # 2D window, SSIM per slice (thin slabs hold 3 / 6 slices)
    # ours, not the paper's: Eq. 5 with a stop-gradient on its target f_s, so only f_{s~t~s} moves
    # toward f_s (two feature branches pulled together collapse otherwise, as in SimSiam)
    f_cyc_stop_gradient: bool = False
    # ours, not the paper's: the adaptation weights (lambdas da, fa) are 0 until `adapt_start` of
    # the training steps, then rise linearly to their values over `adapt_ramp` (fractions of the run)
    adapt_start: float = Field(0.0, ge=0.0, lt=1.0)
    adapt_ramp: float = Field(0.0, ge=0.0, le=1.0)
    # ours, not the paper's: weight of a match of X_{s~t}'s 3D log power spectrum to X_t's
    # (losses.spectrum_loss): second-order statistics of blur and noise, which the LR adversary
    # alone did not pin down (issue 19); 0: off
    lambda_spectrum: float = Field(0.0, ge=0.0)
    # ours, not the paper's: weight of a match of X_{s~t}'s noise level to X_t's (losses.noise_loss,
    # the finest Haar band): holds the spectrum match off its noise-and-blur ridge (issue 19); 0: off
    lambda_noise: float = Field(0.0, ge=0.0)
    # ours, not the paper's: weight of a penalty on every frequency the learned blur
    # (model.degradation: physics) amplifies (|H(k)| > 1, models/degradation.py `LearnedBlur.excess`):
    # no acquisition raises a frequency above what k-space truncation keeps. Without it the spectrum
    # match sharpened X_{s~t} where the source HR was smoother than the target's anatomy, and the SR
    # learned to blur (docs/quality.md "Real anatomy"); 0: off
    lambda_bound: float = Field(0.0, ge=0.0)
    # ours, not the paper's: weight of a prior toward no extra blur (`LearnedBlur.deficit`, mean
    # relu(1 - |H|)^2): unpaired spectra cannot tell a blurrier acquisition from a smoother anatomy,
    # and where the source HR was sharper than the target's anatomy the degradation learned a blur
    # the SR then undid on the target (docs/quality.md "Real anatomy"); 0: off
    lambda_prior: float = Field(0.0, ge=0.0)

    @model_serializer(mode="wrap")
    def _without_unset_new(self, handler):
        d = handler(self)  # runs made before these keys existed keep the config (and resume) they had
        if isinstance(d, dict):
            for k in ("lambda_bound", "lambda_prior"):
                if not getattr(self, k):
                    d.pop(k, None)
        return d

    @model_validator(mode="after")
    def _check(self) -> "LossConfig":
        if self.ssim_window % 2 == 0:
            raise ValueError("ssim_window must be odd")
        if any(w < 0 for w in self.lambdas):
            raise ValueError("lambdas must be >= 0")
        return self


# --------------------------------------------------------------------------- training (II-D)
TESTED_ZERO_STAGES = (0, 1)  # with fp32, bf16 and fp16: tests/udean/test_engines.py


class TrainConfig(Section):
    out: str = "runs/udean"
    epochs: int = Field(30, ge=1)
    steps_per_epoch: int = Field(0, ge=0)  # 0: one pass over the target LR patches
    batch_size: int = Field(8, ge=1)  # LR patches per batch, per rank
    lr: float = Field(1e-4, gt=0.0)
    lr_min: float = Field(1e-8, ge=0.0)
    # ours: learning rates of their own (null: `lr`), on the same cosine schedule, for the physics
    # degradation's few parameters (model.degradation: physics; blur taps and noise sigma, scaled to
    # move 1e-2 per step at 1e-3) and for the discriminators' engine. The SR network learns faster at
    # a higher lr than these tolerate (docs/quality.md "Real anatomy")
    lr_degradation: float | None = Field(None, gt=0.0)
    lr_discriminator: float | None = Field(None, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = Field(1e-8, gt=0.0)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    # DeepSpeed ZeRO stage of both engines, 0 or 1 (the stages the suite tests); null: 1 with
    # bf16 / fp16 (DeepSpeed's flat ZeRO optimizer: a few host syncs per step, where stage 0's
    # unfused fp16/bf16 wrapper syncs once per parameter), 0 with fp32 (torch's Adam unwrapped).
    # Measured: benchmarks/zero_precision.py, docs/performance.md
    zero_stage: int | None = Field(None, ge=0, validate_default=True)
    grad_clip: float = Field(0.0, ge=0.0)  # max global grad norm per engine; 0: off
    checkpoint_every: int = Field(500, ge=1)  # steps
    keep_last: int = Field(3, ge=1)
    max_nonfinite: int = Field(10, ge=1)  # consecutive skipped steps before stopping
    seed: int = 0
    # ours, not the paper's: a random in-plane transform of every patch (udean/data/sampler.py):
    # none; dihedral (8 flips / rotations; `true` in older configs); flips (4 flips, no transposes:
    # an anisotropic target, e.g. partial Fourier along one axis, keeps its axes)
    augment: Literal["none", "dihedral", "flips"] = "none"
    # the source HR patches' own choice (null: `augment`), e.g. dihedral source, flips target
    augment_source: Literal["none", "dihedral", "flips"] | None = None
    num_workers: int = Field(4, ge=0)
    log_every: int = Field(10, ge=1)
    val_every: int = Field(1, ge=0)  # epochs; 0: no validation
    val_subjects: int = Field(0, ge=0)  # 0: all val volumes
    # what chooses best/ (udean/steps.py `criterion`; the run's last line and best.json say which):
    # auto: psnr where a val volume's LR has the target's degradation (HCP and the synthetic cohort,
    # paired own scans), else learned where held-out HR exist, else last; psnr: val PSNR against HR;
    # learned: held-out HR degraded by the model's own learned degradation of that step, the previous
    # best rescored on the same LR; last: best/ = last/
    best_by: Literal["auto", "psnr", "learned", "last"] = "auto"
    # a plain progress line every N steps where the console is not a terminal (a batch job's log
    # file, where the progress bar shows nothing); 0: none
    progress_every: int = Field(100, ge=0)
    # udean/fidelity.py: how close X_{s~t} is to the target (and to the true degradation where
    # the data carry it), at step 1, every N steps and at the last into metrics.jsonl / TensorBoard; image summaries
    # (Y_s, X_{s~t}, X_t, SR of X_t) every M steps; 0: off
    fidelity_every: int = Field(0, ge=0)
    image_every: int = Field(0, ge=0)
    deterministic: bool = False
    # torch.backends.cudnn.benchmark during training (fixed patch shapes: cuDNN times its kernels
    # once and keeps the fastest); null: on, except with `deterministic`
    cudnn_benchmark: bool | None = Field(None, validate_default=True)
    # ours: torch.compile of every network's forward (the generator, each discriminator): less
    # host work per step where eager dispatch bounds a GPU (docs/performance.md, host_cost.py;
    # benchmarks/train_step.py bf16+compile times it); off until a GPU run shows it helps:
    # compiling takes minutes at the start of every run
    compile: bool = False
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # node-local disk to copy the shards to before the first step (one rank per node; checked by
    # the manifest's sha256) and read from ($SLURM_TMPDIR, /local/scratch/$USER: variables are
    # expanded on each node); null: read data.out (udean/data/stage.py, docs/hpc.md)
    stage_dir: str | None = None

    @model_serializer(mode="wrap")
    def _without_unset_lrs(self, handler):
        d = handler(self)  # runs made before these keys existed keep the config (and resume) they had
        if isinstance(d, dict):
            for k in ("lr_degradation", "lr_discriminator"):
                if getattr(self, k) is None:
                    d.pop(k, None)
        return d

    @field_validator("augment", "augment_source", mode="before")
    @classmethod
    def _augment_bool(cls, v):
        return {True: "dihedral", False: "none"}.get(v, v) if isinstance(v, bool) else v  # older configs

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.lr_min > self.lr:
            raise ValueError("lr_min must be <= lr")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError("betas must be in [0, 1)")
        return self

    @field_validator("zero_stage")
    @classmethod
    def _zero_stage(cls, stage: int | None, info: ValidationInfo) -> int:
        precision = info.data.get("precision", "bf16")
        default = 0 if precision == "fp32" else 1
        if stage is None:
            return default
        if stage not in TESTED_ZERO_STAGES:
            raise ValueError(f"ZeRO stage {stage} with train.precision={precision} is not tested by this suite: "
                             f"use 0 or 1 (null: {default} for {precision})")
        return stage

    @field_validator("cudnn_benchmark")
    @classmethod
    def _cudnn_benchmark(cls, on: bool | None, info: ValidationInfo) -> bool:
        deterministic = bool(info.data.get("deterministic", False))
        if on and deterministic:
            raise ValueError("true contradicts train.deterministic=true (cuDNN's timing may pick other kernels "
                             "in every run): set one of them false")
        return not deterministic if on is None else on


# --------------------------------------------------------------------------- inference
class InferConfig(Section):
    """The sliding window (udean/infer.py `Inferer`) of `udean infer`, `udean evaluate`,
    validation during training, the baselines and benchmarks/infer.py. The tile is the training
    patch (`data.patches.slab` x `lr_size`, of the config the network was trained with)."""

    overlap: float = Field(0.25, ge=0.0, lt=1.0)  # in-plane overlap of neighbouring tiles, fraction of the patch
    # LR slices shared by consecutive slabs; null: slab - 1 (stride 1, a slab centred on every slice)
    slab_overlap: int | None = Field(None, ge=0)
    # tiles per forward pass; 0: sized to the device (udean.infer.auto_batch_size: from free CUDA
    # memory and one tile's measured footprint; 8 on CPU)
    batch_size: int = Field(0, ge=0)
    amp: bool = False  # bf16 autocast of fp32 weights (GPU)
    # torch.backends.cudnn.benchmark while tiling (restored after); null: on, except under
    # torch.use_deterministic_algorithms (train.deterministic)
    cudnn_benchmark: bool | None = None
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # auto: cuda if available, else cpu
    # ours, 0 (the paper): off. The SR's spectrum below this fraction of the LR grid's Nyquist
    # frequency is the LR scan's (raised-cosine taper over 0.2 above it; preprocessing/kspace.py
    # `lr_consistent`): the network adds detail, it does not move what the LR measured
    lr_consistency: float = Field(0.0, ge=0.0, le=0.8)


class Config(Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    infer: InferConfig = InferConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """sha256 of the canonical JSON of the whole config."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- loading
CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped configs: package data
DEFAULT = "recommended"  # the config of every command and slurm script without --config (README "Which config")


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            allowed = _allowed_keys(parent)
            msg = f"unknown key; allowed keys here: {', '.join(allowed)}"
        elif e["type"] == "literal_error":
            msg = msg.replace("Input should be", "allowed values:")
        lines.append(f"config key '{key}': {msg} (got {e.get('input')!r})")
    if len(lines) == 1:  # the common case: one line, like every CLI error
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  " + "\n  ".join(lines)


def _allowed_keys(dotted: str) -> list[str]:
    model: type[BaseModel] = Config
    for part in [p for p in dotted.split(".") if p]:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"config key '{dotted}': '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003). The value is YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from None
    return key, value


def from_dict(tree: dict[str, Any], overrides: list[str] = ()) -> Config:
    tree = copy.deepcopy(tree or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    if cfg.data.split.preset == "paper":
        cfg.data.split.counts = (120, 120, 30, 30)
    return cfg


def _shipped(p: Path) -> Path | None:
    """The shipped config a name means (`demo`, `demo.yaml`, or `configs/demo.yaml`, its
    location before it became package data, as scripts still write it), or None."""
    shipped = CONFIG_DIR / (p.name if p.suffix else f"{p.name}.yaml")
    if shipped.exists() and (len(p.parts) == 1 or p.parent == Path("configs")):
        return shipped
    return None


def _shipped_names() -> str:
    return ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))


def resolve_path(name: str | os.PathLike) -> Path:
    """A config path, or a shipped config named by its name (`demo`, `demo.yaml`) or by its
    location before it became package data (`configs/demo.yaml`, as scripts still write it)."""
    p = Path(name)
    if p.exists():
        return p
    shipped = _shipped(p)
    if shipped is None:
        raise ConfigError(f"config file {str(name)!r} not found (shipped: {_shipped_names()})")
    return shipped


def _merge(base: dict, over: dict) -> dict:
    """`over` deep-merged onto `base`: mappings merge key by key, anything else (lists,
    scalars) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_tree(p: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML tree of config file `p` with its `base:` chain resolved (docs/architecture.md
    "Invariants"): the base (a shipped name, or a path relative to `p`), read the same way, with
    this file deep-merged over it; `base` itself is not part of the result."""
    if p.resolve() in chain:
        cycle = " -> ".join(str(q) for q in (*chain, p.resolve()))
        raise ConfigError(f"config file {p}: its base chain is a cycle: {cycle}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {p}: top level must be a mapping of sections")
    if "base" not in tree:
        return tree
    name = tree.pop("base")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"config file {p}: base must be a config name or path (got {name!r})")
    path = Path(name) if Path(name).is_absolute() else p.parent / name
    base = path if path.is_file() else _shipped(Path(name))
    if base is None:
        raise ConfigError(f"config file {p}: base {name!r} not found (no file {path}; shipped: {_shipped_names()})")
    return _merge(_read_tree(base, (*chain, p.resolve())), tree)


def load(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (or the defaults, the paper's values, when `path` is None), resolve its
    `base:` chain and apply overrides. The CLI's default is `DEFAULT` (udean/cli.py)."""
    tree = {} if path is None else _read_tree(resolve_path(path))
    return from_dict(tree, overrides)


def save(cfg: Config, path: str | os.PathLike) -> None:
    """Save the resolved config (YAML) next to an output."""
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
