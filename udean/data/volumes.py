"""Whole paired volumes (val / test groups) and whole-volume super-resolution.

`sr_volume` is the validation path: the LR volume through `Generator.sr` by overlapping tiles.
It delegates to `udean.infer.sliding_window` (blended tiles, the same code `udean infer` runs),
so validation scores exactly what inference would produce.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from preprocessing.shards import read_volume
from udean.infer import sliding_window


def load_pair(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A val/test volume file -> (lr (D, H, W), hr (2D, 2H, 2W)) float32. Volume files store the
    slice axis first already (docs/data-format.md), so nothing is moved here."""
    v = read_volume(path)
    return np.asarray(v["lr"], dtype=np.float32), np.asarray(v["hr"], dtype=np.float32)


@torch.no_grad()
def sr_volume(model: Callable[[torch.Tensor], torch.Tensor], lr_volume: np.ndarray, patch: tuple[int, int],
              overlap: float = 0.25, batch: int = 8, slab: int = 3, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> np.ndarray:
    """(D, H, W) LR volume, slice axis first -> (2D, 2H, 2W) SR volume, float32.

    model: (B, slab, h, w) -> (B, 2 slab, 2h, 2w), e.g. `Generator.sr`; tiles are cast to
    `dtype` (the engine's precision) and the output back to float32."""
    def run(tiles: torch.Tensor) -> torch.Tensor:
        return model(tiles.to(dtype)).float()

    return sliding_window(lr_volume, run, slab=slab, patch=tuple(patch), overlap=overlap,
                          slab_overlap=None, batch_size=batch, device=device)
