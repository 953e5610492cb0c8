"""`udean evaluate`: SR vs HR on the test volumes, as in the paper's Tables I / II.

For every paired volume of the group (default `test`, from the manifest):
    tricubic   cubic B-spline interpolation of LR onto the HR grid (Table II's first row)
    skip       (models with `model.image_skip`) the untrained start: the fixed x2 resampling through
               the same tiles, so the table shows what training added
    UDEAN      the trained SR network by the blended sliding window of `udean infer`
scored against HR with the suite's one PSNR (data range 1) and SSIM (2D Gaussian window, per
slice along the acquisition slice axis), from udean.metrics.

Alignment: all methods put SR voxel i at LR continuous index i / 2, the geometry of the
k-space degradation (preprocessing/kspace.py; udean/infer.py docstring), so a method is never
penalised for a sub-voxel shift.

Region (`--region`): `volume` (default) scores every HR voxel, background included, like the
paper's whole-volume numbers; `bbox` scores the bounding box of the head mask, which discounts
the empty background (lower PSNR, more telling SSIM).

mean +- std: std is the sample standard deviation over subjects (ddof=1; 0 for one subject).
Outputs under `--out` (default `<train.out>/eval`): results.json, results.md, and a figure per
subject (`--figures N`, the first N subjects) as fig_<subject>.png.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

TRICUBIC = "Tricubic interpolation"
SKIP = "Image skip alone"  # the model's untrained start: its fixed x2 resampling, tiled the same way
UDEAN = "UDEAN (ours)"
VOLUME_TAGS = {TRICUBIC: "tricubic", SKIP: "skip", UDEAN: "sr"}  # --save-volumes: <subject>_<tag>.nii.gz


# --------------------------------------------------------------------------- baseline
def tricubic(lr: np.ndarray, shape: tuple[int, int, int] | None = None, scale: int = 2) -> np.ndarray:
    """LR (X, Y, Z) -> cubic B-spline interpolation on the x`scale` grid, clipped to [0, 1].

    HR voxel i samples LR continuous index i / scale (the degradation's geometry); `shape`
    defaults to scale * lr.shape. Beyond the last LR voxel the edge value is extended.
    """
    from scipy import ndimage

    shape = tuple(scale * n for n in lr.shape) if shape is None else tuple(shape)
    out = ndimage.affine_transform(np.asarray(lr, dtype=np.float64), np.full(3, 1.0 / scale),
                                   output_shape=shape, order=3, mode="nearest")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def canonical(v: dict) -> dict:
    """A `preprocessing.shards.read_volume` dict (arrays slices first, their affines) -> the
    same with canonical (X, Y, Z) arrays and affines: the slice axis goes back to `slice_axis`."""
    ax = int(v.get("slice_axis", 0))
    perm = [ax] + [a for a in range(3) if a != ax]
    out = dict(v)
    for k in ("hr", "lr", "mask"):
        if v.get(k) is not None:
            out[k] = np.ascontiguousarray(np.moveaxis(np.asarray(v[k]), 0, ax))
    for k in ("hr_affine", "lr_affine"):
        if v.get(k) is not None:
            a = np.asarray(v[k], dtype=np.float64)
            out[k] = a.copy()
            out[k][:3, perm] = a[:3, :3]  # stored column i is canonical column perm[i]
    return out


# --------------------------------------------------------------------------- scores
def region_of(mask: np.ndarray | None, region: str, margin: int = 4) -> tuple[slice, slice, slice]:
    """Index of the scored region: the whole volume, or the head mask's bounding box + margin."""
    if region == "volume" or mask is None or not np.any(mask):
        return (slice(None),) * 3
    if region != "bbox":
        raise ValueError(f"--region {region!r}: allowed volume, bbox")
    out = []
    for ax in range(3):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != ax)))
        out.append(slice(max(0, hit[0] - margin), min(mask.shape[ax], hit[-1] + 1 + margin)))
    return tuple(out)


def score(pred: np.ndarray, hr: np.ndarray, *, slice_axis: int = 0, window: int = 7) -> dict[str, float]:
    """PSNR (dB, data range 1) and mean per-slice SSIM of `pred` vs `hr`, both (X, Y, Z)."""
    from udean.metrics import psnr, ssim

    a, b = torch.as_tensor(np.ascontiguousarray(pred, dtype=np.float32)), torch.as_tensor(np.ascontiguousarray(hr, dtype=np.float32))
    return {"psnr": float(psnr(a, b, data_range=1.0)), "ssim": float(ssim(a, b, window=window, slice_axis=slice_axis))}


