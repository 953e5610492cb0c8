"""The one evaluator (`Evaluator`) and `udean evaluate`: SR vs HR on paired volumes, as in the
paper's Tables I / II.

`Evaluator` scores methods on `VolumePair`s (stored layout, slices first) and is what
validation during training (`udean.steps.validate`), `udean evaluate` (`evaluate`, below),
benchmarks/quality.py, benchmarks/demo_ablation.py and the baselines all run. Volumes are split
across ranks (`dist`) and the scores gathered on every rank. Each method maps a volume to a
prediction on the HR grid; every prediction is scored on the same voxels:

- grid: the HR voxels the LR volume covers (`score_grid`; an odd HR extent has no LR voxel
  for its last slice), the same for every method;
- regions (`REGIONS`), always the whole volume and the head, more on request: `volume` scores
  every voxel, background included, like the paper's whole-volume numbers; `head` the voxels
  inside the dilated head (`head_mask`, computed from the HR at evaluation time), where the
  anatomy is: a noisy background makes whole-volume scores reward denoising a threshold would
  also give, so decisions about a method are made on the head; `brain` (an extra) the brain
  mask the volume file stores (scans that came with one on their grid: the synthetic cohorts'
  T1w/brainmask_fs.nii.gz; volumes without one get no brain scores); `bbox` (an extra) the
  bounding box of the stored head mask (+ 4 voxels). Score keys: `psnr`, `ssim` (whole volume) and
  `psnr_<region>`, `ssim_<region>` for every other region;
- scores (`SCORES`): PSNR (dB, data range 1) and mean per-slice SSIM (2D Gaussian window, the
  loss's `ssim_window`, slices along the acquisition axis) from udean.metrics, the functions
  the training loss uses;
- LR scores (`LR_SCORES`), which need no HR: `lr_psnr`, the LR-consistency of the prediction
  (the SR decimated back to the LR grid with the model's own fixed decimation,
  `udean.models.layers.downsample2`, vs the LR; whole LR volume). An LR-only volume (an acquired
  LR scan without HR, own data) gets only these.
A new region or score is one entry in its table. Every row names where its LR came from
(`lr_source`: "synthetic", made from the HR by preprocessing, or "acquired").

`udean evaluate`, for every paired volume of the group (default `test`, from the manifest):
    tricubic   cubic B-spline interpolation of LR onto the HR grid (Table II's first row)
    skip       (models with `model.image_skip`) the untrained start: the fixed x2 resampling through
               the same tiles, so the table shows what training added
    UDEAN      the trained SR network through the `Inferer` of `udean infer`

Alignment: all methods put SR voxel i at LR continuous index i / 2, the geometry of the
k-space degradation (preprocessing/kspace.py; udean/infer.py docstring), so a method is never
penalised for a sub-voxel shift.

mean +- std: std is the sample standard deviation over subjects (ddof=1; 0 for one subject).
Outputs under `out` (default `<run>/eval`, the run the checkpoint belongs to: `udean.infer.run_folder`;
one writer at a time, `hpc.lock`): results.json, results.md, and a figure per subject (`figures`,
the first N subjects) as fig_<subject>.png. When UDEAN scores below tricubic, a warning line says
so and what that can mean.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from preprocessing.config import SCALE
from preprocessing.shards import VolumePair, read_volume
from udean.config import Config

TRICUBIC = "Tricubic interpolation"
SKIP = "Image skip alone"  # the model's untrained start: its fixed x2 resampling, tiled the same way
UDEAN = "UDEAN (ours)"
VOLUME_TAGS = {TRICUBIC: "tricubic", SKIP: "skip", UDEAN: "sr"}  # --save-volumes: <subject>_<tag>.nii.gz

Method = Callable[[VolumePair], np.ndarray]  # volume -> prediction on its HR grid, stored layout
Box = tuple[slice, slice, slice]


# --------------------------------------------------------------------------- baseline
def tricubic(lr: np.ndarray, shape: tuple[int, int, int] | None = None, scale: int = SCALE) -> np.ndarray:
    """LR (D, H, W) -> cubic B-spline interpolation on the x`scale` grid, clipped to [0, 1].

    HR voxel i samples LR continuous index i / scale (the degradation's geometry); `shape`
    defaults to scale * lr.shape. Beyond the last LR voxel the edge value is extended.
    """
    from scipy import ndimage

    shape = tuple(scale * n for n in lr.shape) if shape is None else tuple(shape)
    out = ndimage.affine_transform(np.asarray(lr, dtype=np.float64), np.full(3, 1.0 / scale),
                                   output_shape=shape, order=3, mode="nearest")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------- regions and scores
def whole(mask: np.ndarray) -> Box:
    """Every voxel, background included (the paper's whole-volume numbers)."""
    return (slice(None),) * 3


def bbox(mask: np.ndarray, margin: int = 4) -> Box:
    """The head mask's bounding box + `margin` voxels (the whole volume without a mask)."""
    if not np.any(mask):
        return whole(mask)
    out = []
    for ax in range(3):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != ax)))
        out.append(slice(max(0, hit[0] - margin), min(mask.shape[ax], hit[-1] + 1 + margin)))
    return tuple(out)


def head_mask(hr: np.ndarray, smooth: float = 1.0, threshold: float = 0.05, dilate: int = 3) -> np.ndarray:
    """bool (D, H, W) head of an HR volume in [0, 1]: HR smoothed (Gaussian, `smooth` voxels, so
    Rician background noise stays below the threshold), > `threshold`, the largest connected
    component, holes filled, dilated by `dilate` voxels (the scalp's edge belongs to the head).

    Not the stored mask of the volume files (`preprocessing.subject.head_mask`, thresholded raw
    HR and closed): on the synthetic cohort its closing joins background-noise voxels and it
    covers ~93 % of the volume; this one 33-42 % (issue 19's measurements)."""
    from scipy import ndimage

    m = ndimage.gaussian_filter(np.asarray(hr, dtype=np.float32), smooth) > threshold
    lab, n = ndimage.label(m)
    if n > 1:
        m = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    m = ndimage.binary_fill_holes(m)
    return ndimage.binary_dilation(m, iterations=dilate) if dilate else m


Scored = tuple[Box, "np.ndarray | None"]  # the box scored, and inside it the voxels (None: all)


def _volume(hr: np.ndarray, vol: VolumePair, grid: Box) -> Scored | None:
    return whole(hr), None


def _in(m: np.ndarray) -> Scored:
    box = bbox(m)  # the SSIM windows of voxels at the mask's edge stay inside the box (margin 4 > 3)
    return box, m[box]


def _head(hr: np.ndarray, vol: VolumePair, grid: Box) -> Scored | None:
    return _in(head_mask(hr))


def _brain(hr: np.ndarray, vol: VolumePair, grid: Box) -> Scored | None:
    return None if vol.brain is None else _in(vol.brain[grid].astype(bool))


def _bbox(hr: np.ndarray, vol: VolumePair, grid: Box) -> Scored | None:
    return bbox(vol.mask[grid]), None


# name -> (what it is, f(HR on the score grid, the volume, the score grid) -> (scored box, voxels
# in it), or None where the volume has no such region: no scores of it for that volume)
REGIONS: dict[str, tuple[str, Callable[[np.ndarray, VolumePair, Box], Scored | None]]] = {
    "volume": ("whole volume", _volume),
    "head": ("dilated head mask", _head),
    "brain": ("brain mask (volumes that have one)", _brain),
    "bbox": ("head-mask bounding box", _bbox),
}
ALWAYS = ("volume", "head")  # the regions every table reports


def _psnr(pred: torch.Tensor, hr: torch.Tensor, window: int, voxels: torch.Tensor | None) -> float:
    from udean.metrics import psnr

    if voxels is not None:
        pred, hr = pred[voxels], hr[voxels]
    return float(psnr(pred, hr, data_range=1.0))


