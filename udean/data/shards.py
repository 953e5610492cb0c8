"""Patches from HDF5 shards: source HR patches and target LR patches, drawn independently.

A shard is one HDF5 file with a dataset `patches` (N, C, h, w) (preprocessing/shards.py). The
shards of a group are concatenated into one index space; `PatchShards[i]` reads patch i.

Built to the cohort's size (1113 subjects: about a thousand shards): the patch counts come from
the manifest (training checks every shard against its row before the first step, `udean.train`),
so no file is opened to size the index; each reader keeps at most `MAX_OPEN` shards open (least
recently used closed first), and opens them without HDF5's chunk cache (a chunk is one patch and
draws are random: the default 1 MiB cache per open dataset only held memory, per shard and per
loader worker). A loader worker's open files and memory stay bounded whatever the cohort.

HDF5 handles are opened lazily inside the process that reads (each DataLoader worker opens its
own): an h5py handle inherited across fork is shared state and corrupts reads.
"""
from __future__ import annotations

import bisect
import collections
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from preprocessing.shards import patch_count, read_patches, value_scale

MAX_OPEN = 32  # open shards per PatchShards, so per loader worker 2 x this (source, target)


class PatchShards:
    """All patches of one group's shards, as one index space 0..len-1. `counts`: the patches of
    each shard (the manifest's rows); None reads them from the files. `max_open`: shards kept
    open (None: every shard touched)."""

    def __init__(self, paths: Sequence[str | os.PathLike], counts: Sequence[int] | None = None,
                 max_open: int | None = MAX_OPEN):
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no shards given")
        if counts is None:
            counts = [patch_count(p) for p in self.paths]
        elif len(counts) != len(self.paths):
            raise ValueError(f"{len(counts)} patch counts for {len(self.paths)} shards")
        self.offsets = np.concatenate([[0], np.cumsum([int(c) for c in counts])]).astype(np.int64)
        self.max_open = max_open
        self._files: collections.OrderedDict[int, object] = collections.OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _patches(self, k: int):
        """(file, its `patches` dataset, that dataset's scale) of shard k, opened if need be."""
        if self._pid != os.getpid():  # forked after opening: never reuse the parent's handles
            self._files, self._pid = collections.OrderedDict(), os.getpid()
        entry = self._files.get(k)
        if entry is not None:
            self._files.move_to_end(k)
            return entry
        if self.max_open is not None and len(self._files) >= self.max_open:
            self._files.popitem(last=False)[1][0].close()
        import h5py

        f = h5py.File(self.paths[k], "r", rdcc_nbytes=0)
        ds = f["patches"]
        entry = self._files[k] = (f, ds, value_scale(ds))
        return entry

    def __getitem__(self, i: int) -> np.ndarray:
        """Patch i as float32 (C, h, w)."""
        if not 0 <= i < len(self):
            raise IndexError(f"patch {i} out of range 0..{len(self) - 1}")
        k = bisect.bisect_right(self.offsets, i) - 1
        _, ds, scale = self._patches(k)
        return read_patches(ds, int(i - self.offsets[k]), scale=scale)

    def open_files(self) -> int:
        return len(self._files)

    def close(self) -> None:
        for f, _, _ in self._files.values():
            f.close()
        self._files = collections.OrderedDict()

    def __getstate__(self) -> dict:
        # DataLoader workers get a copy without open handles
        return {**self.__dict__, "_files": collections.OrderedDict()}


def _flip(t: torch.Tensor, dim: int, step: int) -> torch.Tensor:
    """Flip `dim` about the centre of a coarse grid whose voxel j is voxel `step` * j of `t`:
    voxel u -> n - step - u (step 1: the plain flip). The `step - 1` voxels that fall beyond the
    edge take the edge value (replicated), like the suite's fixed resampling."""
    t = t.flip(dim)
    if step == 1:
        return t
    n = t.shape[dim]
    edge = t.narrow(dim, n - 1, 1).expand(*[step - 1 if d == dim % t.dim() else -1 for d in range(t.dim())])
    return torch.cat((t.narrow(dim, step - 1, n - step + 1), edge), dim)


def dihedral(t: torch.Tensor, k: int, step: int = 1) -> torch.Tensor:
    """The k-th (0..7) of the 8 in-plane flips / rotations of (..., H, W); 0 is the identity.
    The transpose (k & 4) applies only where H == W.

    `step`: for the HR patch of an (LR, HR) pair, the HR voxels per LR voxel (2). Pairs keep
    "LR voxel j = HR voxel 2j" (preprocessing/kspace.py) only if the HR flip mirrors about the
    same point as the LR flip: LR j -> h-1-j sends its partner HR 2j to 2h-2-2j, while a plain
    flip of 2h HR voxels sends it to 2h-1-2j (one HR voxel off: the interpolation error of a
    paired patch doubled under every flip). With `step=2` the HR flip is u -> 2h-2-u and the
    last HR voxel (beyond the LR grid) is replicated. Unpaired patches need no step."""
    if k & 1:
        t = _flip(t, -1, step)
    if k & 2:
        t = _flip(t, -2, step)
    if k & 4 and t.shape[-1] == t.shape[-2]:
        t = t.transpose(-1, -2)
    return t


class UnpairedPatches(Dataset):
    """Item (i_source, i_target, k_source, k_target) -> (Y_s (2S, 2h, 2w) HR, X_t (S, h, w) LR),
    float32 in [0, 1]; k_*: the `dihedral` transform of each patch (augmentation; 0: none).

    The indices come from independent permutations (`UnpairedSampler`): unpaired draws."""

    def __init__(self, source: PatchShards, target: PatchShards):
        self.source, self.target = source, target

    def __len__(self) -> int:
        return len(self.target)

    def __getitem__(self, item: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i_s, i_t, k_s, k_t = item
        return (dihedral(torch.from_numpy(self.source[i_s]), k_s).contiguous(),
                dihedral(torch.from_numpy(self.target[i_t]), k_t).contiguous())


def check_source_margin(model_margin, manifest) -> None:
    """model.source_margin (LR voxels of context the degradation needs around each source patch)
    must be what the data set stored (data.patches.source_margin): a ValueError naming both
    otherwise, before any training."""
    stored = tuple(manifest.config.get("patches", {}).get("source_margin", (0, 0)))
    if tuple(model_margin) != stored:
        raise ValueError(f"{manifest.out / 'manifest.json'}: source HR patches were stored with "
                         f"data.patches.source_margin={list(stored)}, but model.source_margin={list(model_margin)}: "
                         "preprocess with the same margin as the model (data.patches.source_margin) or set "
                         "model.source_margin to the data's")