@dataclass
class MethodResult:
    name: str
    subjects: list[dict] = field(default_factory=list)  # {"subject", "psnr", "ssim"}

    def stats(self, key: str) -> tuple[float, float]:
        v = np.array([s[key] for s in self.subjects], dtype=np.float64)
        return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0

    def to_dict(self) -> dict:
        (pm, ps), (sm, ss) = self.stats("psnr"), self.stats("ssim")
        return {"method": self.name, "psnr_mean": pm, "psnr_std": ps, "ssim_mean": sm, "ssim_std": ss,
                "n": len(self.subjects), "subjects": self.subjects}


def evaluate_volumes(volumes: Iterable[dict], methods: dict[str, Callable[[dict], np.ndarray]], *, region: str = "volume",
                     window: int = 7, on_volume: Callable[[dict, dict[str, np.ndarray], dict[str, dict]], None] | None = None,
                     progress: Callable[[str], None] | None = None) -> list[MethodResult]:
    """Score every method on every volume.

    volumes: canonical volume dicts (`canonical(read_volume(path))`): hr, lr, mask (X, Y, Z),
    slice_axis (SSIM slices are taken along it), subject;
    methods: name -> f(volume) -> prediction of hr's shape (the first is the table's first row);
    on_volume(volume, predictions, scores): called per volume (figures, NIfTI output).
    """
    results = {name: MethodResult(name) for name in methods}
    for vol in volumes:
        hr = np.asarray(vol["hr"], dtype=np.float32)
        box = region_of(vol.get("mask"), region)
        preds, scores = {}, {}
        for name, fn in methods.items():
            if progress is not None:
                progress(f"{vol['subject']}: {name}")
            pred = fn(vol)
            if pred.shape != hr.shape:
                raise ValueError(f"{name} on {vol['subject']}: prediction {pred.shape} != HR {hr.shape}")
            s = score(pred[box], hr[box], slice_axis=int(vol.get("slice_axis", 0)), window=window)
            results[name].subjects.append({"subject": vol["subject"], **s})
            preds[name], scores[name] = pred, s
        if on_volume is not None:
            on_volume(vol, preds, scores)
    return list(results.values())


# --------------------------------------------------------------------------- tables
def pm(mean: float, std: float, digits: int) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(results: list[MethodResult], meta: dict) -> str:
    lines = [f"# UDEAN evaluation: {meta.get('group', 'test')} set, {results[0].to_dict()['n'] if results else 0} subjects",
             "", f"x2 x2 x2 super-resolution; PSNR (data range 1) and SSIM (2D Gaussian window {meta.get('ssim_window', 7)}, "
             f"per slice) over the {'whole volume' if meta.get('region') == 'volume' else 'head-mask bounding box'}; "
             "mean ± sample std over subjects.", "",
             "| Method | SSIM | PSNR (dB) |", "|---|---|---|"]
    for r in results:
        d = r.to_dict()
        lines.append(f"| {r.name} | {pm(d['ssim_mean'], d['ssim_std'], 4)} | {pm(d['psnr_mean'], d['psnr_std'], 4)} |")
    lines += ["", "## Per subject", "", "| Subject | " + " | ".join(f"{r.name} SSIM | {r.name} PSNR" for r in results) + " |",
              "|---|" + "---|---|" * len(results)]
    for i, row in enumerate(results[0].subjects if results else []):
        cells = " | ".join(f"{r.subjects[i]['ssim']:.4f} | {r.subjects[i]['psnr']:.2f}" for r in results)
        lines.append(f"| {row['subject']} | {cells} |")
    lines += ["", f"checkpoint: `{meta.get('checkpoint', '')}`  ", f"data: `{meta.get('data', '')}`", ""]
    return "\n".join(lines)


def rich_table(results: list[MethodResult], title: str):
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    t.add_column("Method")
    t.add_column("Subject")
    t.add_column("SSIM", justify="right")
    t.add_column("PSNR (dB)", justify="right")
    for r in results:
        for s in r.subjects:
            t.add_row(r.name, s["subject"], f"{s['ssim']:.4f}", f"{s['psnr']:.2f}", style="dim")
    t.add_section()
    for r in results:
        d = r.to_dict()
        t.add_row(f"[bold]{r.name}[/]", f"mean ± std (n={d['n']})", pm(d["ssim_mean"], d["ssim_std"], 4),
                  pm(d["psnr_mean"], d["psnr_std"], 2))
    return t


