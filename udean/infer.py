"""Inference: a whole LR volume -> SR volume by a blended sliding window; `udean infer`.

`Inferer` is the one sliding window of the suite, configured once from the `infer:` section
(overlap, slab overlap, batch, autocast, device) and the training patch, and called as
`inferer(lr, net)` (MONAI's `SlidingWindowInferer` is the model): `udean infer`, `udean
evaluate`, validation during training, ZSSR and benchmarks/infer.py all run it. Volumes are in
the stored layout, slices first (`preprocessing.patches.to_stored`); NIfTI files are turned
into it and back at the edges (`infer`, below).

Paper, Fig. 1: at inference only the LR encoder and the SR decoder run ("SRNet"). The network
sees thin slabs of S LR slices with an in-plane patch of p x p voxels and returns 2S HR slices of
2p x 2p (x2 along every axis). A volume is covered by overlapping tiles:

- along the slice axis (axis 0): slabs of S slices, stride S - slab_overlap; the default
  slab_overlap S - 1 (stride 1) runs a slab centred on every LR slice, so each HR slice is the
  blend of every slab that holds it, with most weight on the slab where it has context on both
  sides;
- in-plane: tiles of p voxels, stride round(p * (1 - overlap));
- the last tile of every axis is shifted inward, so every voxel is covered and no tile pads.

Each HR tile is weighted by a separable sine window (largest at the centre, smallest where the
network saw the least context) and the sum is divided by the summed weights. The last HR voxel of
a tile on each axis lies beyond its last LR voxel (extrapolated); where the next tile covers it,
its weight is 0 (`tile_windows`). Measured on a demo test volume with the bare Lanczos image skip
as the model: whole volume 25.88 dB; tiled with the plain sine window 25.44 dB (the extrapolated
last HR slice of every 3-slice slab); with `tile_windows` 25.53 dB; the rest is the thin slab's
3-slice context along the slice axis (slab_overlap 2: 25.58 dB, 2x the tiles; a trained demo
model gained 0.26 dB from slab_overlap 2 over 1, hence the default). A model whose
output does not depend on where the tile starts (e.g. exact x2 nearest upsampling) gives the
same result tiled as on the whole volume: no seams.

Geometry: the degradation the network learned (preprocessing/kspace.py) is a DFT resampling:
LR voxel j is the band-limited HR volume sampled at HR voxel 2j (`lr_affine = hr_affine @
diag(2, 2, 2, 1)`). The network reproduces that geometry, so SR voxel i sits at LR continuous
index i / 2 and the SR affine is `A_lr @ diag(.5, .5, .5, 1)`: half the voxel size, the same
world position; on preprocessed data it equals the HR affine exactly (the SR volume overlays the
HR scan in FSLeyes / ITK-SNAP). (The voxel-centre convention, HR i at LR (i - 0.5) / 2, would
shift the SR volume by a quarter LR voxel against what the network outputs.) The network runs
in canonical (RAS+) voxel order, so the convention holds there: canonical SR voxel i is at
canonical LR voxel i / 2, in particular both first voxels (in canonical order) coincide; along an
axis the input stores flipped (LPS, ...), the file's first SR voxel is half an LR voxel beyond
the file's first LR voxel. The SR is written in the input's voxel order and orientation
(`write_sr_nifti`), obliquity kept.

Grid: an input at another voxel size than the training LR grid (data.voxel_size_mm x 2, beyond
data.voxel_tolerance_mm) is resampled onto it first (preprocessing.geometry: same orientation
and field of view), within data.own.max_resample per axis, and refused beyond; the SR then has
half the training LR voxel size, and the convention above holds for the resampled grid.

Intensities: the input is scaled with preprocessing's own scaling of the checkpoint's data
config (min-max for the paper protocol, the percentiles of data.own for own data) and clipped to
[0, 1], the network's training range; the SR volume is clipped to [0, 1] and mapped back to the
input's units by the inverse of the input's own scaling (`--keep-normalised`: left in [0, 1]),
float32. What the clip took away (voxels above the 99.5th percentile of the head: contrast-enhanced
vessels and lesions, what a clinician looks at; or below the background floor) is carried to the
SR grid trilinearly (`carried`) and added back, and the SR is kept within the input's own range.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from preprocessing.config import SCALE, PatchConfig
from preprocessing.kspace import lr_consistent
from preprocessing.patches import from_stored, to_stored
from udean.config import Config, InferConfig

Model = Callable[[torch.Tensor], torch.Tensor]  # (B, S, p, p) LR -> (B, 2S, 2p, 2p) HR
Progress = Callable[[int, int], None]  # (tiles done, tiles in all)


# --------------------------------------------------------------------------- geometry
def sr_affine(lr_affine: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """Affine of the x`scale` SR grid: voxel size / scale, same world position.

    SR voxel i lies at LR continuous index i / scale, the inverse of preprocessing's
    `lr_affine = hr_affine @ diag(scale, 1)` (module docstring).
    """
    m = np.diag([1.0 / scale] * 3 + [1.0])
    return np.asarray(lr_affine, dtype=np.float64) @ m


def tile_starts(n: int, size: int, stride: int) -> list[int]:
    """Start indices of tiles of `size` covering [0, n); the last one is shifted inward.

    >>> tile_starts(10, 4, 3)
    [0, 3, 6]
    >>> tile_starts(11, 4, 3)
    [0, 3, 6, 7]
    """
    assert size <= n and stride >= 1
    starts = list(range(0, n - size + 1, stride))
    if starts[-1] + size < n:
        starts.append(n - size)
    return starts


def blend_window(n: int) -> np.ndarray:
    """1D blending weights of an HR tile of n voxels: sin(pi (i + 0.5) / n), > 0 everywhere."""
    i = np.arange(n, dtype=np.float64)
    return np.sin(np.pi * (i + 0.5) / n)


def tile_windows(starts: list[int], size: int, scale: int = SCALE) -> list[np.ndarray]:
    """1D HR weights of each tile of one axis: `blend_window`, except that the last HR voxel of a
    tile (at LR index size - 1/2, beyond its last LR voxel: extrapolated) gets weight 0 wherever the
    next tile covers it with context on both sides (HR overlap >= 2)."""
    wins = [blend_window(scale * size) for _ in starts]
    for k in range(len(starts) - 1):
        if scale * (starts[k] + size - starts[k + 1]) >= 2:
            wins[k][-1] = 0.0
    return wins


# --------------------------------------------------------------------------- sliding window
def check_lr_volume(lr: np.ndarray, slab: int, patch: tuple[int, int]) -> None:
    """ValueError, naming the problem, if `lr` (D, H, W) cannot be tiled by (slab, *patch)."""
    if lr.ndim != 3:
        raise ValueError(f"expected a 3D volume, got {lr.ndim}D with shape {tuple(lr.shape)}")
    need = (slab, *patch)
    small = [f"axis {a}: {n} < {k}" for a, (n, k) in enumerate(zip(lr.shape, need)) if n < k]
    if small:
        raise ValueError(
            f"LR volume of shape {tuple(lr.shape)} (slice axis first) is smaller than one patch "
            f"{need} ({'; '.join(small)})")
    if not np.all(np.isfinite(lr)):
        raise ValueError(f"LR volume has {int(np.size(lr) - np.isfinite(lr).sum())} non-finite voxels (NaN/Inf)")


@torch.no_grad()
def sliding_window(
    lr: np.ndarray,
    model: Model,
    *,
    slab: int,
    patch: tuple[int, int],
    overlap: float,
    slab_overlap: int | None,
    batch_size: int,
    device: str | torch.device = "cpu",
    amp: bool = False,
    scale: int = SCALE,
    progress: Progress | None = None,
) -> np.ndarray:
    """Super-resolve a whole LR volume by overlapping, blended tiles (unclipped; `Inferer`
    is the configured, clipping front of this).

    lr: (D, H, W) LR volume, slice axis first, intensities as the model was trained on.
    model: (B, slab, ph, pw) -> (B, scale*slab, scale*ph, scale*pw); called in batches.
    overlap: in-plane overlap as a fraction of the patch, in [0, 1).
    slab_overlap: LR slices shared by consecutive slabs, in [0, slab); None: slab - 1.
    progress: called as progress(done_tiles, total_tiles) after every batch.
    Returns (scale*D, scale*H, scale*W) float32.
    """
    lr = np.asarray(lr)
    patch = (int(patch[0]), int(patch[1]))
    check_lr_volume(lr, slab, patch)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    slab_overlap = resolve_slab_overlap(slab, slab_overlap)
    device = torch.device(device)
    d, h, w = lr.shape
    sizes = (slab, *patch)
    starts = _grid(lr.shape, slab, patch, overlap, slab_overlap)
    corners = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]

    hr_sizes = tuple(scale * k for k in sizes)
    wins = [{a: torch.as_tensor(wn, dtype=torch.float32, device=device)
             for a, wn in zip(st, tile_windows(st, k, scale))} for st, k in zip(starts, sizes)]
    out = torch.zeros((scale * d, scale * h, scale * w), dtype=torch.float32, device=device)
    wsum = torch.zeros_like(out)
    x = torch.as_tensor(np.ascontiguousarray(lr, dtype=np.float32), device=device)

    for first in range(0, len(corners), batch_size):
        batch = corners[first:first + batch_size]
        tiles = torch.stack([x[a:a + slab, b:b + patch[0], c:c + patch[1]] for a, b, c in batch])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            y = model(tiles)
        if tuple(y.shape) != (len(batch), *hr_sizes):
            raise ValueError(f"model returned {tuple(y.shape)} for input {tuple(tiles.shape)}; "
                             f"expected {(len(batch), *hr_sizes)} (x{scale} along every axis)")
        for (a, b, c), t in zip(batch, y.float()):
            weight = wins[0][a][:, None, None] * wins[1][b][None, :, None] * wins[2][c][None, None, :]
            sl = (slice(scale * a, scale * a + hr_sizes[0]), slice(scale * b, scale * b + hr_sizes[1]),
                  slice(scale * c, scale * c + hr_sizes[2]))
            out[sl] += t * weight
            wsum[sl] += weight
        if progress is not None:
            progress(min(first + batch_size, len(corners)), len(corners))
    assert bool((wsum > 0).all()), "sliding window left voxels uncovered"
    return (out / wsum).cpu().numpy()


def resolve_slab_overlap(slab: int, slab_overlap: int | None) -> int:
    """`slab_overlap` as used: None means slab - 1 (a slab centred on every LR slice); ValueError
    outside [0, slab)."""
    slab_overlap = slab - 1 if slab_overlap is None else slab_overlap
    if not 0 <= slab_overlap < slab:
        raise ValueError(f"slab_overlap must be in [0, {slab}), got {slab_overlap}")
    return slab_overlap


def _grid(shape: tuple[int, ...], slab: int, patch: tuple[int, int], overlap: float, slab_overlap: int) -> list[list[int]]:
    """Tile start indices per axis of an LR volume (D, H, W)."""
    strides = (slab - slab_overlap, *(max(1, int(round(p * (1.0 - overlap)))) for p in patch))
    return [tile_starts(n, k, st) for n, k, st in zip(shape, (slab, *patch), strides)]


def tile_count(shape: tuple[int, int, int], slab: int, patch: tuple[int, int], overlap: float,
               slab_overlap: int | None) -> int:
    """How many tiles `sliding_window` runs for an LR volume of `shape` (for progress bars)."""
    slab_overlap = resolve_slab_overlap(slab, slab_overlap)
    return math.prod(len(a) for a in _grid(shape, slab, tuple(patch), overlap, slab_overlap))


CPU_TILE_BATCH = 8  # infer.batch_size 0 on a CPU
MAX_TILE_BATCH = 256  # beyond this a forward pass is long enough to fill any GPU
MEMORY_SHARE = 0.5  # of the free device memory, for the tiles in flight (the rest: blending, other work)


def tiles_per_batch(free_bytes: int, bytes_per_tile: int) -> int:
    """Tiles per forward pass whose activations fit in MEMORY_SHARE of `free_bytes`, in
    [1, MAX_TILE_BATCH]."""
    if bytes_per_tile <= 0:
        return MAX_TILE_BATCH
    return max(1, min(MAX_TILE_BATCH, int(MEMORY_SHARE * free_bytes) // int(bytes_per_tile)))


def auto_batch_size(net: Model, slab: int, patch: tuple[int, int], device: torch.device, amp: bool = False) -> int:
    """`infer.batch_size: 0`: CPU_TILE_BATCH on a CPU; on CUDA, one tile's measured peak memory
    through `net` (a forward of one zero tile; resets the device's peak-memory statistics) against
    the memory free to this process (the driver's free memory plus what torch's allocator holds
    unused), by `tiles_per_batch`."""
    if device.type != "cuda":
        return CPU_TILE_BATCH
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        net(torch.zeros((1, slab, *patch), device=device))
    per_tile = torch.cuda.max_memory_allocated(device) - before
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return tiles_per_batch(free, per_tile)


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    """torch.backends.cudnn.benchmark = `on` inside, the caller's value restored after."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


@dataclass(frozen=True)
class Inferer:
    """The sliding window, configured once: `inferer(lr, net)` super-resolves a whole volume.

    lr: (D, H, W) LR volume, slices first; net: (B, slab, ph, pw) -> (B, 2 slab, 2 ph, 2 pw)
    (an `SRNet`, or any callable: tiles arrive float32 on `device`; a network in another
    precision casts them itself). Returns (2D, 2H, 2W) float32 clipped to [0, 1], the range of
    the training data. `from_config` reads the `infer:` section and the training patch."""

    slab: int
    patch: tuple[int, int]
    overlap: float
    slab_overlap: int  # resolved: slab - 1 when infer.slab_overlap is null
    batch_size: int  # 0: `auto_batch_size` for the network and device of each call
    amp: bool = False
    device: torch.device = torch.device("cpu")
    cudnn_benchmark: bool | None = None  # None: on unless torch's deterministic mode is on
    lr_consistency: float = 0.0  # infer.lr_consistency: 0 off

    @classmethod
    def from_config(cls, infer: InferConfig, patches: PatchConfig, device: str | torch.device | None = None) -> "Inferer":
        """`device` overrides `infer.device` (validation runs on the engine's device)."""
        return cls(patches.slab, (int(patches.lr_size[0]), int(patches.lr_size[1])), infer.overlap,
                   resolve_slab_overlap(patches.slab, infer.slab_overlap), infer.batch_size, infer.amp,
                   pick_device(infer.device) if device is None else torch.device(device), infer.cudnn_benchmark,
                   infer.lr_consistency)

    def __call__(self, lr: np.ndarray, net: Model, progress: Progress | None = None) -> np.ndarray:
        bench = not torch.are_deterministic_algorithms_enabled() if self.cudnn_benchmark is None else self.cudnn_benchmark
        with cudnn_benchmark(bench):  # every tile has one shape: cuDNN's timing pays off at once
            batch = self.batch_size or auto_batch_size(net, self.slab, self.patch, self.device, self.amp)
            y = sliding_window(lr, net, slab=self.slab, patch=self.patch, overlap=self.overlap,
                               slab_overlap=self.slab_overlap, batch_size=batch, device=self.device,
                               amp=self.amp, progress=progress)
        if self.lr_consistency:
            y = lr_consistent(y, lr, self.lr_consistency)
        return np.clip(y, 0.0, 1.0, out=y)

    def tiles(self, shape: tuple[int, int, int]) -> int:
        """Tiles run for an LR volume of `shape` (slices first)."""
        return tile_count(shape, self.slab, self.patch, self.overlap, self.slab_overlap)

    def settings(self) -> dict:
        """What results files record about the window."""
        return {"slab": self.slab, "patch": list(self.patch), "overlap": self.overlap, "slab_overlap": self.slab_overlap,
                "lr_consistency": self.lr_consistency}


# --------------------------------------------------------------------------- model + checkpoint
def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu (said once, plainly: no silent fallback)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        from rich.console import Console

        Console(stderr=True).print("[yellow]udean: no CUDA device; running on CPU[/]", highlight=False)
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device available")
    return torch.device(name)


def resolve_checkpoint(path: str | Path) -> tuple[str, Path]:
    """What `--checkpoint` names: ("weights", a generator.pt) for a .pt file, a best/ or last/
    folder, or a training run folder (its best/, else its last/); ("training", the folder) for
    a training checkpoint (RUN/checkpoints/step_N, read through `udean.export`)."""
    path = Path(path)
    if path.is_file():
        return "weights", path
    if (path / "files.json").is_file() and (path / "G").is_dir():
        return "training", path
    for cand in (path / "generator.pt", path / "best" / "generator.pt", path / "last" / "generator.pt"):
        if cand.is_file():
            return "weights", cand
    raise FileNotFoundError(f"{path}: no inference checkpoint (expected a training run folder, its best/ or last/ "
                            "folder, a generator.pt, or a training checkpoint RUN/checkpoints/step_N)")


def run_folder(checkpoint: str | Path) -> Path:
    """The training run a checkpoint belongs to (`udean evaluate` writes into its eval/): RUN for
    RUN, RUN/best, RUN/last, RUN/export/step_N, RUN/checkpoints/step_N or a generator.pt in
    them; any other weights file: its own folder."""
    kind, path = resolve_checkpoint(checkpoint)
    folder = path.parent if kind == "weights" else path
    if kind == "training" or folder.parent.name == "export":
        return folder.parent.parent
    return folder.parent if folder.name in ("best", "last") else folder


def checkpoint_config(weights: Path) -> Config:
    """The config the weights were trained with: config.yaml beside them or in the run folder
    above, else `config` in a best.json beside them (older checkpoints)."""
    import json

    from udean.config import from_dict, load

    for folder in (weights.parent, weights.parent.parent):
        if (folder / "config.yaml").is_file():
            return load(folder / "config.yaml")
    info = weights.parent / "best.json"
    if info.is_file():
        d = json.loads(info.read_text())
        if isinstance(d.get("config"), dict):
            return from_dict(d["config"])
    raise FileNotFoundError(f"{weights}: no config beside it (config.yaml in {weights.parent} or "
                            f"{weights.parent.parent}, or best.json 'config')")


def checkpoint_input(checkpoint: str | Path, cfg: Config) -> dict:
    """What inference conforms an input to, as the checkpoint recorded it (`input` in the json
    beside the weights: the data set's own config, udean.checkpoint.inference_input); a
    training checkpoint: from its run's data set; an older inference checkpoint: from `cfg.data`."""
    import json

    from udean.checkpoint import dataset_config, inference_input

    kind, path = resolve_checkpoint(checkpoint)
    if kind == "training":
        return inference_input(dataset_config(cfg))
    for info in sorted(path.parent.glob("*.json")):
        try:
            d = json.loads(info.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and isinstance(d.get("input"), dict):
            return d["input"]
    return inference_input(cfg.data)


def load_sr_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config]:
    """Inference checkpoint (see `resolve_checkpoint`) -> (SRNet in eval mode on `device`, the
    Config it was trained with). Weights are loaded with weights_only=True (no unpickling);
    ValueError naming the file when they cannot be read or do not fit the config."""
    from udean.models.udean import load_inference

    kind, path = resolve_checkpoint(checkpoint)
    if kind == "training":
        from udean.export import from_training_checkpoint

        state, cfg = from_training_checkpoint(path)
    else:
        from udean.checkpoint import unreadable_weights

        cfg = checkpoint_config(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated, not a torch file, or not weights only
            raise ValueError(unreadable_weights(path, exc)) from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
    try:
        net = load_inference(state, cfg.model)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        text = " ".join(str(exc).split())
        raise ValueError(f"{path}: the weights do not fit the model its config describes ({text[:300]})") from None
    return net.to(device).eval(), cfg


# --------------------------------------------------------------------------- NIfTI in / out
class LRInput(NamedTuple):
    data: np.ndarray  # (X, Y, Z) canonical RAS+ float32 in [0, 1], on the training LR grid
    affine: np.ndarray  # its canonical affine
    original: object  # the input image (header and orientation, for writing back)
    scaling: object  # preprocessing.intensity.Scaling of the input: inverted on the way out
    record: dict  # voxel sizes / shapes in and out, resampled (preprocessing.nifti.Scan.record)


def read_lr_nifti(path: str | Path, spec=None, clip: bool = True) -> LRInput:
    """LR NIfTI in any orientation -> `LRInput`, conformed to `spec` (an `input_spec`; default:
    any voxel size, min-max): preprocessing's own loading, checks (not NIfTI, not 3D, NaN/Inf,
    constant, voxel size), resampling and scaling (preprocessing.nifti.load_scan), so inference
    sees what training saw (`clip=False`: the scaled values beyond [0, 1] kept)."""
    import nibabel as nib

    from preprocessing import nifti

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    spec = spec or nifti.ScanSpec("LR", 1.0, math.inf)
    scan = nifti.load_scan(path, spec, clip=clip)
    original = nib.load(str(path))  # lazy: header and affine only
    return LRInput(scan.data, scan.affine, original, scan.scaling, scan.record)


def write_sr_nifti(sr: np.ndarray, canonical_lr_affine: np.ndarray, original, path: str | Path) -> np.ndarray:
    """Write the canonical SR volume (2X, 2Y, 2Z) back in the input's voxel order and
    orientation, with the SR affine (voxel size halved, same world position) as qform and sform.
    Returns the affine written. `.nii.gz` paths are gzipped."""
    import gzip

    import nibabel as nib

    from hpc.atomic import atomic_write_bytes

    img = nib.Nifti1Image(np.asarray(sr, dtype=np.float32), sr_affine(canonical_lr_affine))
    # the canonical image came from as_closest_canonical; going back is canonical -> input ornt
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                           nib.orientations.io_orientation(original.affine))
    img = img.as_reoriented(back)
    src = original.header
    out = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    hdr = out.header
    # codes: keep the input's (scanner / aligned ...), 1 (scanner) when it had none
    hdr.set_qform(img.affine, code=int(src.get("qform_code", 0)) or 1)
    hdr.set_sform(img.affine, code=int(src.get("sform_code", 0)) or 1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["descrip"] = b"udean x2 super-resolution"
    raw = out.to_bytes()
    path = Path(path)
    atomic_write_bytes(path, gzip.compress(raw, compresslevel=1) if path.name.endswith(".gz") else raw)
    return img.affine


class InferResult(NamedTuple):
    sr_path: Path
    lr_shape: tuple[int, int, int]  # canonical (X, Y, Z), on the training LR grid
    sr_shape: tuple[int, int, int]
    sr_affine: np.ndarray  # as written, in the input's orientation
    tiles: int
    device: torch.device
    input: dict  # the input as read: voxel sizes / shapes in and out, resampled, intensity lo / hi
    value_range: tuple[float, float]  # of the SR volume written


@dataclass
class Predictor:
    """A loaded inference checkpoint, for any number of inputs (one model load): the SR network,
    the config it was trained with, the sliding window and the input spec.

    `predictor(lr_path, sr_path)`: the input conformed to the training LR grid and intensity
    scaling -> slices first along the training slice axis -> `Inferer` -> back to canonical ->
    the input's intensity units (the scaling inverted; `keep_normalised`: [0, 1]) -> written in
    the input's orientation with the SR affine."""

    net: torch.nn.Module
    cfg: Config
    inferer: Inferer
    spec: object  # preprocessing.nifti.ScanSpec of the training LR grid and scaling
    slice_axis: int  # the training thin-slab axis (canonical)

    @classmethod
    def load(cls, checkpoint: str | Path, infer_cfg: InferConfig) -> "Predictor":
        from preprocessing.nifti import ScanSpec

        device = pick_device(infer_cfg.device)
        net, run_cfg = load_sr_model(checkpoint, device)
        rec = dict(checkpoint_input(checkpoint, run_cfg))
        axis = int(rec.pop("slice_axis"))
        spec = ScanSpec(**{**rec, "percentiles": tuple(rec.get("percentiles", (0.5, 99.5)))})
        return cls(net, run_cfg, Inferer.from_config(infer_cfg, run_cfg.data.patches, device), spec, axis)

    def __call__(self, lr_path: str | Path, sr_path: str | Path, *, keep_normalised: bool = False,
                 progress: Progress | None = None) -> InferResult:
        from preprocessing import intensity

        lr = read_lr_nifti(lr_path, self.spec, clip=False)
        ax = self.slice_axis
        beyond = intensity.excess(lr.data)  # what the network's [0, 1] does not hold
        lr_s = to_stored(lr.data - beyond, ax)
        try:
            check_lr_volume(lr_s, self.inferer.slab, self.inferer.patch)
        except ValueError as exc:
            raise ValueError(f"{lr_path}: {exc}") from None
        sr = from_stored(self.inferer(lr_s, self.net, progress), ax)
        if not keep_normalised:
            if beyond.any():
                sr += carried(beyond)
            sr = intensity.invert(sr, lr.scaling, tuple(lr.record["value_range"]))
        affine = write_sr_nifti(sr, lr.affine, lr.original, sr_path)
        return InferResult(Path(sr_path), tuple(lr.data.shape), tuple(sr.shape), affine, self.inferer.tiles(lr_s.shape),
                           self.inferer.device, lr.record, (float(sr.min()), float(sr.max())))


def carried(x: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """(X, Y, Z) on the LR grid -> (scale X, scale Y, scale Z) float32, trilinear, SR voxel i at LR
    index i / scale (the geometry above): a bright voxel keeps its level at its own position."""
    from scipy import ndimage

    shape = tuple(scale * n for n in x.shape)
    return ndimage.affine_transform(np.asarray(x, dtype=np.float32), np.full(3, 1.0 / scale), output_shape=shape,
                                    order=1, mode="nearest")


def infer(checkpoint: str | Path, lr_path: str | Path, sr_path: str | Path, infer_cfg: InferConfig,
          progress: Progress | None = None, keep_normalised: bool = False) -> InferResult:
    """One LR NIfTI -> x2 SR NIfTI with the weights at `checkpoint` (`Predictor`, loaded for
    this one input; a folder of inputs: load a `Predictor` once)."""
    return Predictor.load(checkpoint, infer_cfg)(lr_path, sr_path, keep_normalised=keep_normalised, progress=progress)


# --------------------------------------------------------------------------- CLI
# the sliding-window flags of `udean infer` / `udean evaluate`: shortcuts for infer.* overrides
INFER_FLAGS = (("--device", "device", str, "auto (cuda if available), cpu, cuda, cuda:N"),
               ("--batch-size", "batch_size", int, "tiles per forward pass; 0: sized to the device"),
               ("--overlap", "overlap", float, "in-plane tile overlap, fraction of the patch"),
               ("--slab-overlap", "slab_overlap", int, "LR slices shared by consecutive slabs (null: slab - 1, a slab "
                                                       "centred on every slice)"),
               ("--lr-consistency", "lr_consistency", float, "the SR keeps the LR's k-space below this fraction of its "
                                                             "Nyquist frequency (0: off)"))


def add_inferer_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sliding window", "shortcuts for the infer.* config keys; unset: the config's value")
    for flag, key, typ, text in INFER_FLAGS:
        g.add_argument(flag, type=typ, default=argparse.SUPPRESS, dest=key,
                       help=f"{text} (infer.{key}, default {InferConfig.model_fields[key].default})")
    g.add_argument("--amp", action="store_true", default=argparse.SUPPRESS,
                   help="bf16 autocast, GPU (infer.amp=true)")


def inferer_config(args: argparse.Namespace) -> InferConfig:
    """`args.cfg.infer` with the sliding-window flags applied (validated like any override)."""
    import json

    from udean.config import from_dict

    given = [f"infer.{key}={json.dumps(getattr(args, key))}" for _, key, _, _ in INFER_FLAGS if hasattr(args, key)]
    if hasattr(args, "amp"):
        given.append("infer.amp=true")
    return from_dict(args.cfg.to_dict(), given).infer if given else args.cfg.infer


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _writable(folder: Path) -> None:
    """ValueError unless a file can be created in `folder` (made if missing)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".udean-infer-probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"{folder}: cannot write the output there ({exc.strerror or exc})") from None


def _same(a: Path, b: Path) -> bool:
    """Whether `b` is `a` (the same path, or the same file through a symlink or hardlink)."""
    import os

    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def plan_outputs(src: str | Path, dst: str | Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs of `udean infer IN OUT`, checked before any work. IN a file: OUT
    is a .nii / .nii.gz file, or an existing folder that gets OUT/<input name>. IN a folder:
    every *.nii / *.nii.gz directly in it -> OUT/<same name>, OUT a folder (made if missing).
    ValueError when OUT is (or would overwrite) an input, is a file where a folder is needed, or
    cannot be written."""
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        files = sorted(f for f in src.iterdir()
                       if f.name.endswith(NIFTI_SUFFIXES) and not f.name.startswith(".") and not f.is_dir())
        if not files:
            raise ValueError(f"{src}: no NIfTI files (*.nii, *.nii.gz) in this folder")
        if dst.exists() and not dst.is_dir():
            raise ValueError(f"{dst}: is a file; the input {src} is a folder, so the output must be a folder")
        if dst.exists() and _same(src, dst):
            raise ValueError(f"{dst}: is the input folder; the SR volumes would overwrite the scans (give another folder)")
        pairs = [(f, dst / f.name) for f in files]
    elif src.is_file():
        out = dst / src.name if dst.is_dir() else dst
        if not out.name.endswith(NIFTI_SUFFIXES):
            raise ValueError(f"{dst}: the output must be a .nii or .nii.gz file (or a folder)")
        pairs = [(src, out)]
    else:
        raise FileNotFoundError(f"{src}: no such file or folder")
    for a, b in pairs:
        if _same(a, b):
            raise ValueError(f"{b}: is the input {a} (the same file); the SR volume would overwrite it")
        if b.is_dir():
            raise ValueError(f"{b}: is a folder; it cannot be an output file")
    for folder in sorted({b.parent for _, b in pairs}):
        _writable(folder)
    return pairs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = f"""{p.description}.

Each input is conformed as preprocessing conformed the training data: onto the training LR grid
(resampled within data.own.max_resample, refused beyond) and its intensity scaling. The output
has half the training LR voxel size, the input's orientation and world position (canonical SR
voxel i at canonical LR voxel i / 2) and, unless --keep-normalised, the input's intensity units.
A folder of inputs: one model load; a bad file is reported and skipped; exit 1 if any failed.

  udean infer --checkpoint runs/mine clinical/ sr/
  udean infer --checkpoint runs/mine/best scan.nii.gz scan_sr.nii.gz"""
    p.add_argument("input", metavar="IN", help="LR NIfTI file (any orientation), or a folder of them "
                                               "(*.nii, *.nii.gz directly in it)")
    p.add_argument("output", metavar="OUT", help="SR NIfTI file (.nii / .nii.gz; an existing folder: OUT/<input "
                                                 "name>), or for an input folder an output folder (made if missing)")
    p.add_argument("--checkpoint", required=True,
                   help="a training run folder (its best/, else last/), a best/ or last/ folder, a generator.pt, "
                        "or a training checkpoint RUN/checkpoints/step_N")
    p.add_argument("--keep-normalised", action="store_true",
                   help="write the [0, 1] intensities the network works in instead of the input's units")
    add_inferer_arguments(p)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from preprocessing.geometry import fmt

    console, report = Console(stderr=True), Console()
    t0 = time.perf_counter()
    pairs = plan_outputs(args.input, args.output)  # every check on the output before the model loads
    folder = Path(args.input).is_dir()
    predictor = Predictor.load(args.checkpoint, inferer_config(args))
    failed: list[tuple[Path, str]] = []
    with Progress(TextColumn("[bold]infer[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        files = bar.add_task("scans", total=len(pairs))
        tiles = bar.add_task("", total=None)
        for src, dst in pairs:
            bar.update(tiles, description=src.name, completed=0, total=None)
            try:
                res = predictor(src, dst, keep_normalised=args.keep_normalised,
                                progress=lambda done, total: bar.update(tiles, completed=done, total=total))
            except (ValueError, FileNotFoundError, OSError) as exc:
                if not folder:
                    raise
                msg = str(exc) if str(src) in str(exc) else f"{src}: {exc}"
                failed.append((src, msg))
                console.print(f"[red]udean infer: skipped:[/] {escape(msg)}", highlight=False)
            else:
                rec = res.input
                how = (f"resampled from {fmt(rec['input_voxel_mm'])} mm, " if rec["resampled"] else "")
                report.print(f"udean infer: {src} -> {dst}: {how}{res.lr_shape} -> {res.sr_shape} canonical, voxel "
                              f"{fmt(np.sqrt((res.sr_affine[:3, :3] ** 2).sum(0)))} mm, values "
                              f"{res.value_range[0]:.4g}..{res.value_range[1]:.4g}"
                              f"{' (normalised)' if args.keep_normalised else ''}, {res.tiles} tiles on {res.device}",
                              highlight=False, markup=False)
            bar.advance(files)
    done = len(pairs) - len(failed)
    console.print(f"udean infer: {done} of {len(pairs)} scans super-resolved"
                  + (f", {len(failed)} failed (above)" if failed else "") + f" in {time.perf_counter() - t0:.1f} s",
                  highlight=False, style="bold red" if failed else "")
    return 1 if failed else 0
