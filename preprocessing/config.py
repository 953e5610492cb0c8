"""Preprocessing section of the one config tree (`data:` in udean/configs/*.yaml); see
udean/config.py for loading, overrides and the other sections. Paper, section II-C."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator


# x2 along every axis (paper: 2 x 2 x 2): the SR network's decoder doubles every axis, so the
# degradation must halve every axis. The one definition; `data.degradation.scale` must equal it.
SCALE = 2


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key."""


class Section(BaseModel):
    # allow_inf_nan=False: no config value is meaningful as inf or nan (train.lr=inf trained to NaN)
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- data (II-C)
class SplitConfig(Section):
    """Which subjects go to source / target / val / test (paper: 120/120/30/30)."""

    preset: Literal["paper", "counts", "ratios"] = "paper"
    # order: source, target, val, test. `paper` fixes counts to (120, 120, 30, 30).
    counts: tuple[int, int, int, int] = (120, 120, 30, 30)
    ratios: tuple[float, float, float, float] = (0.45, 0.45, 0.05, 0.05)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "SplitConfig":
        if any(c < 0 for c in self.counts):
            raise ValueError("counts must be >= 0")
        if any(r < 0 for r in self.ratios) or sum(self.ratios) > 1.0 + 1e-9:
            raise ValueError("ratios must be >= 0 and sum to at most 1")
        return self


class MixedRanges(Section):
    """Level `mixed`: every subject is its own "scanner", its effects drawn from these ranges
    (uniform; `elliptical` with probability `elliptical_p`) from (data.seed, subject)."""

    partial_fourier: tuple[float, float] = (0.625, 1.0)
    elliptical_p: float = Field(0.5, ge=0.0, le=1.0)
    noise_sigma: tuple[float, float] = (0.005, 0.02)
    slice_profile_fwhm: tuple[float, float] = (0.0, 3.0)

    @model_validator(mode="after")
    def _check(self) -> "MixedRanges":
        for key, lo_min, hi_max in (("partial_fourier", 0.5, 1.0), ("noise_sigma", 0.0, 1.0),
                                    ("slice_profile_fwhm", 0.0, 16.0)):
            lo, hi = getattr(self, key)
            if not lo_min <= lo <= hi <= hi_max:
                raise ValueError(f"{key} must be a range [lo, hi] with {lo_min} <= lo <= hi <= {hi_max}")
        return self


# the acquisition effects of each named level (issue 19; docs/shift.md "Degradation levels"):
# partial Fourier fraction (zero-filled, along partial_fourier_axis), elliptical k-space, complex
# noise sigma (of the max; Rician magnitude), Gaussian slice profile FWHM (HR voxels, slice axis)
LEVELS: dict[str, dict[str, float | bool]] = {
    "truncation": dict(partial_fourier=1.0, elliptical=False, noise_sigma=0.0, slice_profile_fwhm=0.0),
    "pf": dict(partial_fourier=0.75, elliptical=True, noise_sigma=0.0, slice_profile_fwhm=0.0),
    "pf_noise": dict(partial_fourier=0.75, elliptical=True, noise_sigma=0.01, slice_profile_fwhm=0.0),
    "psf": dict(partial_fourier=1.0, elliptical=False, noise_sigma=0.01, slice_profile_fwhm=3.0),
}
EFFECTS = ("partial_fourier", "elliptical", "noise_sigma", "slice_profile_fwhm")


