"""The synthetic cohort on disk: `udean cohort`. Subjects (`preprocessing.synthetic.synth_subject`)
are written in the HCP layout (`discover.HCP_T1W`) as deterministic .nii.gz files (same seed,
byte-identical files); `preview` draws three orthogonal mid slices of a subject."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from preprocessing.discover import HCP_T1W, hcp_files
from preprocessing.synthetic import DEFAULT_SHAPE, check_shape, synth_subject


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


def write_cohort(out: str | os.PathLike, n: int, shape=DEFAULT_SHAPE, seed: int = 0,
                 first_id: int | None = None, progress: bool = True) -> list[str]:
    """Write n subjects at `out/HCP_T1W` (atomically, overwriting); returns the file paths."""
    from rich.progress import Progress

    from hpc.atomic import atomic_write_bytes

    if int(n) < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    shape = check_shape(shape)
    out = Path(out)
    paths = []
    with Progress(disable=not progress, transient=False) as bar:
        task = bar.add_task("synthetic cohort", total=n)
        for i, sid in enumerate(subject_ids(n, seed, first_id)):
            vol, affine = synth_subject(subject_seed(seed, i), shape)
            path = out / HCP_T1W.format(subject=sid)
            atomic_write_bytes(path, nifti_gz_bytes(vol, affine))
            paths.append(str(path))
            bar.advance(task)
    return paths


def cohort_ready(root: str | os.PathLike, n: int, shape) -> bool:
    """True when `root` holds exactly `n` subjects of `shape` in the HCP layout (a rerun keeps them)."""
    import nibabel as nib

    files = hcp_files(root)
    return len(files) == n and all(nib.load(str(f)).shape == tuple(shape) for f in files)


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
    p.add_argument("--out", default=None, help="cohort root; subjects go to OUT/" + HCP_T1W)
    p.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"),
                   help="volume size in voxels (0.7 mm); default: HCP's 320 320 256")
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
    paths = write_cohort(args.out, args.n, tuple(args.shape), args.seed, args.first_id,
                         progress=not args.no_progress)
    print(f"{len(paths)} synthetic subjects written under {Path(args.out).resolve()} "
          f"({HCP_T1W.format(subject='<id>')}), e.g. {paths[0]}")
    return 0
