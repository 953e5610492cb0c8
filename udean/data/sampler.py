"""Which (source, target) patch pairs each rank sees, in which order: a pure function of
(seed, epoch, rank, world), so a resumed run sees exactly the batches it would have seen.

Per epoch, target and source indices each come from their own permutation stream (independent
draws: unpaired, paper II-C; in misaligned mode the source group is the moved copy of the target
subjects and the same sampler applies). A stream is permutation after permutation of 0..N-1,
seeded by (seed, epoch, stream, k), so an epoch longer than a group just starts another pass.
Rank r takes every `world`-th element of each stream starting at r: within one pass over a
group, ranks see disjoint patches.

Augmentation (`train.augment`, `train.augment_source`): each patch's in-plane transform k
(`udean.data.shards.dihedral`) comes from one draw per epoch and rank, masked per group:
`dihedral` keeps all 8 (k in 0..7), `flips` only the 4 flips (k & 3: no transpose, so an
anisotropic target such as partial Fourier along one axis keeps its axes), `none` 0.

State: (epoch, position), position = samples already consumed by this rank in this epoch.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

SOURCE, TARGET, AUGMENT = 0, 1, 2
# augmentation choice -> mask of the dihedral index k (bit 4: the transpose)
AUGMENT_MASK = {"none": 0, "dihedral": 7, "flips": 3}


def _stream(n: int, count: int, seed: int, epoch: int, which: int) -> np.ndarray:
    """The first `count` indices of the epoch's permutation stream over 0..n-1."""
    passes = -(-count // n)
    perms = [np.random.default_rng([seed, epoch, which, k]).permutation(n) for k in range(passes)]
    return np.concatenate(perms)[:count]


def rank_indices(n: int, per_rank: int, seed: int, epoch: int, which: int, rank: int, world: int) -> np.ndarray:
    """This rank's `per_rank` indices into a group of `n` patches for `epoch`."""
    return _stream(n, per_rank * world, seed, epoch, which)[rank::world]


class UnpairedSampler(Sampler):
    """Yields (i_source, i_target, k_source, k_target) for this rank: `batch_size *
    steps_per_epoch` per epoch. k_*: the in-plane flip / rotation of each patch (0..7, see
    `udean.data.shards.dihedral`) allowed by `augment` (target; `augment_source` for the source,
    None: the same; a bool is none / dihedral), else 0."""

    def __init__(self, n_source: int, n_target: int, batch_size: int, steps_per_epoch: int,
                 seed: int, rank: int = 0, world_size: int = 1, augment: str | bool = "none",
                 augment_source: str | bool | None = None):
        if n_source < 1 or n_target < 1:
            raise ValueError(f"need patches in both groups, got source={n_source} target={n_target}")
        self.n_source, self.n_target = n_source, n_target
        self.batch_size, self.steps_per_epoch = batch_size, steps_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size

        def mask(choice: str | bool) -> int:
            choice = {True: "dihedral", False: "none"}.get(choice, choice) if isinstance(choice, bool) else choice
            if choice not in AUGMENT_MASK:
                raise ValueError(f"augment {choice!r}: allowed {', '.join(AUGMENT_MASK)}")
            return AUGMENT_MASK[choice]

        self.masks = (mask(augment if augment_source is None else augment_source), mask(augment))
        self.epoch, self.position = 0, 0

    @staticmethod
    def default_steps(n_target: int, batch_size: int, world_size: int) -> int:
        """One pass over the target LR patches (train.steps_per_epoch=0)."""
        steps = n_target // (batch_size * world_size)
        if steps < 1:
            raise ValueError(f"{n_target} target patches are fewer than one batch on every rank "
                             f"(batch_size {batch_size} x {world_size} ranks); set train.steps_per_epoch")
        return steps

    def __len__(self) -> int:
        return self.batch_size * self.steps_per_epoch - self.position

    def set_position(self, epoch: int, step_in_epoch: int) -> None:
        """Start `epoch` after `step_in_epoch` batches (resume mid-epoch)."""
        self.epoch, self.position = epoch, step_in_epoch * self.batch_size

    def pairs(self, epoch: int) -> np.ndarray:
        """(per_rank, 4) array of (i_source, i_target, k_source, k_target) for the whole epoch."""
        per_rank = self.batch_size * self.steps_per_epoch
        src = rank_indices(self.n_source, per_rank, self.seed, epoch, SOURCE, self.rank, self.world_size)
        tgt = rank_indices(self.n_target, per_rank, self.seed, epoch, TARGET, self.rank, self.world_size)
        ks = np.zeros((per_rank, 2), dtype=np.int64)
        if any(self.masks):
            ks = np.random.default_rng([self.seed, epoch, AUGMENT, self.rank]).integers(0, 8, (per_rank, 2))
            ks &= np.asarray(self.masks, dtype=np.int64)
        return np.column_stack([src, tgt, ks])

    def __iter__(self) -> Iterator[tuple[int, int, int, int]]:
        for row in self.pairs(self.epoch)[self.position:]:
            yield tuple(int(v) for v in row)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