def _ssim(pred: torch.Tensor, hr: torch.Tensor, window: int, voxels: torch.Tensor | None) -> float:
    from udean.metrics import ssim

    if voxels is None:
        return float(ssim(pred, hr, window=window))  # (D, H, W): a stack of D slices along the slice axis
    smap = ssim(pred, hr, window=window, reduction="map")  # (D, H - w + 1, W - w + 1): window centres
    h = window // 2
    return float(smap[voxels[:, h:voxels.shape[1] - h, h:voxels.shape[2] - h]].mean())


# name -> f(prediction, HR, SSIM window, voxels: bool mask or None) -> float, slices first
SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor | None], float]] = {
    "psnr": _psnr, "ssim": _ssim}


def _lr_psnr(pred: torch.Tensor, lr: torch.Tensor) -> float:
    from udean.metrics import psnr
    from udean.models.layers import downsample2

    back = downsample2(pred[None])[0]
    n = tuple(min(a, b) for a, b in zip(back.shape, lr.shape))
    return float(psnr(back[:n[0], :n[1], :n[2]], lr[:n[0], :n[1], :n[2]], data_range=1.0))


# name -> f(prediction on the x2 grid, LR) -> float: scores that need no HR
LR_SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {"lr_psnr": _lr_psnr}
SCORE_NAMES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lr_psnr": "LR-consistency PSNR (dB)"}


def score(pred: np.ndarray, hr: np.ndarray, *, window: int = 7, voxels: np.ndarray | None = None,
          device: str | torch.device = "cpu") -> dict[str, float]:
    """Every score of `pred` vs `hr`, both (D, H, W) slices first; `voxels` (bool, same shape):
    only those (SSIM: the mean of its map over them), None: all; computed on `device`."""
    a = torch.as_tensor(np.ascontiguousarray(pred, dtype=np.float32), device=device)
    b = torch.as_tensor(np.ascontiguousarray(hr, dtype=np.float32), device=device)
    v = None if voxels is None else torch.as_tensor(np.asarray(voxels, dtype=bool), device=device)
    return {name: fn(a, b, window, v) for name, fn in SCORES.items()}


def score_key(name: str, region: str) -> str:
    """`psnr` for the whole volume, `psnr_head` for the head region, ..."""
    return name if region == "volume" else f"{name}_{region}"


def score_grid(vol: VolumePair) -> Box:
    """The HR voxels every prediction is scored on: those the LR volume covers (x2 its shape),
    i.e. all of HR unless an HR extent is odd (an LR-only volume: the whole x2 grid)."""
    if vol.hr is None:
        return tuple(slice(0, SCALE * n) for n in vol.lr.shape)
    return tuple(slice(0, min(SCALE * n, m)) for n, m in zip(vol.lr.shape, vol.hr.shape))


def hr_grid_shape(vol: VolumePair) -> tuple[int, int, int]:
    """The shape of a prediction of `vol`: its HR's, or x2 the LR's for an LR-only volume."""
    return tuple(vol.hr.shape) if vol.hr is not None else tuple(SCALE * n for n in vol.lr.shape)


# --------------------------------------------------------------------------- the evaluator
@dataclass
class MethodResult:
    name: str
    # {"subject", "lr_source", "psnr", "ssim", "lr_psnr"}, in volume order (LR-only volumes: no psnr / ssim)
    subjects: list[dict] = field(default_factory=list)

    def mean(self, key: str) -> float:
        """Mean over the subjects that have `key`, summed in volume order (what validation
        logs); NaN when none has it."""
        v = [s[key] for s in self.subjects if key in s]
        return sum(v, 0.0) / len(v) if v else float("nan")

    def stats(self, key: str) -> tuple[float, float]:
        v = np.array([s[key] for s in self.subjects if key in s], dtype=np.float64)
        if not len(v):
            return float("nan"), float("nan")
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

    def keys(self) -> list[str]:
        """The score keys of the rows (psnr, ssim, psnr_head, ..., lr_psnr), in order of first use."""
        return list(dict.fromkeys(k for s in self.subjects for k in s if k not in ("subject", "lr_source")))

    def to_dict(self) -> dict:
        d: dict = {"method": self.name}
        for key in self.keys() or [*SCORES, *LR_SCORES]:
            d[f"{key}_mean"], d[f"{key}_std"] = self.stats(key)
        return {**d, "n": len(self.subjects), "n_hr": sum("psnr" in s for s in self.subjects),
                "lr_sources": lr_sources(self.subjects), "subjects": self.subjects}