class DegradationConfig(Section):
    """HR -> LR for the target group. Paper: 3D k-space truncation x2 per axis.

    `level` names a degradation (`LEVELS`; `mixed` draws one per subject from `mixed`); `custom`
    (the default) takes the effect fields as given. A named level sets the effect fields itself,
    so they must stay at their defaults there. `effects(rng)` is the one resolution of both."""

    method: Literal["kspace", "nearest"] = "kspace"
    scale: tuple[int, int, int] = (SCALE, SCALE, SCALE)  # must be (2, 2, 2): see SCALE
    level: Literal["custom", "truncation", "pf", "pf_noise", "psf", "mixed"] = "custom"
    # acquisition effects truncation misses (paper, introduction); off in the paper protocol
    partial_fourier: float = Field(1.0, ge=0.5, le=1.0)  # fraction of k-space lines kept
    partial_fourier_axis: int = Field(1, ge=0, le=2)
    elliptical: bool = False  # keep only the k-space ellipse in the two non-slice axes
    noise_sigma: float = Field(0.0, ge=0.0, le=1.0)  # complex Gaussian, relative to max
    # Gaussian slice profile (FWHM in HR voxels, along the slice axis) applied before truncation
    slice_profile_fwhm: float = Field(0.0, ge=0.0, le=16.0)
    mixed: MixedRanges = MixedRanges()  # level `mixed`: the ranges per-subject effects are drawn from
    # also store, for every source HR patch, its noise-free true degradation (dataset `truth`
    # in the source shard): what udean/fidelity.py compares X_{s~t} with
    truth: bool = False

    @model_validator(mode="after")
    def _check(self) -> "DegradationConfig":
        if tuple(self.scale) != (SCALE,) * 3:
            raise ValueError(f"scale must be {[SCALE] * 3}: the SR network is x{SCALE} along every axis")
        if self.level != "custom":
            set_ = [k for k in EFFECTS if getattr(self, k) != DegradationConfig.model_fields[k].default]
            if set_:
                raise ValueError(f"level {self.level!r} sets {', '.join(EFFECTS)} itself; got {', '.join(set_)} "
                                 "too: use level: custom to give the effects explicitly")
            if self.method != "kspace":
                raise ValueError(f"level {self.level!r} is a k-space degradation: method must be kspace")
        return self

    def effects(self, rng: np.random.Generator | None = None) -> "DegradationConfig":
        """A `custom` config with this level's effects (`mixed`: drawn with `rng`, the subject's
        own stream; preprocessing.subject.subject_degradation); `custom` returns itself."""
        if self.level == "custom":
            return self
        if self.level == "mixed":
            if rng is None:
                raise ValueError("level mixed draws its effects per subject: give the subject's rng")
            m = self.mixed
            vals = dict(partial_fourier=float(rng.uniform(*m.partial_fourier)),
                        elliptical=bool(rng.random() < m.elliptical_p),
                        noise_sigma=float(rng.uniform(*m.noise_sigma)),
                        slice_profile_fwhm=float(rng.uniform(*m.slice_profile_fwhm)))
        else:
            vals = LEVELS[self.level]
        return self.model_copy(update={"level": "custom", **vals})

    @model_serializer(mode="wrap")
    def _without_unset_new_keys(self, handler):
        # data sets made before levels existed keep the manifest config and hash they always had
        d = handler(self)
        if isinstance(d, dict):
            for k in ("level", "slice_profile_fwhm", "mixed", "truth"):
                if getattr(self, k) == DegradationConfig.model_fields[k].default:
                    d.pop(k, None)
        return d


class MotionConfig(Section):
    """Simulated patient motion for the misaligned source group (paper, II-C): drawn uniformly
    in [0, max] per subject."""

    rotation_deg: float = Field(2.0, ge=0.0, le=10.0)  # about Z and X
    translation_vox: float = Field(2.0, ge=0.0, le=10.0)  # RL and HF
    shrink_vox: float = Field(2.0, ge=0.0, le=10.0)  # AP and RL


class PatchConfig(Section):
    """LR patches `slab x H x W` (paper 3x64x64), HR patches `2*slab x 2H x 2W` (6x128x128)."""

    lr_size: tuple[int, int] = (64, 64)
    slab: int = Field(3, ge=1, le=16)
    slice_axis: int = Field(0, ge=0, le=2)  # the thin axis, in canonical (RAS) voxel order
    stride: tuple[int, int] = (32, 32)  # in-plane stride of LR patches
    slab_stride: int = Field(3, ge=1)
    foreground_threshold: float = Field(0.05, ge=0.0, le=1.0)
    min_foreground: float = Field(0.2, ge=0.0, le=1.0)  # fraction of the patch above threshold
    max_per_subject: int = Field(0, ge=0)  # 0: keep all
    # LR voxels of real context stored around every source HR patch (slab axis, in-plane), for
    # model.source_margin (the two must agree): HR patches 2 (slab + 2 m0) x 2 (h + 2 m1) x
    # 2 (w + 2 m1), cut from the volume edge-padded by 2 m voxels (past the volume's edge the
    # margin repeats its last voxel). Origins stay those of the centre patch.
    source_margin: tuple[int, int] = (0, 0)

    @model_validator(mode="after")
    def _check(self) -> "PatchConfig":
        if any(s < 4 for s in self.lr_size) or any(s < 1 for s in self.stride):
            raise ValueError("lr_size entries must be >= 4 and stride entries >= 1")
        if any(m < 0 for m in self.source_margin):
            raise ValueError("source_margin entries must be >= 0")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_margin(self, handler):
        d = handler(self)  # data sets made before margins existed keep their manifest config and hash
        if isinstance(d, dict) and not any(self.source_margin):
            d.pop("source_margin", None)
        return d


class StorageConfig(Section):
    dtype: Literal["float16", "uint16"] = "float16"
    compression: Literal["none", "gzip", "lz4", "zstd"] = "none"


