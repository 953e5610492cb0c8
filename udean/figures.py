"""Comparison figures in the style of the paper's Fig. 3 / 4: sagittal and axial slices of LR,
tricubic, SR and HR, with |error| maps against HR. Arrays in, PNG out (matplotlib, Agg).

Volumes are canonical (RAS+, `VolumePair.canonical`): axis 0 runs right-left, so a sagittal
slice fixes axis 0 and an axial slice fixes axis 2. The LR volume is shown upsampled
by nearest neighbour, so every panel has the HR grid.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def nearest_up(lr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """LR (X, Y, Z) -> nearest-neighbour x2 on the HR grid `shape` (LR voxel j = HR voxel 2j, 2j+1)."""
    up = lr.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    out = np.zeros(shape, dtype=np.float32)
    sl = tuple(slice(0, min(a, b)) for a, b in zip(shape, up.shape))
    out[sl] = up[sl]
    return out


def centre_of(mask: np.ndarray | None, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The centre of the head mask's bounding box (of the volume without a mask)."""
    if mask is None or not np.any(mask):
        return tuple(n // 2 for n in shape)
    idx = [np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(int((i[0] + i[-1]) // 2) for i in idx)


def _views(vol: np.ndarray, centre: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(sagittal, axial) slices as images with superior / anterior up (rows = y or z)."""
    sag = vol[centre[0], :, :].T  # (Z, Y): rows inferior -> superior with origin="lower"
    axi = vol[:, :, centre[2]].T  # (Y, X)
    return sag, axi


def comparison_figure(hr: np.ndarray, panels: dict[str, np.ndarray], out_png: str | os.PathLike, *,
                      lr: np.ndarray | None = None, mask: np.ndarray | None = None, title: str = "",
                      error_max: float | None = None, scores: dict[str, tuple[float, float]] | None = None) -> Path:
    """Write a 2-row figure (sagittal, axial): [LR], each of `panels` (e.g. tricubic, UDEAN), HR,
    then |panel - HR| for each panel.

    hr: (X, Y, Z) canonical HR volume in [0, 1]; panels: name -> volume of hr's shape;
    lr: (X/2, Y/2, Z/2), shown nearest-upsampled; scores: name -> (PSNR, SSIM) for the titles;
    error_max: colour limit of the error maps (default: the 99.9th percentile of all errors).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = centre_of(mask, hr.shape)
    images: list[tuple[str, np.ndarray, str]] = []
    if lr is not None:
        images.append(("LR (nearest)", nearest_up(lr, hr.shape), "image"))
    for name, vol in panels.items():
        label = name if not scores or name not in scores else f"{name}\n{scores[name][0]:.2f} dB / {scores[name][1]:.4f}"
        images.append((label, vol, "image"))
    images.append(("HR", hr, "image"))
    errors = {name: np.abs(vol - hr) for name, vol in panels.items()}
    if error_max is None:
        error_max = float(max(np.percentile(e, 99.9) for e in errors.values())) or 1.0
    for name, e in errors.items():
        images.append((f"|{name} - HR|", e, "error"))

    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.3 * n, 5.2), squeeze=False, layout="constrained")
    for col, (label, vol, kind) in enumerate(images):
        for row, view in enumerate(_views(vol, centre)):
            ax = axes[row, col]
            if kind == "image":
                ax.imshow(view, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", interpolation="nearest")
            else:
                im = ax.imshow(view, cmap="inferno", vmin=0.0, vmax=error_max, origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(label, fontsize=8)
        if col == 0:
            axes[0, 0].set_ylabel("sagittal", fontsize=9)
            axes[1, 0].set_ylabel("axial", fontsize=9)
    if errors:
        fig.colorbar(im, ax=axes[:, -len(errors):].ravel().tolist(), shrink=0.8, label="|error|")
    if title:
        fig.suptitle(title, fontsize=10)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def volume_figure(vol, preds: dict[str, np.ndarray], out_png: str | os.PathLike, *, title: str = "",
                  scores: dict[str, dict[str, float]] | None = None) -> Path:
    """`comparison_figure` of a `preprocessing.shards.VolumePair` and stored-layout predictions
    (the evaluator's): everything is turned canonical here. scores: name -> {"psnr", "ssim"}."""
    c = vol.canonical
    return comparison_figure(c.hr, {k: vol.to_canonical(p) for k, p in preds.items()}, out_png, lr=c.lr,
                             mask=c.mask, title=title,
                             scores=None if scores is None else {k: (s["psnr"], s["ssim"]) for k, s in scores.items()})
