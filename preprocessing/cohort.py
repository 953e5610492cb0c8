"""The synthetic cohorts on disk: `udean cohort`. Two anatomies (`ANATOMIES`): `mni`, real T1 anatomy
made into distinct subjects from the ICBM152 2009 template (`preprocessing.template`, the default
of the demo and the shift benchmark: methods are chosen on it), and `phantom`, the procedural
head of `preprocessing.synthetic` (full heads with scalp and skull, any shape, fast: the tests).
Subjects are written in the HCP layout (`discover.HCP_T1W`, plus HCP's `T1w/brainmask_fs.nii.gz`
on the same grid) or as a flat folder (`<id>.nii.gz`), as deterministic .nii.gz files (same
seed, byte-identical files); `preview` draws three orthogonal mid slices of a subject."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from preprocessing.discover import HCP_BRAINMASK, HCP_T1W, hcp_files
from preprocessing.synthetic import DEFAULT_SHAPE, check_shape, synth_subject

ANATOMIES = ("mni", "phantom")
LAYOUTS = ("hcp", "flat")


def default_voxel_mm(anatomy: str) -> float:
    """The voxel size a cohort of `anatomy` is written at unless asked otherwise (mm, isotropic)."""
    from preprocessing import synthetic, template

    return {"mni": template.VOXEL_MM, "phantom": synthetic.VOXEL_MM}[anatomy]


def cohort_shape(anatomy: str, shape=None, voxel_mm: float | None = None) -> tuple[int, int, int]:
    """The volume shape of every subject: the phantom's `shape` (default HCP's), the template's
    brain box at `voxel_mm` (a `shape` is refused there: the template decides it)."""
    _check_anatomy(anatomy)
    if anatomy == "phantom":
        return check_shape(DEFAULT_SHAPE if shape is None else shape)
    if shape is not None:
        raise ValueError("--shape is the phantom's; the mni cohort's shape is the template's brain box "
                         "(choose --voxel-mm instead)")
    from preprocessing.template import grid

    return grid(voxel_mm or default_voxel_mm(anatomy))[0]


def _check_anatomy(anatomy: str) -> None:
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy {anatomy!r}: allowed {', '.join(ANATOMIES)}")


def make_subject(anatomy: str, seed: int, shape=None, voxel_mm: float | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int16 volume, affine, uint8 brain mask) of one subject of `anatomy` (pure in its arguments)."""
    _check_anatomy(anatomy)
    voxel_mm = voxel_mm or default_voxel_mm(anatomy)
    if anatomy == "mni":
        from preprocessing.template import template_subject

        cohort_shape(anatomy, shape, voxel_mm)  # refuses a shape
        return template_subject(seed, voxel_mm)
    from preprocessing.synthetic import BRAIN_LABELS

    vol, affine, labels = synth_subject(seed, cohort_shape(anatomy, shape), voxel_mm, return_labels=True)
    return vol, affine, np.isin(labels, BRAIN_LABELS).astype(np.uint8)