def write_results(results: list[MethodResult], meta: dict, out: str | Path) -> tuple[Path, Path]:
    from hpc.atomic import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**meta, "methods": [r.to_dict() for r in results]}
    atomic_write_text(out / "results.json", json.dumps(doc, indent=1) + "\n")
    atomic_write_text(out / "results.md", markdown(results, meta))
    return out / "results.json", out / "results.md"


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="inference checkpoint (best/ folder, .pt file or run folder); default: <train.out>")
    p.add_argument("--data", default=None, help="preprocessed data folder with manifest.json; default: data.out")
    p.add_argument("--out", default=None, help="output folder; default: <train.out>/eval")
    p.add_argument("--group", default="test", choices=("test", "val"), help="paired volumes to score")
    p.add_argument("--region", default="volume", choices=("volume", "bbox"),
                   help="scored voxels: the whole volume, or the head mask's bounding box")
    p.add_argument("--limit", type=int, default=0, help="score only the first N volumes (0: all)")
    p.add_argument("--figures", type=int, default=1, help="comparison figures for the first N subjects")
    p.add_argument("--save-volumes", action="store_true", help="also write SR and tricubic NIfTIs (HR affine)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass")
    p.add_argument("--overlap", type=float, default=0.25, help="in-plane tile overlap, fraction of the patch")
    p.add_argument("--slab-overlap", type=int, default=None,
                   help="LR slices shared by consecutive slabs (default: slab - 1, a slab centred on every slice)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from preprocessing.manifest import load_manifest
    from preprocessing.shards import read_volume
    from udean.figures import comparison_figure
    from udean.infer import load_sr_model, pick_device, resolve_slab_overlap, super_resolve

    console = Console()
    cfg = args.cfg
    t0 = time.perf_counter()
    ckpt = Path(args.checkpoint or cfg.train.out)
    data = Path(args.data or cfg.data.out)
    out = Path(args.out or Path(cfg.train.out) / "eval")
    device = pick_device(args.device)
    net, run_cfg = load_sr_model(ckpt, device)
    patches = run_cfg.data.patches
    paths = load_manifest(data).volume_paths(args.group)
    if args.limit:
        paths = paths[:args.limit]
    if not paths:
        raise ValueError(f"{data}: no {args.group} volumes in the manifest")

    window = dict(overlap=args.overlap, slab_overlap=args.slab_overlap, batch_size=args.batch_size, device=device)

    def tiled(model):
        return lambda v: super_resolve(v["lr"], model, patches, slice_axis=int(v["slice_axis"]), **window)

    methods = {TRICUBIC: lambda v: tricubic(v["lr"], v["hr"].shape)}
    if run_cfg.model.image_skip:  # what training added: the same tiles through the bare skip
        from udean.models.layers import upsample2

        methods[SKIP] = tiled(upsample2)
    methods[UDEAN] = tiled(net)
    figures: list[Path] = []

    def on_volume(vol: dict, preds: dict, scores: dict) -> None:
        if len(figures) < args.figures:
            figures.append(comparison_figure(
                vol["hr"], preds, out / f"fig_{vol['subject']}.png", lr=vol["lr"], mask=vol.get("mask"),
                title=f"{vol['subject']} ({args.group}): sagittal and axial, x2x2x2",
                scores={k: (s["psnr"], s["ssim"]) for k, s in scores.items()}))
        if args.save_volumes:
            import nibabel as nib

            for name, pred in preds.items():
                tag = VOLUME_TAGS[name]
                (out / "volumes").mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(pred.astype(np.float32), vol["hr_affine"]), out / "volumes" / f"{vol['subject']}_{tag}.nii.gz")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]evaluate"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("", total=len(paths) * len(methods))

        def volumes():
            for p in paths:
                yield canonical(read_volume(p))

        def step(text: str) -> None:
            if bar.tasks[task].description:
                bar.advance(task)
            bar.update(task, description=text)

        results = evaluate_volumes(volumes(), methods, region=args.region, window=run_cfg.loss.ssim_window,
                                   on_volume=on_volume, progress=step)
        bar.update(task, completed=len(paths) * len(methods), description="done")

    meta = {"group": args.group, "region": args.region, "ssim_window": run_cfg.loss.ssim_window,
            "checkpoint": str(ckpt), "data": str(data), "device": str(device),
            "sliding_window": {"slab": patches.slab, "patch": list(patches.lr_size), "overlap": args.overlap,
                               "slab_overlap": resolve_slab_overlap(patches.slab, args.slab_overlap)},
            "seconds": round(time.perf_counter() - t0, 2)}
    js, md = write_results(results, meta, out)
    console.print(rich_table(results, f"{args.group} set: SR vs HR ({args.region})"))
    console.print(f"results: {js}\n         {md}")
    for f in figures:
        console.print(f"figure:  {f}")
    return 0