def lr_sources(rows: list[dict]) -> dict[str, int]:
    """How many rows have each LR source ("synthetic" / "acquired")."""
    out: dict[str, int] = {}
    for r in rows:
        out[r.get("lr_source", "synthetic")] = out.get(r.get("lr_source", "synthetic"), 0) + 1
    return out


OnVolume = Callable[[VolumePair, dict[str, np.ndarray], dict[str, dict]], None]


class Evaluator:
    """Scores `methods` (name -> f(volume) -> prediction of the HR grid; the first is the table's
    first row) on paired volumes: the whole volume and the head (`ALWAYS`) and any `regions`
    more (keys of REGIONS), SSIM `window`, computed on `device` (validation: the training
    device, not the CPU: SSIM of a whole volume is seconds of CPU time)."""

    def __init__(self, methods: dict[str, Method], *, regions: Sequence[str] = (), window: int = 7,
                 device: str | torch.device = "cpu"):
        bad = [r for r in regions if r not in REGIONS]
        if bad:
            raise ValueError(f"region {bad[0]!r}: allowed {', '.join(REGIONS)}")
        self.methods, self.window, self.device = dict(methods), window, torch.device(device)
        self.regions = list(dict.fromkeys((*ALWAYS, *regions)))

    def score_volume(self, vol: VolumePair, progress: Callable[[str], None] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
        """Every method on one volume -> ({name: prediction}, {name: scores of every region})."""
        grid = score_grid(vol)
        hr = None if vol.hr is None else np.asarray(vol.hr, dtype=np.float32)
        scored = {} if hr is None else {r: REGIONS[r][1](hr[grid], vol, grid) for r in self.regions}
        scored = {r: v for r, v in scored.items() if v is not None}
        lr = torch.as_tensor(np.ascontiguousarray(vol.lr, dtype=np.float32), device=self.device)
        preds, scores = {}, {}
        for name, fn in self.methods.items():
            if progress is not None:
                progress(f"{vol.subject}: {name}")
            pred = fn(vol)
            if pred.shape not in (hr_grid_shape(vol), tuple(SCALE * n for n in vol.lr.shape)):
                raise ValueError(f"{name} on {vol.subject}: prediction {pred.shape} is neither the HR grid "
                                 f"{hr_grid_shape(vol)} nor x{SCALE} the LR grid {vol.lr.shape}")
            preds[name] = pred
            scores[name] = {}
            for r, (box, voxels) in scored.items():
                got = score(pred[grid][box], hr[grid][box], window=self.window, voxels=voxels, device=self.device)
                scores[name].update({score_key(k, r): v for k, v in got.items()})
            p = torch.as_tensor(np.ascontiguousarray(pred[grid], dtype=np.float32), device=self.device)
            scores[name].update({k: fn_lr(p, lr) for k, fn_lr in LR_SCORES.items()})
        return preds, scores

    def run(self, volumes: Sequence[VolumePair | str | os.PathLike], dist=None, *, on_volume: OnVolume | None = None,
            progress: Callable[[str], None] | None = None) -> list[MethodResult]:
        """Score every method on every volume (VolumePairs or volume files, read when scored).

        dist: an hpc.dist.Dist (None: this process alone); rank r scores volumes r, r + world, ...
        and every rank returns all rows, in volume order. on_volume(volume, predictions, scores)
        runs on the rank that scored the volume (figures, NIfTI output)."""
        rank, world = (0, 1) if dist is None else (dist.rank, dist.world_size)
        mine = []
        for i in range(rank, len(volumes), world):
            vol = volumes[i] if isinstance(volumes[i], VolumePair) else read_volume(volumes[i])
            preds, scores = self.score_volume(vol, progress)
            mine.append((i, vol.subject, vol.lr_source, scores))
            if on_volume is not None:
                on_volume(vol, preds, scores)
        rows = mine
        if dist is not None and world > 1:
            gathered = dist.gather_object(mine)
            rows = dist.broadcast_object(sorted((r for part in gathered for r in part), key=lambda r: r[0])
                                         if dist.rank == 0 else None)
        results = {name: MethodResult(name) for name in self.methods}
        for _, subject, source, scores in rows:
            for name, s in scores.items():
                results[name].subjects.append({"subject": subject, "lr_source": source, **s})
        return list(results.values())


# --------------------------------------------------------------------------- tables
def pm(mean: float, std: float, digits: int) -> str:
    """`mean ± std` at `digits` decimals: every table of the suite writes numbers this way."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def region_columns(regions: Sequence[str]) -> list[tuple[str, str, int]]:
    """(score key, column title, decimals) of SSIM and PSNR for every region, then the LR
    scores, in table order."""
    cols = []
    for r in regions:
        tag = "" if r == "volume" else f" ({r})"
        cols += [(score_key("ssim", r), f"SSIM{tag}", 4), (score_key("psnr", r), f"PSNR{tag} (dB)", 2)]
    return cols + [(k, SCORE_NAMES[k], 2) for k in LR_SCORES]


def describe_lr(sources: dict[str, int]) -> str:
    """Where the LR came from, for table headers: "LR: 2 synthetic (made from the HR), 1 acquired"."""
    text = {"synthetic": "synthetic (made from the HR by preprocessing)", "acquired": "acquired (authentic scans)"}
    return "LR: " + ", ".join(f"{n} {text.get(k, k)}" for k, n in sorted(sources.items()))


def _cell(x: float, digits: int) -> str:
    return "–" if not np.isfinite(x) else f"{x:.{digits}f}"


def _pm(d: dict, key: str, digits: int) -> str:
    return pm(d[f"{key}_mean"], d[f"{key}_std"], digits) if np.isfinite(d.get(f"{key}_mean", np.nan)) else "–"


def markdown(results: list[MethodResult], meta: dict) -> str:
    regions = meta.get("regions", list(ALWAYS))
    cols = region_columns(regions)
    d0 = results[0].to_dict() if results else {"n": 0, "lr_sources": {}}
    lines = [f"# UDEAN evaluation: {meta.get('group', 'test')} set, {d0['n']} subjects",
             "", f"x2 x2 x2 super-resolution; PSNR (data range 1) and SSIM (2D Gaussian window {meta.get('ssim_window', 7)}, "
             "per slice) over " + ", ".join(f"the {REGIONS[r][0]} ({r})" for r in regions) + "; "
             "mean ± sample std over subjects. The head region is where the anatomy is: a noisy background "
             "makes whole-volume scores reward denoising a threshold would also give. LR-consistency: the SR "
             f"decimated back vs the LR (no HR needed). {describe_lr(d0['lr_sources'])}.", "",
             "| Method | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for r in results:
        d = r.to_dict()
        lines.append(f"| {r.name} | " + " | ".join(_pm(d, k, n) for k, _, n in cols) + " |")
    lines += ["", "## Per subject", "", "| Subject | LR | " + " | ".join(f"{r.name} {c[1]}" for r in results for c in cols)
              + " |", "|---|---|" + "---|" * (len(cols) * len(results))]
    for i, row in enumerate(results[0].subjects if results else []):
        cells = " | ".join(_cell(r.subjects[i].get(k, np.nan), n) for r in results for k, _, n in cols)
        lines.append(f"| {row['subject']} | {row.get('lr_source', 'synthetic')} | {cells} |")
    lines += ["", f"checkpoint: `{meta.get('checkpoint', '')}`  ", f"data: `{meta.get('data', '')}`", ""]
    return "\n".join(lines)


def rich_table(results: list[MethodResult], title: str, regions: Sequence[str] = ALWAYS):
    from rich.table import Table

    cols = region_columns(regions)
    t = Table(title=title, title_justify="left")
    t.add_column("Method")
    t.add_column("Subject")
    for _, name, _ in cols:
        t.add_column(name, justify="right")
    t.add_column("LR")
    for r in results:
        for s in r.subjects:
            t.add_row(r.name, s["subject"], *(_cell(s.get(k, np.nan), n) for k, _, n in cols),
                      s.get("lr_source", "synthetic"), style="dim")
    t.add_section()
    for r in results:
        d = r.to_dict()
        t.add_row(f"[bold]{r.name}[/]", f"mean ± std (n={d['n']})", *(_pm(d, k, n) for k, _, n in cols),
                  describe_lr(d["lr_sources"])[4:])
    return t


def write_results(results: list[MethodResult], meta: dict, out: str | Path) -> tuple[Path, Path]:
    from hpc.atomic import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "methods": [r.to_dict() for r in results]}
    atomic_write_text(out / "results.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(out / "results.md", markdown(results, meta))
    return out / "results.json", out / "results.md"


# --------------------------------------------------------------------------- udean evaluate
def evaluate(cfg: Config, checkpoint: str | Path | None = None, data: str | Path | None = None,
             out: str | Path | None = None, *, group: str = "test", regions: Sequence[str] = (), limit: int = 0,
             figures: int = 1, save_volumes: bool = False, console=None) -> list[MethodResult]:
    """Tricubic, the untrained image skip and the trained network of `checkpoint` (default
    `cfg.train.out`) on the `group` volumes of `data` (default: the data set the checkpoint's run
    trained on, its `data.out`), scored on the whole volume, the head and any `regions` more;
    writes results.json / results.md / figures under `out` (default `<run>/eval`, the
    checkpoint's own run, holding that folder's lock), prints the table and a warning when
    UDEAN scores below tricubic.

    The window is `cfg.infer` with the checkpoint's training patch; SSIM uses the checkpoint's
    `loss.ssim_window`."""
    from hpc.lock import folder_lock
    from udean.infer import load_sr_model, pick_device, run_folder

    ckpt = Path(checkpoint or cfg.train.out)
    device = pick_device(cfg.infer.device)
    net, run_cfg = load_sr_model(ckpt, device)
    data = Path(data or run_cfg.data.out)
    out = Path(out or run_folder(ckpt) / "eval")
    with folder_lock(out, "udean evaluate"):
        return _evaluate(cfg, ckpt, net, run_cfg, device, data, out, group=group, regions=regions, limit=limit,
                         figures=figures, save_volumes=save_volumes, console=console)


def _evaluate(cfg: Config, ckpt: Path, net, run_cfg: Config, device, data: Path, out: Path, *, group: str,
              regions: Sequence[str], limit: int, figures: int, save_volumes: bool, console) -> list[MethodResult]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from preprocessing.manifest import load_manifest
    from udean.figures import volume_figure
    from udean.infer import Inferer

    console = console or Console()
    t0 = time.perf_counter()
    inferer = Inferer.from_config(cfg.infer, run_cfg.data.patches, device)
    manifest = load_manifest(data)
    paths = manifest.volume_paths(group)
    if limit:
        paths = paths[:limit]
    if not paths:
        raise ValueError(f"{data}: no {group} volumes in the manifest")

    def tiled(model) -> Method:
        return lambda v: inferer(v.lr, model)

    methods: dict[str, Method] = {TRICUBIC: lambda v: tricubic(v.lr, hr_grid_shape(v))}
    if run_cfg.model.image_skip:  # what training added: the same tiles through the bare skip
        from udean.models.layers import upsample2

        methods[SKIP] = tiled(upsample2)
    methods[UDEAN] = tiled(net)
    shown: list[Path] = []

    def on_volume(vol: VolumePair, preds: dict, scores: dict) -> None:
        if len(shown) < figures and vol.hr is not None:
            shown.append(volume_figure(vol, preds, out / f"fig_{vol.subject}.png", scores=scores,
                                       title=f"{vol.subject} ({group}, LR {vol.lr_source}): sagittal and axial, x2x2x2"))
        if save_volumes:
            import nibabel as nib

            (out / "volumes").mkdir(parents=True, exist_ok=True)
            for name, pred in preds.items():
                nib.save(nib.Nifti1Image(vol.to_canonical(pred).astype(np.float32), vol.canonical.hr_affine),
                         out / "volumes" / f"{vol.subject}_{VOLUME_TAGS[name]}.nii.gz")

    with Progress(TextColumn("[bold]evaluate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("", total=len(paths) * len(methods))

        def step(text: str) -> None:
            if bar.tasks[task].description:
                bar.advance(task)
            bar.update(task, description=text)

        evaluator = Evaluator(methods, regions=regions, window=run_cfg.loss.ssim_window, device=device)
        results = evaluator.run(paths, on_volume=on_volume, progress=step)
        bar.update(task, completed=len(paths) * len(methods), description="done")

    below = below_tricubic(results, own=bool(manifest.config.get("own")))
    meta = {"group": group, "regions": evaluator.regions, "ssim_window": run_cfg.loss.ssim_window,
            "lr_sources": lr_sources(results[0].subjects) if results else {},
            "checkpoint": str(ckpt), "data": str(data), "device": str(device),
            "sliding_window": inferer.settings(), "seconds": round(time.perf_counter() - t0, 2),
            "sr_below_tricubic": below is not None}
    js, md = write_results(results, meta, out)
    console.print(rich_table(results, f"{group} set: SR vs HR ({', '.join(evaluator.regions)})", evaluator.regions))
    console.print(describe_lr(meta["lr_sources"]))  # also when a narrow terminal squeezes the LR column
    console.print(f"results: {js}\n         {md}")
    for f in shown:
        console.print(f"figure:  {f}")
    if below:
        console.print(f"[bold yellow]warning:[/] {below}", highlight=False)
    return results


def below_tricubic(results: list[MethodResult], own: bool = False) -> str | None:
    """The warning when UDEAN's PSNR (in the head where scored, else the whole volume) is below
    tricubic's, saying what it can mean; None otherwise. `own`: the data set is own scans."""
    by = {r.name: r for r in results}
    if TRICUBIC not in by or UDEAN not in by:
        return None
    key = next((k for k in ("psnr_head", "psnr") if np.isfinite(by[UDEAN].mean(k))), None)
    if key is None or by[UDEAN].mean(key) >= by[TRICUBIC].mean(key):
        return None
    where = "in the head" if key == "psnr_head" else "over the whole volume"
    text = (f"UDEAN scores below tricubic interpolation {where} ({by[UDEAN].mean(key):.2f} vs "
            f"{by[TRICUBIC].mean(key):.2f} dB PSNR)")
    if own and lr_sources(by[UDEAN].subjects).get("synthetic"):
        return (text + ": this LR is synthetic (made from the HR by k-space truncation), not your scanner's; a model "
                "adapted to your LR scans is not meant to win on it; paired scans (--test-hr/--test-lr) measure it")
    return text + ": check which criterion chose best/ (best.json 'by'), evaluate last/, or train longer"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from udean.infer import add_inferer_arguments

    p.add_argument("--checkpoint", default=None,
                   help="inference checkpoint (best/ folder, .pt file or run folder); default: <train.out>")
    p.add_argument("--data", default=None,
                   help="preprocessed data folder with manifest.json; default: the data.out the checkpoint's run trained on")
    p.add_argument("--out", default=None, help="output folder; default: <run>/eval, the checkpoint's own run")
    p.add_argument("--group", default="test", choices=("test", "val"), help="paired volumes to score")
    p.add_argument("--region", action="append", default=[], choices=tuple(REGIONS),
                   help="a region scored besides the whole volume and the head (always both); repeatable: "
                   + ", ".join(f"{k} ({v[0]})" for k, v in REGIONS.items()))
    p.add_argument("--limit", type=int, default=0, help="score only the first N volumes (0: all)")
    p.add_argument("--figures", type=int, default=1, help="comparison figures for the first N subjects")
    p.add_argument("--save-volumes", action="store_true", help="also write SR and tricubic NIfTIs (HR affine)")
    add_inferer_arguments(p)


def run(args: argparse.Namespace) -> int:
    from udean.infer import inferer_config

    cfg = args.cfg.model_copy(update={"infer": inferer_config(args)})
    evaluate(cfg, args.checkpoint, args.data, args.out, group=args.group, regions=args.region, limit=args.limit,
             figures=args.figures, save_volumes=args.save_volumes)
    return 0