def nifti_gz_bytes(vol: np.ndarray, affine: np.ndarray, level: int = 3) -> bytes:
    """NIfTI-1 .nii.gz bytes, affine as sform and qform; deterministic gzip (mtime 0, no name)."""
    import nibabel as nib
    from isal import igzip

    img = nib.Nifti1Image(vol, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_data_dtype(vol.dtype)
    img.header.set_xyzt_units("mm", "sec")
    return igzip.compress(img.to_bytes(), compresslevel=level, mtime=0)


def subject_ids(n: int, seed: int = 0, first_id: int | None = None) -> list[str]:
    """n six-digit HCP-style ids; subject i's id depends only on (seed, i, first_id)."""
    if first_id is None:
        first_id = 100000 + (int(seed) % 800) * 1000
    if first_id < 100000 or first_id + n - 1 > 999999:
        raise ValueError(f"ids {first_id}..{first_id + n - 1} are not all six digits")
    return [str(first_id + i) for i in range(n)]


def subject_seed(seed: int, i: int) -> int:
    """Per-subject seed derived from (cohort seed, index): independent streams, prefix-stable."""
    return int(np.random.SeedSequence(int(seed), spawn_key=(int(i),)).generate_state(1, np.uint64)[0])


def subject_path(out: str | os.PathLike, sid: str, layout: str = "hcp") -> Path:
    """Where subject `sid`'s T1w goes in a cohort written with `layout`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: allowed {', '.join(LAYOUTS)}")
    return Path(out) / (HCP_T1W.format(subject=sid) if layout == "hcp" else f"{sid}.nii.gz")


def write_cohort(out: str | os.PathLike, n: int, shape=None, seed: int = 0,
                 first_id: int | None = None, progress: bool = True, *, anatomy: str = "phantom",
                 voxel_mm: float | None = None, layout: str = "hcp") -> list[str]:
    """Write n subjects of `anatomy` at `out` (atomically, overwriting); returns the T1w paths.
    `layout` hcp: HCP's T1w path and `T1w/brainmask_fs.nii.gz` beside it (same grid); flat:
    `out/<id>.nii.gz` only (a folder of scans, as `udean preprocess --hr` takes them)."""
    from rich.progress import Progress

    from hpc.atomic import atomic_write_bytes

    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    cohort_shape(anatomy, shape, voxel_mm)  # bad arguments fail before anything is written
    out = Path(out)
    paths = []
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task(f"{anatomy} cohort", total=n)
        for i, sid in enumerate(subject_ids(n, seed, first_id)):
            vol, affine, brain = make_subject(anatomy, subject_seed(seed, i), shape, voxel_mm)
            path = subject_path(out, sid, layout)
            atomic_write_bytes(path, nifti_gz_bytes(vol, affine))
            if layout == "hcp":
                atomic_write_bytes(out / HCP_BRAINMASK.format(subject=sid), nifti_gz_bytes(brain, affine))
            paths.append(str(path))
            bar.advance(task)
    return paths


def cohort_ready(root: str | os.PathLike, n: int, shape, layout: str = "hcp", voxel_mm: float | None = None) -> bool:
    """True when `root` holds exactly `n` subjects of `shape` (and `voxel_mm`, when given) in
    `layout` (a rerun keeps them)."""
    import nibabel as nib

    files = hcp_files(root) if layout == "hcp" else sorted(Path(root).glob("*.nii.gz"))
    imgs = [nib.load(str(f)) for f in files]
    return len(files) == n and all(
        img.shape == tuple(shape) and (voxel_mm is None or np.allclose(img.header.get_zooms()[:3], voxel_mm))
        for img in imgs)


def _find_nifti(subject: str | os.PathLike) -> Path:
    p = Path(subject)
    if p.is_file():
        return p
    if p.is_dir():
        hcp = p.parent / HCP_T1W.format(subject=p.name)
        if hcp.is_file():
            return hcp
        found = sorted(p.rglob("*.nii.gz")) + sorted(p.rglob("*.nii"))
        if len(found) == 1:
            return found[0]
        if found:
            raise ValueError(f"{p} holds {len(found)} NIfTI files; name one")
    raise FileNotFoundError(f"no NIfTI subject at {p}")


def preview(subject: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Sagittal, coronal and axial mid slices of a subject (folder or NIfTI file) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    from hpc.atomic import atomic_path

    path = _find_nifti(subject)
    img = nib.as_closest_canonical(nib.load(str(path)))
    vol = np.asarray(img.dataobj, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {vol.shape}")
    zooms = img.header.get_zooms()[:3]
    cx, cy, cz = (s // 2 for s in vol.shape)
    # each panel: (slice, its (horizontal, vertical) voxel sizes); displayed with superior up
    panels = [("sagittal", vol[cx, :, :], (zooms[1], zooms[2])),
              ("coronal", vol[:, cy, :], (zooms[0], zooms[2])),
              ("axial", vol[:, :, cz], (zooms[0], zooms[1]))]
    vmax = float(np.percentile(vol, 99.5)) or 1.0
    widths = [p[1].shape[0] * p[2][0] for p in panels]
    height = max(p[1].shape[1] * p[2][1] for p in panels)
    fig, axes = plt.subplots(1, 3, figsize=(3.2 * sum(widths) / height, 3.6), facecolor="black",
                             gridspec_kw={"width_ratios": widths})
    for ax, (name, sl, (dx, dy)) in zip(axes, panels):
        ax.imshow(sl.T, cmap="gray", origin="lower", vmin=0, vmax=vmax, aspect=dy / dx,
                  interpolation="nearest")
        ax.set_title(name, color="white", fontsize=9)
        ax.axis("off")
    fig.suptitle(path.name, color="white", fontsize=9)
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150, facecolor="black")
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=None, help="number of subjects to write")
    p.add_argument("--out", default=None, help="cohort root; subjects go to OUT/" + HCP_T1W + " (--layout hcp) "
                   "or OUT/<id>.nii.gz (--layout flat)")
    p.add_argument("--anatomy", choices=ANATOMIES, default="mni",
                   help="mni: real T1 brains (skull-stripped, 1 mm) made from the ICBM152 2009 template nilearn ships, "
                        "every subject a deformation of that one averaged template; phantom: procedural full heads "
                        "(scalp, skull, 0.7 mm, any --shape; fast, for tests)")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="phantom only: volume size in voxels (default HCP's 320 320 256); mni: the template's brain box")
    p.add_argument("--voxel-mm", type=float, default=None,
                   help="isotropic voxel size (default: the anatomy's own, mni 1.0, phantom 0.7)")
    p.add_argument("--layout", choices=LAYOUTS, default="hcp",
                   help="hcp: HCP's folders with T1w/brainmask_fs.nii.gz beside each scan; flat: OUT/<id>.nii.gz")
    p.add_argument("--seed", type=int, default=0, help="cohort seed: same seed, byte-identical files")
    p.add_argument("--first-id", type=int, default=None, help="first six-digit subject id")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--preview", nargs=2, metavar=("SUBJECT", "PNG"), default=None,
                   help="instead: draw mid slices of SUBJECT (folder or .nii.gz) to PNG")


def run(args: argparse.Namespace) -> int:
    if args.preview is not None:
        png = preview(*args.preview)
        print(f"preview written to {png}")
        return 0
    if args.n is None or args.out is None:
        raise ValueError("--n and --out are required (or use --preview SUBJECT PNG)")
    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    if args.voxel_mm is not None and not args.voxel_mm > 0:
        raise ValueError(f"--voxel-mm must be positive, got {args.voxel_mm}")
    shape = None if args.shape is None else tuple(args.shape)
    paths = write_cohort(args.out, args.n, shape, args.seed, args.first_id, progress=not args.no_progress,
                         anatomy=args.anatomy, voxel_mm=args.voxel_mm, layout=args.layout)
    what = {"mni": "real-anatomy (ICBM152 2009 template)", "phantom": "phantom"}[args.anatomy]
    print(f"{len(paths)} {what} subjects written under {Path(args.out).resolve()}, e.g. {paths[0]}")
    return 0
