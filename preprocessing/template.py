"""Real-anatomy cohort: T1w brains made from the MNI ICBM152 2009 template (`udean cohort --anatomy mni`).

The phantom (`preprocessing/synthetic.py`) draws its anatomy from band-limited noise; a method
that wins only there has not won (docs/quality.md). This module makes subjects from real anatomy
that a well-kept package ships and that any machine has offline: the ICBM152 2009a nonlinear
symmetric T1 template with its grey- and white-matter probability maps, 1 mm, skull-stripped,
as nilearn ships them (`nilearn/datasets/data/`; read as files, nilearn is not imported).

Every subject derives from ONE averaged template: its anatomy differs from the next subject's
only by what is simulated here, outside in order of the draws:
- a small affine (rotation, per-axis scale, shift) and a random smooth non-rigid deformation,
- per-tissue contrast (grey matter, white matter and CSF fractions from the maps scale the T1
  intensity: T1 contrast varies with the sequence and the scanner),
- a smooth multiplicative bias field and Rician noise (research HR scans are not noise-free).
An averaged template is smoother than one person's brain (sulci blur where subjects disagree),
so SR gains on this cohort understate those on real scans rather than overstate them.

Pure: `template_subject(seed, ...)` gives identical arrays for identical arguments. The
template's brain mask, deformed with the anatomy, is returned beside the volume (written as
HCP's `T1w/brainmask_fs.nii.gz` by preprocessing/cohort.py).
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FILES = {"t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
         "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
         "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"}
VOXEL_MM = 1.0  # the template's; subjects are sampled on this grid unless asked for coarser (tests)
MARGIN_MM = 6.0  # background kept around the template's brain box
WM_LEVEL = 1000.0  # int16 white-matter intensity before bias and noise, as the phantom's


def template_dir() -> Path:
    """nilearn's data folder holding the ICBM152 2009 files; ValueError when it is not installed."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the real-anatomy cohort (--anatomy mni) reads the ICBM152 2009 template that nilearn "
                         "ships: pip install nilearn (./install.sh does)")
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [f for f in FILES.values() if not (d / f).is_file()]
    if missing:
        raise ValueError(f"{d}: nilearn's copy of the ICBM152 2009 template lacks {', '.join(missing)}")
    return d


@dataclass(frozen=True)
class Template:
    t1: np.ndarray  # float32 in [0, 1], background 0 (skull-stripped)
    gm: np.ndarray  # tissue fractions in [0, 1]
    wm: np.ndarray
    affine: np.ndarray  # (4, 4) voxel -> world (mm, RAS)


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """The three maps as float32 arrays (read once per process)."""
    import nibabel as nib

    d = template_dir()
    imgs = {k: nib.as_closest_canonical(nib.load(str(d / f))) for k, f in FILES.items()}
    arr = {k: np.asarray(img.dataobj, dtype=np.float32) / np.float32(255.0) for k, img in imgs.items()}
    return Template(arr["t1"], arr["gm"], arr["wm"], imgs["t1"].affine.astype(np.float64))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int, sigma: float) -> np.ndarray:
    """Unit-std smooth random field on `shape`: white noise on a grid `coarse` times coarser,
    Gaussian-filtered (`sigma` coarse voxels), upsampled linearly."""
    from scipy import ndimage

    cshape = tuple(max(2, -(-n // coarse) + 1) for n in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(cshape).astype(np.float32), sigma, mode="wrap")
    f /= f.std() + 1e-12
    zoom = [(n - 1) / (c - 1) for n, c in zip(shape, cshape)]
    return ndimage.zoom(f, zoom, order=1, output=np.float32, grid_mode=False)[tuple(slice(0, n) for n in shape)]


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    r = np.eye(3)
    for axis in range(3):
        a = np.deg2rad(rng.uniform(-max_deg, max_deg))
        i, j = [k for k in range(3) if k != axis]
        m = np.eye(3)
        m[i, i] = m[j, j] = np.cos(a)
        m[i, j], m[j, i] = -np.sin(a), np.sin(a)
        r = r @ m
    return r


def grid(voxel_mm: float = VOXEL_MM) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of every subject at `voxel_mm`: the template's brain box + MARGIN_MM, each
    extent even (the x2 degradation halves it), world-aligned (RAS) as the template."""
    tpl = load_template()
    idx = np.argwhere(tpl.t1 > 0)
    lo = tpl.affine[:3, :3] @ idx.min(0) + tpl.affine[:3, 3] - MARGIN_MM
    hi = tpl.affine[:3, :3] @ idx.max(0) + tpl.affine[:3, 3] + MARGIN_MM
    shape = tuple(int(2 * np.ceil((h - l) / voxel_mm / 2)) for l, h in zip(lo, hi))
    affine = np.diag([voxel_mm] * 3 + [1.0])
    affine[:3, 3] = (lo + hi) / 2 - voxel_mm * (np.asarray(shape) - 1) / 2
    return shape, affine  # type: ignore[return-value]


def template_subject(seed: int, voxel_mm: float = VOXEL_MM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One subject: (vol int16 (X, Y, Z), affine (4, 4), brain mask uint8 (X, Y, Z)), RAS, at
    `voxel_mm` (the template's 1 mm by default; coarser for fast tests, anti-aliased).

    Draws, in order: affine (rotation up to 5 deg per axis, scale 0.92-1.08 per axis, shift up
    to 4 mm), deformation (three smooth fields, ~12 mm correlation, 2.5 mm rms), contrast (GM, WM,
    CSF factors 1 +- 0.12), bias (smooth, 6 % rms), noise (Rician, sigma 1.5-3 % of WM)."""
    from scipy import ndimage

    if not voxel_mm >= VOXEL_MM:
        raise ValueError(f"voxel_mm must be >= the template's {VOXEL_MM} mm, got {voxel_mm}")
    rng = np.random.default_rng(seed)
    tpl = load_template()
    shape, affine = grid(voxel_mm)
    # output voxel -> world -> (affine about the brain's centre) -> template voxel
    centre = affine[:3, :3] @ (np.asarray(shape) - 1) / 2 + affine[:3, 3]
    lin = _rotation(rng, 5.0) @ np.diag(rng.uniform(0.92, 1.08, 3))
    shift = rng.uniform(-4.0, 4.0, 3)
    to_tpl = np.linalg.inv(tpl.affine)
    m = to_tpl[:3, :3] @ lin @ affine[:3, :3]
    t = to_tpl[:3, :3] @ (lin @ (affine[:3, 3] - centre) + centre + shift) + to_tpl[:3, 3]
    coarse = max(1, int(round(4 / voxel_mm)))
    disp = [_smooth_field(rng, shape, coarse, 12.0 / (coarse * voxel_mm)) * np.float32(2.5) for _ in range(3)]
    coords = np.empty((3,) + shape, dtype=np.float32)
    ijk = np.indices(shape, dtype=np.float32)
    for a in range(3):  # the template voxel of every output voxel, plus the displacement (mm = voxels)
        coords[a] = m[a, 0] * ijk[0] + m[a, 1] * ijk[1] + m[a, 2] * ijk[2] + np.float32(t[a]) + disp[a]
    del ijk, disp

    def sample(a: np.ndarray, order: int) -> np.ndarray:
        if voxel_mm > VOXEL_MM:  # anti-alias before sampling coarser than the template
            a = ndimage.gaussian_filter(a, 0.4 * voxel_mm / VOXEL_MM)
        return ndimage.map_coordinates(a, coords, order=order, mode="constant", cval=0.0, output=np.float32)

    t1, gm, wm = sample(tpl.t1, 3), sample(tpl.gm, 1), sample(tpl.wm, 1)
    brain = (sample((tpl.t1 > 0).astype(np.float32), 1) > 0.5).astype(np.uint8)
    np.clip(t1, 0.0, 1.0, out=t1)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    k_gm, k_wm, k_csf = rng.uniform(-0.12, 0.12, 3).astype(np.float32)
    img = t1 * (1.0 + k_gm * gm + k_wm * wm + k_csf * csf) * np.float32(WM_LEVEL / 0.87)  # template WM ~ 0.87
    del t1, gm, wm, csf
    img *= np.exp(np.float32(0.06) * _smooth_field(rng, shape, coarse, 40.0 / (coarse * voxel_mm)))
    sigma = np.float32(rng.uniform(0.015, 0.03) * WM_LEVEL)
    n1 = rng.standard_normal(shape, dtype=np.float32)
    n2 = rng.standard_normal(shape, dtype=np.float32)
    img = np.sqrt((img + sigma * n1) ** 2 + (sigma * n2) ** 2)
    vol = np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)
    return vol, affine, brain