class OwnDataConfig(Section):
    """Your own scans by role (README "Your own data"; docs/data-format.md "Own data"): HR
    research scans and authentic LR scans, unpaired. Used when `hr` or `dataset` is set; then
    `data.root` / `layout` / `split` are not. HR voxel: planned from the HR scans (`grid`), or
    `data.voxel_size_mm`; LR voxel: SCALE x it.

    Folders hold `*.nii` / `*.nii.gz` files directly; the subject id is the file name without
    the suffix, unique across roles. Paired val / test folders match HR and LR files by name."""

    hr: str = ""  # HR scans -> source (unpaired HR patches)
    lr: str = ""  # authentic LR scans -> target, used as acquired: no synthetic degradation
    val_hr: str = ""  # paired val scans: HR and LR folders, files matched by name
    val_lr: str = ""
    test_hr: str = ""  # paired test scans
    test_lr: str = ""
    dataset: str = ""  # a dataset.json naming the role folders (instead of the keys above)
    # HR scans of `hr` held out as (val, test) pairs with synthetic LR (data.degradation), for a
    # group without paired folders; labelled lr_source "synthetic" in the manifest and tables
    held_out: tuple[int, int] = (1, 1)
    # LR scans of `lr` also written as LR-only val volumes (they stay in training): validation
    # scores them by LR-consistency, which needs no HR; 0: none
    lr_val: int = Field(1, ge=0)
    # the HR grid: `planned` from the scans (preprocessing/plan.py: the median of the HR scans'
    # finest voxel sizes, written to data.voxel_size_mm of the data set's manifest), or
    # `voxel_size`: data.voxel_size_mm as given (--voxel-size sets it)
    grid: Literal["planned", "voxel_size"] = "planned"
    # a scan whose voxel size is off its role's grid (beyond data.voxel_tolerance_mm) is
    # resampled to it when no axis needs more than this factor (either way), else refused
    max_resample: float = Field(1.5, ge=1.0)
    # paired val/test HR onto their LR: world coordinates only (none), or then rigid
    # mutual-information registration (SimpleITK, as the baselines)
    registration: Literal["none", "rigid"] = "none"
    # intensities -> [0, 1]: percentile (lo = p[0] of all voxels, hi = p[1] of the head) or
    # minmax (the paper protocol's); inference applies the same per input and inverts it
    intensity: Literal["percentile", "minmax"] = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)

    @model_validator(mode="after")
    def _check(self) -> "OwnDataConfig":
        if any(n < 0 for n in self.held_out):
            raise ValueError("held_out entries must be >= 0")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError("percentiles must be 0 <= lo < hi <= 100")
        for g in ("val", "test"):
            if bool(getattr(self, f"{g}_hr")) != bool(getattr(self, f"{g}_lr")):
                raise ValueError(f"{g}_hr and {g}_lr go together (paired folders, files matched by name)")
        if self.dataset and any(getattr(self, k) for k in ROLE_KEYS):
            raise ValueError("give the role folders either as keys or in a dataset.json, not both")
        if not self.dataset and bool(self.hr) != bool(self.lr):
            raise ValueError("hr and lr go together: HR scans (source) and authentic LR scans (target)")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.hr or self.dataset)


ROLE_KEYS = ("hr", "lr", "val_hr", "val_lr", "test_hr", "test_lr")


class DataConfig(Section):
    root: str = ""  # HCP root or a flat folder of NIfTI files
    layout: Literal["hcp", "hcp_acpc", "flat"] = "hcp"
    out: str = "data/udean"
    mode: Literal["unpaired", "misaligned"] = "unpaired"
    # HR voxel (isotropic, mm): HCP's 0.7 for data.root; own data plans it from the scans unless
    # data.own.grid=voxel_size (preprocessing/plan.py)
    voxel_size_mm: float = Field(0.7, gt=0.0)
    voxel_tolerance_mm: float = Field(0.05, ge=0.0)
    seed: int = 0  # degradation noise / motion draws, per subject from (seed, subject)
    subjects_limit: int = Field(0, ge=0)  # 0: all discovered subjects
    split: SplitConfig = SplitConfig()
    degradation: DegradationConfig = DegradationConfig()
    motion: MotionConfig = MotionConfig()
    patches: PatchConfig = PatchConfig()
    storage: StorageConfig = StorageConfig()
    own: OwnDataConfig = OwnDataConfig()  # your own scans by role (unset: `root` by `layout`)

    @model_validator(mode="after")
    def _check_own(self) -> "DataConfig":
        if self.own.enabled and self.mode != "unpaired":
            raise ValueError("own data (data.own) is unpaired: data.mode must be unpaired")
        return self

    @model_serializer(mode="wrap")
    def _without_unset_own(self, handler):
        # a data set made without own scans keeps the manifest config and hash it always had
        d = handler(self)
        if isinstance(d, dict) and self.own == OwnDataConfig():
            d.pop("own", None)
        return d

    def hash(self) -> str:
        """sha256 of what decides shard content: the canonical JSON without `out` (shard paths
        are relative, so a moved output folder still resumes). Shards made under another hash
        are not reused."""
        d = self.model_dump(mode="json", exclude={"out"})
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A config tree (as a JSON dict) as {dotted key: value} over its leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def diff_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config trees (as JSON dicts), sorted."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        x, y, key = a.get(k), b.get(k), f"{prefix}{k}"
        if isinstance(x, dict) and isinstance(y, dict):
            out += diff_keys(x, y, f"{key}.")
        elif x != y:
            out.append(key)
    return out
