"""`udean demo`: the whole suite end to end on a CPU in minutes, under one folder.

    udean demo                      # -> demo_out/: cohort/, data/, run/, eval/, config.yaml
    udean demo --out /tmp/d --quick # smallest everything (tests)

Stages, each with its own progress bar:
  1. cohort      synthetic subjects (`udean cohort`): real anatomy by default (`--anatomy mni`:
                 deformed copies of the ICBM152 2009 T1 template, 1 mm brains), or the procedural
                 phantom (`--anatomy phantom`: small full heads, 0.7 mm)
  2. preprocess  `mpirun -n 2 udean preprocess`: split, k-space degradation, patches -> HDF5
                 shards + manifest (MPI, one subject per task)
  3. train       `udean train`: UDEAN, unpaired, DeepSpeed (one process, or `--train-ranks N`
                 via torchrun)
  4. evaluate    `udean evaluate`: tricubic vs UDEAN on the held-out test subjects: rich table,
                 results.json / results.md, comparison figure (sagittal + axial, error maps)

The config is `configs/demo.yaml` (or `--config`) plus `key=value` overrides; the demo points
`data.root`, `data.out` and `train.out` into `--out` and saves the resolved config as
`<out>/config.yaml`, which every stage reads. Rerunning is cheap: the cohort is kept when its
size matches, preprocessing skips verified subjects and training resumes from its checkpoint
(already finished: nothing to do).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

from udean.commands import environment, executable

# --quick: the smallest run that still passes every stage (tests/udean/test_demo.py)
QUICK = [
    "data.split.counts=[2,2,1,1]", "data.patches.lr_size=[16,16]", "data.patches.stride=[8,8]",
    "data.patches.max_per_subject=16", "data.patches.min_foreground=0.1",
    "model.features=8", "model.n_groups=1", "model.n_rcab=1", "model.reduction=2", "model.encoder_layers=2",
    "model.disc_features=8", "model.disc_blocks=1",
    "train.epochs=1", "train.steps_per_epoch=4", "train.batch_size=2", "train.checkpoint_every=4", "train.log_every=1",
]
QUICK_SHAPE = (64, 64, 48)
QUICK_VOXEL_MM = 3.0  # --quick on the mni anatomy: the template's brain at 3 mm (about 54 x 66 x 58)
DEMO_SHAPE = (96, 96, 80)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.set_defaults(config="demo")
    p.description = f"{p.description}. --config defaults to the shipped demo config here."
    p.add_argument("--out", default="demo_out", help="everything goes here (default: demo_out/)")
    p.add_argument("--anatomy", choices=("mni", "phantom"), default="mni",
                   help="mni: real T1 brains made from the ICBM152 2009 template (1 mm, skull-stripped); phantom: "
                        "the procedural full-head phantom (0.7 mm, faster, what the tests use)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help=f"phantom only: volume size, 0.7 mm voxels (default {' '.join(map(str, DEMO_SHAPE))}; "
                        f"--quick: {' '.join(map(str, QUICK_SHAPE))}); mni: the template's brain box")
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks for preprocessing (default 2)")
    p.add_argument("--train-ranks", type=int, default=1, help="training processes (torchrun when > 1)")
    p.add_argument("--quick", action="store_true", help="smallest everything: a smoke test in about a minute")
    p.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")


class StageFailed(Exception):
    def __init__(self, what: str, rc: int):
        super().__init__(what)
        self.what, self.rc = what, rc


def _call(cmd: list[str], console, what: str, threads: int = 1) -> None:
    """A stage as a child process: `threads` OpenMP threads unless OMP_NUM_THREADS is set (MPI
    ranks get 1, so ranks do not fight over cores; training gets the cores)."""
    console.print(f"[dim]$ {' '.join(cmd)}[/]", highlight=False)
    rc = subprocess.call(cmd, env=environment(threads))
    if rc != 0:
        raise StageFailed(what, rc)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        return _run(args, console)
    except StageFailed as exc:  # the stage printed its own error above
        console.print(f"[bold red]udean demo: the {exc.what} stage failed (exit code {exc.rc}); "
                      f"fix it and rerun: finished stages are kept[/]", highlight=False)
        return exc.rc


def _run(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    from preprocessing.cohort import cohort_ready, cohort_shape, default_voxel_mm
    from udean.config import load, save

    t_all = time.perf_counter()
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    if args.anatomy == "mni":
        voxel = QUICK_VOXEL_MM if args.quick else default_voxel_mm("mni")
        shape = cohort_shape("mni", None if args.shape is None else tuple(args.shape), voxel)
    else:
        voxel = default_voxel_mm("phantom")
        shape = tuple(args.shape or (QUICK_SHAPE if args.quick else DEMO_SHAPE))
    overrides = (QUICK if args.quick else []) + list(args.overrides) + [
        f"data.root={out / 'cohort'}", "data.layout=hcp", f"data.voxel_size_mm={voxel}", f"data.out={out / 'data'}",
        f"train.out={out / 'run'}"]
    cfg = load(args.config or "demo", overrides)  # not args.cfg: the paths above must win
    if args.ranks < 1 or args.train_ranks < 1:
        raise ValueError("--ranks and --train-ranks must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    save(cfg, config)
    n = cfg.data.split.counts[:4]
    n_subjects = sum(n) if cfg.data.split.preset == "counts" else None
    if n_subjects is None:
        raise ValueError("the demo needs data.split.preset=counts (it makes exactly that many subjects)")
    timings: dict[str, float] = {}
    console.rule(f"[bold]UDEAN demo[/] -> {out}")
    console.print(f"{n_subjects} {args.anatomy} subjects {shape[0]}x{shape[1]}x{shape[2]} at {voxel:g} mm "
                  f"(source/target/val/test "
                  f"{'/'.join(map(str, n))}), {args.ranks} MPI ranks, {args.train_ranks} training process(es); "
                  f"config: {config}", highlight=False)

    # 1. cohort
    t = time.perf_counter()
    console.rule("[bold]1/4 synthetic cohort")
    root = out / "cohort"
    if cohort_ready(root, n_subjects, shape, voxel_mm=voxel):
        console.print(f"kept {root} ({n_subjects} subjects)")
    else:
        shutil.rmtree(root, ignore_errors=True)
        _call([executable("udean"), "cohort", "--anatomy", args.anatomy, "--n", str(n_subjects), "--out", str(root),
               *(["--shape", *map(str, shape)] if args.anatomy == "phantom" else []), "--voxel-mm", str(voxel),
               "--seed", str(cfg.data.split.seed)], console, "cohort")
    timings["cohort"] = time.perf_counter() - t

    # 2. preprocess (MPI)
    t = time.perf_counter()
    console.rule(f"[bold]2/4 preprocess (mpirun -n {args.ranks})")
    cmd = [executable("udean"), "preprocess", "--config", str(config)]
    if args.ranks > 1:
        cmd = [executable("mpirun"), "-n", str(args.ranks), "--oversubscribe", *cmd]
    _call(cmd, console, "preprocess")
    timings["preprocess"] = time.perf_counter() - t

    # 3. train (DeepSpeed)
    t = time.perf_counter()
    console.rule("[bold]3/4 train UDEAN (unpaired, DeepSpeed)")
    cmd = [executable("udean"), "train", "--config", str(config)]
    if args.train_ranks > 1:
        cmd = [executable("torchrun"), "--standalone", f"--nproc_per_node={args.train_ranks}", "-m", "udean",
               "train", "--config", str(config)]
    _call(cmd, console, "train", threads=(os.cpu_count() or 1) // args.train_ranks)
    timings["train"] = time.perf_counter() - t

    # 4. evaluate (in this process: the table prints here)
    t = time.perf_counter()
    console.rule("[bold]4/4 evaluate on the held-out test subjects")
    from udean.evaluate import SKIP, evaluate

    eval_out = out / "eval"
    results = evaluate(cfg, out / "run", out / "data", eval_out, console=console)
    timings["evaluate"] = time.perf_counter() - t
    total = time.perf_counter() - t_all

    import json

    methods = [r.to_dict() for r in results]
    base, ours = methods[0], methods[-1]
    summary = Table(title="demo summary", title_justify="left", show_header=False)
    summary.add_column(style="bold")
    summary.add_column()
    for k, v in timings.items():
        summary.add_row(f"{k} time", f"{v:.0f} s")
    summary.add_row("total time", f"{total:.0f} s")
    better = ours["psnr_mean"] > base["psnr_mean"] and ours["ssim_mean"] > base["ssim_mean"]
    summary.add_row("UDEAN - tricubic", f"{ours['psnr_mean'] - base['psnr_mean']:+.2f} dB PSNR, "
                    f"{ours['ssim_mean'] - base['ssim_mean']:+.4f} SSIM "
                    + ("[green](better on both)[/]" if better else "[yellow](not better on both)[/]"))
    if "psnr_head_mean" in ours:  # the anatomy alone: a noisy background rewards any denoising
        summary.add_row("UDEAN - tricubic, head", f"{ours['psnr_head_mean'] - base['psnr_head_mean']:+.2f} dB PSNR, "
                        f"{ours['ssim_head_mean'] - base['ssim_head_mean']:+.4f} SSIM")
    skip = next((m for m in methods if m["method"] == SKIP), None)
    if skip is not None:  # what training added over the model's untrained start
        summary.add_row("UDEAN - image skip alone", f"{ours['psnr_mean'] - skip['psnr_mean']:+.2f} dB PSNR, "
                        f"{ours['ssim_mean'] - skip['ssim_mean']:+.4f} SSIM")
    summary.add_row("table", f"{eval_out / 'results.md'}\n{eval_out / 'results.json'}")
    summary.add_row("figure", "\n".join(str(p) for p in sorted(eval_out.glob("fig_*.png"))))
    summary.add_row("checkpoint", str(out / "run" / "best"))
    summary.add_row("logs", str(out / "run" / "metrics.jsonl"))
    console.print(summary)
    from hpc.atomic import atomic_write_text

    atomic_write_text(out / "timings.json", json.dumps({**{k: round(v, 1) for k, v in timings.items()},
                                                        "total": round(total, 1), "sr_beats_tricubic": better}, indent=1))
    return 0
