"""The plan of a preprocessing run, before any work: each role's voxel grid, what every scan
gets on the way (kept / resampled / refused) and how intensities are scaled. `udean preprocess`
prints its summary first; `udean preprocess --plan` prints it with one row per scan and stops.

Own data takes its grid from the scans, as nnU-Net plans its target spacing from the data set
(`data.own.grid: planned`, the default): the HR voxel is the median, over the scans of the HR
folder, of each scan's finest voxel size (isotropic: as fine as most scans were acquired, so no
HR scan is interpolated onto a grid finer than its own), the LR voxel SCALE x that. The LR
folder's median (of the same measure) must be about SCALE x the HR voxel, within `PLAN_RATIO`
either way (the network is x2 on every axis); otherwise the job stops before any work, naming
both sizes and the `--voxel-size` that would fit. `--voxel-size` (`data.own.grid: voxel_size`)
sets the HR voxel instead. The planned voxel becomes `data.voxel_size_mm` of the config the
manifest records, so training, its checkpoints and `udean infer` use that grid.

A scan's verdict is `geometry.check_voxels` on the voxel sizes of its header, the test the
loader makes. HCP layouts keep `data.voxel_size_mm` (0.7 mm); their scans are not opened here.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field

import numpy as np

from preprocessing import geometry, intensity
from preprocessing.config import SCALE, DataConfig
from preprocessing.discover import Subject
from preprocessing.nifti import header_voxel, scan_spec

PLAN_RATIO = 1.25  # the LR folder's voxel may be SCALE x the HR's within this factor either way


@dataclass
class ScanPlan:
    subject: str
    group: str
    role: str  # "HR" / "LR"
    path: str
    voxel: tuple[float, ...] | None  # from the header; None: unreadable
    gets: str  # "kept", "resampled", "refused"
    why: str = ""


@dataclass
class Plan:
    hr_voxel: float
    how: str  # where the grid comes from
    intensity: str
    own: bool
    groups: dict[str, int] = field(default_factory=dict)
    scans: list[ScanPlan] = field(default_factory=list)

    @property
    def lr_voxel(self) -> float:
        return SCALE * self.hr_voxel


def _finest(voxels: list[np.ndarray]) -> float:
    return float(np.median([float(v.min()) for v in voxels]))


def planned_voxel(hr: list[np.ndarray], lr: list[np.ndarray], hr_folder: str, lr_folder: str) -> float:
    """The HR voxel (mm) planned from the header voxel sizes of the HR and LR folders' scans;
    ValueError naming both folders when the LR scans are not about SCALE x the HR scans."""
    if not hr or not lr:
        folder = hr_folder if not hr else lr_folder
        raise ValueError(f"{folder}: no scan whose header can be read, so no grid can be planned from it "
                         "(pass --voxel-size MM to give the HR voxel)")
    h, lo = _finest(hr), _finest(lr)
    ratio = lo / h
    if not SCALE / PLAN_RATIO <= ratio <= SCALE * PLAN_RATIO:
        raise ValueError(
            f"the LR scans in {lr_folder} (median voxel {lo:g} mm) are {ratio:.2f}x the HR scans in {hr_folder} "
            f"(median {h:g} mm), but the network is x{SCALE}: pass --voxel-size {lo / SCALE:g} (LR kept, HR "
            f"resampled to it) or --voxel-size {h:g} (HR kept, LR resampled to {SCALE * h:g} mm), each within "
            "data.own.max_resample")
    return round(h, 4)


def _verdict(path: str, voxel: np.ndarray | None, target: float, cfg: DataConfig, role: str,
             onto_lr: bool = False) -> tuple[str, str]:
    if voxel is None:
        return "refused", "unreadable header (the load says why)"
    spec = scan_spec(cfg, role)
    try:
        off = geometry.check_voxels(path, voxel, target, spec.tolerance_mm, spec.max_resample, role)
    except ValueError as exc:
        return "refused", str(exc).removeprefix(f"{path}: ")
    if onto_lr:
        return "resampled", "onto its LR scan's x2 grid"
    return ("resampled", f"{geometry.fmt(voxel)} -> {target:g} mm") if off else ("kept", "")


def resolve(cfg: DataConfig, subjects: list[Subject]) -> tuple[DataConfig, Plan]:
    """The config with its grid settled (own data, `grid: planned`: data.voxel_size_mm from the
    scans) and the plan of `subjects` (`discover.plan(cfg)`)."""
    groups = dict(collections.Counter(s.group for s in subjects))
    own = cfg.own
    if not own.enabled:
        return cfg, Plan(cfg.voxel_size_mm, "data.voxel_size_mm (every scan must have it)",
                         intensity.describe("minmax"), False, groups)
    from preprocessing.discover import role_folders

    folders = role_folders(cfg)
    hr_scans = [s for s in subjects if s.group != "target" and not s.lr_input]  # the HR folder
    lr_scans = [s for s in subjects if s.group == "target"]  # the LR folder
    voxel = {s.input: header_voxel(s.input) for s in subjects if not s.error}
    voxel.update({s.lr_input: header_voxel(s.lr_input) for s in subjects if s.lr_input and not s.error})
    if own.grid == "planned":
        found = [voxel[s.input] for s in hr_scans if voxel.get(s.input) is not None]
        found_lr = [voxel[s.input] for s in lr_scans if voxel.get(s.input) is not None]
        hr_voxel = planned_voxel(found, found_lr, folders["hr"], folders["lr"])
        cfg = cfg.model_copy(update={"voxel_size_mm": hr_voxel})
        how = f"planned from the {len(found)} HR scans: the median of their finest voxel sizes"
    else:
        hr_voxel, how = cfg.voxel_size_mm, "--voxel-size (data.voxel_size_mm)"
    plan = Plan(hr_voxel, how, intensity.describe(own.intensity, own.percentiles), True, groups)
    for s in subjects:
        role = "LR" if s.group == "target" else "HR"
        if s.error:
            plan.scans.append(ScanPlan(s.id, s.group, role, s.input, None, "refused", s.error))
            continue
        target = plan.lr_voxel if role == "LR" else hr_voxel
        gets, why = _verdict(s.input, voxel.get(s.input), target, cfg, role, onto_lr=bool(s.lr_input))
        plan.scans.append(ScanPlan(s.id, s.group, role, s.input, _tuple(voxel.get(s.input)), gets, why))
        if s.lr_input:
            gets, why = _verdict(s.lr_input, voxel.get(s.lr_input), plan.lr_voxel, cfg, "LR")
            plan.scans.append(ScanPlan(s.id, s.group, "LR", s.lr_input, _tuple(voxel.get(s.lr_input)), gets, why))
    return cfg, plan


def _tuple(v: np.ndarray | None) -> tuple[float, ...] | None:
    return None if v is None else tuple(round(float(x), 4) for x in v)


def _sizes(scans: list[ScanPlan]) -> str:
    """The voxel sizes found, most common first: "1 (5), 1.2 (1), 1 x 1 x 1.5 (1)"."""
    n = collections.Counter(geometry.fmt(sorted(s.voxel)) if len(set(s.voxel)) > 1 else f"{s.voxel[0]:g}"
                            for s in scans if s.voxel is not None)
    text = ", ".join(f"{k} ({c})" for k, c in n.most_common(4))
    return text + (", ..." if len(n) > 4 else "")


def tables(plan: Plan, per_scan: bool = False) -> list:
    """rich renderables: the summary (grid, per role: scans, voxel sizes found, kept / resampled /
    refused; intensity), and with `per_scan` one row per scan."""
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    # a line of its own: as a table title it would wrap to the width of a two-column table
    line = Text(f"plan: HR grid {plan.hr_voxel:g} mm, LR grid {plan.lr_voxel:g} mm ({plan.how}); "
                f"intensity: {plan.intensity}")
    head = Table()
    if not plan.own:
        head.add_column("group")
        head.add_column("subjects", justify="right")
        for g in ("source", "target", "val", "test", "unused"):
            if plan.groups.get(g):
                head.add_row(g, str(plan.groups[g]))
        return [line, head]
    for col in ("role", "scans", "voxel sizes found (mm)", "grid (mm)", "kept", "resampled", "refused"):
        head.add_column(col, justify="right" if col in ("scans", "kept", "resampled", "refused") else "left")
    for role, grid in (("HR", plan.hr_voxel), ("LR", plan.lr_voxel)):
        rows = [s for s in plan.scans if s.role == role]
        if rows:
            count = collections.Counter(s.gets for s in rows)
            head.add_row(role, str(len(rows)), _sizes(rows), f"{grid:g}",
                         *(str(count.get(k, 0)) for k in ("kept", "resampled", "refused")))
    if not per_scan:
        return [line, head]
    scans = Table(title="every scan", title_justify="left")
    for col in ("subject", "group", "role", "file", "voxel (mm)", "gets"):
        scans.add_column(col, overflow="fold")
    for s in plan.scans:
        gets = {"kept": "kept", "resampled": "[yellow]resampled[/]", "refused": "[red]refused[/]"}[s.gets]
        scans.add_row(s.subject, s.group, s.role, _shown(s.path), "?" if s.voxel is None else geometry.fmt(s.voxel),
                      gets + (f": {escape(s.why)}" if s.why else ""))
    return [line, head, scans]


def _shown(path: str) -> str:
    """A path as the user would type it: relative to the working folder when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel
