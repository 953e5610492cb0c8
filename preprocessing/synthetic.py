"""Synthetic HCP-like T1w cohort: brain-like 0.7 mm volumes, so the suite runs without HCP data.

`synth_subject` is a pure function (seed -> int16 volume + affine [+ tissue labels]); the files
(`write_cohort`, byte-identical for the same seed), the preview and `udean cohort` are in
preprocessing/cohort.py.

Anatomy, outside in: scalp (skin, bright subcutaneous fat, muscle; soft tissue of the neck),
skull (dark, faint diploe), CSF, folded cortical grey matter over white matter (sulci are the
zero sheets of band-limited 3D noise, lined by a GM ribbon; interhemispheric fissure above the
corpus callosum), deep grey nuclei (thalamus, caudate, putamen), lateral and third ventricles,
cerebellum with folia, brainstem. Then a smooth multiplicative bias field and Rician noise.
Smooth fields are computed on a grid twice as coarse and upsampled linearly; tissue boundaries
are taken at full resolution, so edges stay sharp (partial volume over about one voxel) and the
2x super-resolution task has real high-frequency content (sulci, GM ribbon: 1-3 mm).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Tissue label codes of `synth_subject(..., return_labels=True)`.
BACKGROUND = 0
SCALP = 1  # everything in the head outside the skull: skin, fat, muscle, neck soft tissue
SKULL = 2
CSF = 3  # extra-cerebral CSF, sulci, fissures
GM = 4  # cortical grey matter (cerebrum and cerebellum)
WM = 5  # white matter, brainstem included
DEEP_GM = 6  # thalamus, caudate, putamen
VENTRICLES = 7  # lateral and third ventricles
BRAIN_LABELS = (CSF, GM, WM, DEEP_GM, VENTRICLES)  # inside the skull: the brain mask of a subject
LABEL_NAMES = {BACKGROUND: "background", SCALP: "scalp", SKULL: "skull", CSF: "CSF", GM: "GM",
               WM: "WM", DEEP_GM: "deep GM", VENTRICLES: "ventricles"}

DEFAULT_SHAPE = (320, 320, 256)
VOXEL_MM = 0.7
# Half field of view (mm) the anatomy is designed for: HCP's 320x320x256 at 0.7 mm.
# Axes are RAS: x left->right, y posterior->anterior, z inferior->superior.
_REF_HALF_FOV = (112.0, 112.0, 89.6)
MIN_DIM = 32


def _ramp(v: np.ndarray, width: float) -> np.ndarray:
    """0 -> 1 over `width` mm centred on v = 0: partial volume of a boundary (float32)."""
    out = np.multiply(v, np.float32(1.0 / width), dtype=np.float32)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def _paint(img: np.ndarray, alpha: np.ndarray, value: float) -> None:
    """img <- img + alpha * (value - img), in place."""
    tmp = np.subtract(np.float32(value), img, dtype=np.float32)
    tmp *= alpha
    img += tmp


def _up2(a: np.ndarray) -> np.ndarray:
    """Linear x2 upsampling on every axis: coarse index j lands on fine index 2j (length 2n-1)."""
    a = np.asarray(a, dtype=np.float32)
    for axis in range(a.ndim):
        shape = list(a.shape)
        shape[axis] = 2 * shape[axis] - 1
        out = np.empty(shape, dtype=np.float32)

        def sl(start, stop=None, step=None):
            idx = [slice(None)] * a.ndim
            idx[axis] = slice(start, stop, step)
            return tuple(idx)

        out[sl(0, None, 2)] = a
        mid = out[sl(1, None, 2)]
        np.add(a[sl(None, -1)], a[sl(1, None)], out=mid)
        mid *= np.float32(0.5)
        a = out
    return a


def _box_up(coarse: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """The fine-grid block `box` of the upsampled coarse field, upsampling only what it needs."""
    cs, crop = [], []
    for sl in box:
        j0, j1 = sl.start // 2, sl.stop // 2 + 1  # coarse j covers fine 2j
        cs.append(slice(j0, j1))
        crop.append(slice(sl.start - 2 * j0, sl.start - 2 * j0 + sl.stop - sl.start))
    return _up2(coarse[tuple(cs)])[tuple(crop)]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, unit standard deviation, float32; `sigma` in voxels.

    Wide kernels run on a grid f = 2^k times coarser, then linear x2 steps: same statistics,
    far cheaper."""
    from scipy.ndimage import gaussian_filter

    f = 2 ** max(0, int(math.log2(max(sigma / 2.0, 1.0))))
    small = tuple(-(-(n - 1) // f) + 1 for n in shape)
    n = gaussian_filter(rng.standard_normal(small, dtype=np.float32), sigma / f, mode="wrap")
    while f > 1:
        n, f = _up2(n), f // 2
    n = n[tuple(slice(0, m) for m in shape)]
    n /= max(float(n.std()), 1e-6)
    return np.ascontiguousarray(n, dtype=np.float32)


def _profile(v: np.ndarray, edges, values, pv: float) -> np.ndarray:
    """Piecewise-constant intensity of v: values[i] between edges[i-1] and edges[i], linear ramps
    of width pv at each edge (partial volume). float32.

    Evaluated through a lookup table at pv/64 steps: np.interp on 10^7 voxels is several times
    slower than an index computation and a gather."""
    assert len(values) == len(edges) + 1
    xp = [x for e in edges for x in (e - pv / 2, e + pv / 2)]
    xp = np.maximum.accumulate(np.asarray(xp) + 1e-4 * np.arange(len(xp)))
    fp = [values[0]] + [w for val in values[1:-1] for w in (val, val)] + [values[-1]]
    step = pv / 64.0
    grid = np.arange(xp[0] - step, xp[-1] + 2 * step, step)
    lut = np.interp(grid, xp, np.asarray(fp, dtype=np.float64)).astype(np.float32)
    idx = np.subtract(v, np.float32(grid[0]), dtype=np.float32)
    idx *= np.float32(1.0 / step)
    np.clip(idx, 0, len(lut) - 1, out=idx)
    return lut[idx.astype(np.int32)]  # fancy indexing: several times faster than take here


def _fine_box(coarse_mask: np.ndarray, shape) -> tuple[slice, ...]:
    """Fine-grid bounding box (with a voxel of margin) of a coarse-grid mask."""
    idx = np.argwhere(coarse_mask)
    lo, hi = idx.min(0), idx.max(0)
    return tuple(slice(max(2 * int(a) - 2, 0), min(2 * int(b) + 3, n)) for a, b, n in zip(lo, hi, shape))


def _ellipsoid_sd(u: tuple[np.ndarray, ...], centre, semi) -> np.ndarray:
    """First-order signed distance (mm) to an ellipsoid: (rho - 1) / |grad rho|."""
    d = [(ui - c) for ui, c in zip(u, centre)]
    rho = np.sqrt(sum((di / a) ** 2 for di, a in zip(d, semi)))
    q = np.sqrt(sum((di / (a * a)) ** 2 for di, a in zip(d, semi)))
    ratio = np.clip(rho / np.maximum(q, 1e-12), min(semi), max(semi))  # in [a_min, a_max]
    return ((rho - 1.0) * ratio).astype(np.float32)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth minimum (union of two signed distances, blended over k mm)."""
    h = np.clip(1.0 - np.abs(a - b) / k, 0.0, None)
    return (np.minimum(a, b) - h * h * (k / 4.0)).astype(np.float32)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def check_shape(shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < MIN_DIM:
        raise ValueError(f"shape must be 3 sizes of at least {MIN_DIM} voxels, got {shape}")
    return shape  # type: ignore[return-value]


def affine_for(shape, voxel_mm: float = VOXEL_MM) -> np.ndarray:
    """(4, 4) RAS affine, isotropic `voxel_mm`, world origin at the volume centre."""
    aff = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    aff[:3, 3] = [-(n - 1) / 2.0 * voxel_mm for n in shape]
    return aff


@dataclass
class _Anatomy:
    """One subject's draw (all of it first, so the fields below never shift it), in anatomical
    reference mm, and the grid it is made on."""

    shape: tuple[int, int, int]
    voxel_mm: float
    s: float  # mm of this grid per reference mm (the head is fitted to the field of view)
    fine: float  # microstructure thickening on tiny grids
    size: float
    stretch: np.ndarray
    rot: np.ndarray
    shift: np.ndarray
    cer_semi: np.ndarray
    csf_mm: float
    skull_mm: float
    scalp_mm: float
    t_gm: float  # cortical thickness
    fold_sigma: float  # noise smoothing: sulcal spacing ~ 4.4 sigma
    sulc_w: float  # sulcal CSF width
    sulc_depth: float
    vent_scale: float
    wm_level: float
    contrast: dict[str, float]
    noise_frac: float
    bias_coef: np.ndarray

    @property
    def pv(self) -> float:
        """Partial-volume width ~ one voxel, in reference mm."""
        return 0.7 * self.voxel_mm / (self.s * self.size)


def _draw(rng: np.random.Generator, shape: tuple[int, int, int], voxel_mm: float) -> _Anatomy:
    half = [(n - 1) / 2.0 * voxel_mm for n in shape]
    s = min(h / r for h, r in zip(half, _REF_HALF_FOV))
    fine = max(1.0, 0.5 / s)
    size = rng.uniform(0.9, 1.0)
    stretch = rng.uniform(0.95, 1.05, 3)
    rot = _rotation(rng, 4.0)
    shift = rng.uniform(-3, 3, 3)
    cer_semi = np.array([66.0, 84.0, 58.0]) * stretch
    csf_mm, skull_mm, scalp_mm = rng.uniform(2.0, 3.5), rng.uniform(5.5, 7.5), rng.uniform(5.0, 7.0)
    t_gm = rng.uniform(2.4, 3.0) * fine
    fold_sigma = rng.uniform(2.8, 3.3) * fine
    sulc_w = rng.uniform(0.5, 0.9) * fine
    sulc_depth = rng.uniform(14.0, 20.0)
    vent_scale = rng.uniform(0.75, 1.35)
    wm_level = rng.uniform(800.0, 1200.0)
    contrast = {
        "gm": rng.uniform(0.60, 0.68), "dgm": rng.uniform(0.74, 0.82), "csf": rng.uniform(0.18, 0.26),
        "skull": rng.uniform(0.04, 0.08), "diploe": rng.uniform(0.25, 0.4), "fat": rng.uniform(1.1, 1.3),
        "muscle": rng.uniform(0.42, 0.52), "skin": rng.uniform(0.6, 0.75), "stem": rng.uniform(0.85, 0.93),
    }
    noise_frac = rng.uniform(0.018, 0.03)
    bias_coef = rng.uniform(-0.12, 0.12, (3, 3))
    return _Anatomy(shape, voxel_mm, s, fine, size, stretch, rot, shift, cer_semi, csf_mm, skull_mm, scalp_mm, t_gm,
                    fold_sigma, sulc_w, sulc_depth, vent_scale, wm_level, contrast, noise_frac, bias_coef)


@dataclass
class _Coarse:
    """Signed distances (mm, < 0 inside) on the coarse grid (every second voxel)."""

    shape: tuple[int, ...]
    u: tuple[np.ndarray, ...]  # coarse voxel -> anatomical reference mm (sparse, broadcasting)
    cvox: float  # coarse spacing in reference mm
    sd_cer: np.ndarray  # cerebrum
    sd_cb: np.ndarray  # cerebellum
    sd_stem: np.ndarray  # brainstem
    sd_ic: np.ndarray  # intracranial space
    sd_head: np.ndarray


def _coarse(rng: np.random.Generator, a: _Anatomy) -> _Coarse:
    f32 = np.float32
    shape, voxel_mm, stretch = a.shape, a.voxel_mm, a.stretch
    cshape = tuple(n // 2 + 1 for n in shape)
    cx = [((2 * np.arange(c) - (n - 1) / 2.0) * voxel_mm).astype(f32) for c, n in zip(cshape, shape)]
    g = np.meshgrid(*cx, indexing="ij", sparse=True)
    # scanner mm -> anatomical reference mm: rotate, undo the fit-to-FOV scale and head size
    k = 1.0 / (a.s * a.size)
    rot = a.rot
    u = tuple(((rot[0, i] * g[0] + rot[1, i] * g[1] + rot[2, i] * g[2]) * k - a.shift[i]).astype(f32)
              for i in range(3))
    cvox = 2 * voxel_mm * k

    pial_pert = _smooth_noise(rng, cshape, 10.0 / cvox) * f32(1.5)
    sd_cer = _ellipsoid_sd(u, (0.0, 0.0, 12.0), a.cer_semi) - pial_pert
    sd_cb = _ellipsoid_sd(u, (0.0, -46.0, -34.0), (50.0 * stretch[0], 30.0, 21.0))
    stem_cyl = (np.sqrt((u[0] / 11.0) ** 2 + ((u[1] + 22.0 + 0.25 * u[2]) / 13.0) ** 2) - 1.0) * 12.0
    sd_stem = np.maximum(stem_cyl, u[2] + 2.0).astype(f32)
    sd_ic = _smin(_smin(sd_cer + pial_pert * f32(0.5), sd_cb, 8.0), sd_stem, 6.0)
    neck = (np.sqrt((u[0] / 52.0) ** 2 + ((u[1] + 12.0) / 62.0) ** 2) - 1.0) * 55.0
    neck = np.maximum(neck, u[2] + 30.0)
    layers = a.csf_mm + a.skull_mm + a.scalp_mm
    sd_head = _smin(sd_ic - f32(layers), neck.astype(f32), 20.0)
    return _Coarse(cshape, u, cvox, sd_cer, sd_cb, sd_stem, sd_ic, sd_head)


def _head(a: _Anatomy, c: _Coarse) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scalp, skull and CSF on the full grid, as 1-D intensity profiles of two signed distances
    -> (image, labels, full-grid intracranial signed distance)."""
    full = tuple(slice(0, n) for n in a.shape)
    pv, contrast = a.pv, a.contrast
    skin = 1.2 * a.fine
    depth_head = _box_up(-c.sd_head, full)
    img = _profile(depth_head, (0.0, skin, skin + 0.6 * a.scalp_mm),
                   (0.0, contrast["skin"], contrast["fat"], contrast["muscle"]), pv)
    labels = (depth_head > 0).astype(np.uint8)  # SCALP == 1
    del depth_head
    t = _box_up(c.sd_ic, full)
    c1, c2 = a.csf_mm, a.csf_mm + a.skull_mm
    inner = _profile(-t, (-c2, -(c1 + 0.72 * a.skull_mm), -(c1 + 0.28 * a.skull_mm), -c1, 0.0),
                     (contrast["skull"], contrast["skull"], contrast["diploe"], contrast["skull"],
                      contrast["csf"], contrast["gm"]), pv)
    inner -= img
    inner *= _ramp(c2 - t, pv)
    img += inner
    del inner
    labels[t < c2] = SKULL
    labels[t < c1] = CSF
    labels[t < 0] = GM  # brain; refined below
    return img, labels, t


def _cerebrum(rng: np.random.Generator, a: _Anatomy, c: _Coarse, img: np.ndarray, labels: np.ndarray,
              t: np.ndarray) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Folded cortex over white matter, in the brain's bounding box (painted in place)
    -> (coarse fold field, the box on the coarse grid)."""
    from scipy.ndimage import map_coordinates

    f32 = np.float32
    u, cvox, sd_cer, pv = c.u, c.cvox, c.sd_cer, a.pv
    box = _fine_box(c.sd_ic < 2.0, a.shape)
    img_b, lab_b = img[box], labels[box]
    ba = _ramp(-t[box], pv)
    d = _box_up(-sd_cer, box)  # depth below the pial surface
    # interhemispheric fissure, stopped by a midline core: corpus callosum (arch) and
    # diencephalon/midbrain
    midline = _smooth_noise(rng, c.shape, 12.0 / cvox) * f32(0.6)
    cc_arch = (u[0], u[1], u[2] + 0.007 * (u[1] + 4.0) ** 2)
    core_sd = np.minimum(_ellipsoid_sd(cc_arch, (0.0, -4.0, 27.0), (30.0, 37.0, 6.0)),
                         _ellipsoid_sd(u, (0.0, -12.0, 4.0), (30.0, 17.0, 15.0)))
    del cc_arch
    fiss = np.abs(_box_up((u[0] - midline).astype(f32), box))
    fiss -= f32(a.sulc_w)
    fiss += _box_up(np.maximum(-core_sd, 0.0) * f32(3.0), box)
    # fold noise sampled along rays from the cerebrum centre (mostly constant in depth), so
    # sulci are walls running inward from the surface, not a random maze
    half_ref = 100.0
    fold_n = _smooth_noise(rng, (int(2 * half_ref / cvox) + 2,) * 3, a.fold_sigma / cvox)
    cb = tuple(slice(sl.start // 2, sl.stop // 2 + 1) for sl in box)
    ub = [np.broadcast_to(ui, sd_cer.shape)[cb] for ui in u]
    cen = (0.0, 0.0, 12.0)
    rho = np.sqrt(sum(((ui - ce) / ax) ** 2 for ui, ce, ax in zip(ub, cen, a.cer_semi)))
    gain = 0.45 + 0.55 / np.maximum(rho, 0.35)  # < 1/rho: sulci bend a little with depth
    fold_c = np.zeros(sd_cer.shape, f32)
    fold_c[cb] = map_coordinates(fold_n, [((ui - ce) * gain + ce + half_ref) / cvox for ui, ce in zip(ub, cen)],
                                 order=1, mode="grid-wrap")
    del rho, gain, ub, fold_n
    sheet = np.abs(_box_up(fold_c, box))
    sheet *= f32(1.8 * a.fold_sigma)  # ~ distance (mm) to the nearest sulcal sheet, fold = 0
    d_eff = np.minimum(d, fiss)
    d_eff -= f32(a.t_gm)  # depth below the GM ribbon (outer surface or fissure wall)
    depth_var = _box_up((a.sulc_depth * (1.0 + 0.25 * _smooth_noise(rng, c.shape, 15.0 / cvox))).astype(f32), box)
    d -= depth_var  # > 0: below the sulcal fundi
    # sulci: CSF sheets from the outer surface down to depth_var, lined by a GM ribbon t_gm
    # thick; WM below the ribbon, except in the lined sulci (so gyri have WM cores)
    wm_a = _ramp(d_eff, pv) * np.maximum(_ramp(sheet - f32(a.sulc_w + a.t_gm), pv), _ramp(d - f32(a.t_gm), pv))
    wm_a *= ba
    sulc_a = np.maximum(_ramp(f32(a.sulc_w) - sheet, pv) * _ramp(-d, pv), _ramp(-fiss, pv))
    sulc_a *= ba
    del sheet, depth_var, d, d_eff, fiss, ba
    _paint(img_b, wm_a, 1.0)
    lab_b[wm_a > 0.5] = WM
    _paint(img_b, sulc_a, a.contrast["csf"])
    lab_b[sulc_a > 0.5] = CSF
    return fold_c, cb


def _hindbrain(a: _Anatomy, c: _Coarse, img: np.ndarray, labels: np.ndarray, t: np.ndarray,
               hbox: tuple[slice, ...], pre_img: np.ndarray, pre_lab: np.ndarray, fold_c: np.ndarray) -> None:
    """Cerebellum (folia as lamellae parallel to its surface, WM core) and brainstem, painted on
    `pre_img` / `pre_lab` (the hindbrain box before the cerebrum was painted), then merged where
    the cerebrum is not the nearest compartment."""
    f32, pv, fine = np.float32, a.pv, a.fine
    dh = _box_up(-c.sd_cer, hbox)
    dcb = _box_up(-c.sd_cb, hbox)
    dstem = _box_up(-c.sd_stem, hbox)
    bah = _ramp(-t[hbox], pv)
    fh = np.abs(_box_up(fold_c, hbox))
    lam = np.cos(dcb * f32(2 * math.pi / (3.2 * fine)) + fh * f32(2.0))
    # WM: a core plus branches along the fold sheets (arbor vitae), ending below the folia
    w = np.maximum(_ramp(dcb - 12.0, pv), _ramp(0.35 - fh, 0.15) * _ramp(dcb - 3.5, pv)) * bah
    _paint(pre_img, w, 1.0)
    pre_lab[w > 0.5] = WM
    w = _ramp(lam - 0.8, 0.3) * _ramp(9.0 - dcb, pv) * bah
    _paint(pre_img, w, a.contrast["csf"])
    pre_lab[w > 0.5] = CSF
    w = _ramp(dstem, pv) * _ramp(dstem - dh, pv) * _ramp(dstem - dcb, pv)
    _paint(pre_img, w, a.contrast["stem"])
    pre_lab[w > 0.5] = WM
    cer = (dh > dcb) & (dh > dstem)  # cerebrum is the nearest compartment
    img[hbox] = np.where(cer, img[hbox], pre_img)
    labels[hbox] = np.where(cer, labels[hbox], pre_lab)
    w = _ramp(1.2 * fine - np.abs(dh - dcb), pv) * (dh > dstem) * bah  # tentorium
    _paint(img[hbox], w, a.contrast["csf"])
    labels[hbox][w > 0.5] = CSF


def _deep(a: _Anatomy, c: _Coarse, img: np.ndarray, labels: np.ndarray, t: np.ndarray, cb: tuple[slice, ...]) -> None:
    """Deep grey nuclei and ventricles (coarse signed distances, central sub-box), in place."""
    pv, vent_scale, sd_cer = a.pv, a.vent_scale, c.sd_cer
    ub = [np.broadcast_to(ui, sd_cer.shape)[cb] for ui in c.u]  # brain box only: cheaper
    deep = [_ellipsoid_sd(ub, (h * 9.5, -14.0, 7.0), (8.0, 14.0, 9.0)) for h in (-1, 1)]  # thalamus
    deep += [_ellipsoid_sd(ub, (h * 15.5, 11.0, 17.0), (5.0, 13.0, 8.0)) for h in (-1, 1)]  # caudate
    deep += [_ellipsoid_sd(ub, (h * 24.0, 3.0, 5.0), (5.5, 15.0, 10.0)) for h in (-1, 1)]  # putamen
    sd_dgm = np.minimum.reduce(deep)
    arch = (ub[0], ub[1], ub[2] + 0.006 * (ub[1] + 4.0) ** 2)
    vents = [_ellipsoid_sd(arch, (h * 8.5, -4.0, 22.0), (5.5 * vent_scale, 33.0, 9.0 * vent_scale))
             for h in (-1, 1)]
    vents.append(_ellipsoid_sd(ub, (0.0, -10.0, 6.0), (1.2 * vent_scale, 13.0, 8.0)))  # third
    sd_vent = np.minimum.reduce(vents)
    far = np.full(sd_cer.shape, 100.0, np.float32)
    far[cb] = sd_dgm
    sd_dgm = far
    far = np.full(sd_cer.shape, 100.0, np.float32)
    far[cb] = sd_vent
    sd_vent = far
    if (np.minimum(sd_dgm, sd_vent) < 2.0).any():
        cbox = _fine_box(np.minimum(sd_dgm, sd_vent) < 2.0, a.shape)
        img_c, lab_c = img[cbox], labels[cbox]
        brain_c = _ramp(-t[cbox], pv)
        w = _ramp(-_box_up(sd_dgm, cbox), pv) * brain_c
        _paint(img_c, w, a.contrast["dgm"])
        lab_c[w > 0.5] = DEEP_GM
        w = _ramp(-_box_up(sd_vent, cbox), pv) * brain_c
        _paint(img_c, w, a.contrast["csf"] * 0.9)
        lab_c[w > 0.5] = VENTRICLES


def _acquire(rng: np.random.Generator, a: _Anatomy, img: np.ndarray) -> np.ndarray:
    """A smooth multiplicative bias (separable, cheap) and Rician noise -> int16 volume."""
    f32 = np.float32
    shape = a.shape
    for axis, n in enumerate(shape):
        x = np.linspace(-1.0, 1.0, n)
        prof = np.exp(a.bias_coef[axis, 0] * x + a.bias_coef[axis, 1] * (x * x - 0.33)
                      + a.bias_coef[axis, 2] * 0.5 * np.sin(math.pi * x)).astype(f32)
        img *= prof.reshape([-1 if i == axis else 1 for i in range(3)])
    img *= f32(a.wm_level)
    sigma = f32(a.noise_frac * a.wm_level)
    n1 = rng.standard_normal(shape, dtype=f32)
    n1 *= sigma
    img += n1
    np.square(img, out=img)
    rng.standard_normal(shape, dtype=f32, out=n1)
    n1 *= sigma
    np.square(n1, out=n1)
    img += n1
    del n1
    np.sqrt(img, out=img)
    return np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)


def synth_subject(seed: int, shape=DEFAULT_SHAPE, voxel_mm: float = VOXEL_MM,
                  return_labels: bool = False):
    """One synthetic T1w head. Pure: same arguments -> identical arrays.

    Returns `(vol, affine)` or, with `return_labels`, `(vol, affine, labels)`:
    vol `shape` int16 (WM about 800-1200), affine (4, 4) float64, labels `shape` uint8 with the
    module's codes (BACKGROUND ... VENTRICLES). The head is scaled to fit the field of view, so
    small test shapes still hold a whole brain; below ~160 voxels the cortex, sulci and folia are
    thickened (in voxels) so they stay resolvable. Every random draw comes from one generator,
    in a fixed order: the anatomy first (`_draw`), then the fields stage by stage.
    """
    shape = check_shape(shape)
    if not voxel_mm > 0:
        raise ValueError(f"voxel_mm must be positive, got {voxel_mm}")
    rng = np.random.default_rng(seed)
    a = _draw(rng, shape, voxel_mm)
    c = _coarse(rng, a)
    img, labels, t = _head(a, c)
    hbox = _fine_box(np.minimum(c.sd_cb, c.sd_stem) < 2.0, shape)  # hindbrain: cerebellum, stem
    pre_img, pre_lab = img[hbox].copy(), labels[hbox].copy()
    fold_c, cb = _cerebrum(rng, a, c, img, labels, t)
    _hindbrain(a, c, img, labels, t, hbox, pre_img, pre_lab, fold_c)
    del pre_img, pre_lab, fold_c
    _deep(a, c, img, labels, t, cb)
    del t
    vol = _acquire(rng, a, img)
    affine = affine_for(shape, voxel_mm)
    return (vol, affine, labels) if return_labels else (vol, affine)
