"""The one training loop of the comparison methods (single process, plain PyTorch).

Paper, II-D: ADAM (beta1 0.9, beta2 0.99, eps 1e-8), cosine-decayed learning rate; the same
optimiser and schedule as `udean train` (`udean.engines.adam` / `cosine_schedule`, from the same
`train:` section), so every method in the tables gets the same budget: `Budget.steps` optimiser
steps of `train.batch_size` patches.

A step runs its stages in order; a stage is (optimizer, loss function of the step index).
Supervised methods have one stage; GAN methods have a generator stage then a discriminator
stage (BasicSR order: the G step freezes D, the D step reads fakes the G step cached, detached).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from udean.config import TrainConfig
from udean.engines import cosine_schedule

Loss = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Budget:
    """What every method gets: `steps` optimiser steps of `train.batch_size` patches, with the
    optimizer, schedule and seed of `train` (the config's `train:` section)."""

    steps: int
    train: TrainConfig
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"budget: steps must be >= 1, got {self.steps}")

    @property
    def batch_size(self) -> int:
        return self.train.batch_size

    @property
    def seed(self) -> int:
        return self.train.seed

    def split(self, parts: int) -> "Budget":
        """The budget of one of `parts` equal stages (two-stage methods share the total)."""
        return dataclasses.replace(self, steps=max(1, self.steps // parts))

    def to_dict(self) -> dict:
        """What results files record (and weight caches key on)."""
        t = self.train
        return {"steps": self.steps, "batch_size": t.batch_size, "lr": t.lr, "lr_min": t.lr_min,
                "betas": list(t.betas), "eps": t.eps, "seed": t.seed, "device": self.device}


def fit(stages: Sequence[tuple[torch.optim.Optimizer, Loss]], budget: Budget,
        progress: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Run `budget.steps` steps; each step runs every stage (zero_grad, loss, backward, step).
    The learning rate of every optimizer decays from lr to lr_min (cosine). Returns one dict of
    loss values per step (the stages' dicts merged)."""
    scheds = [cosine_schedule(opt, budget.train, budget.steps) for opt, _ in stages]
    history: list[dict[str, float]] = []
    for step in range(budget.steps):
        record: dict[str, float] = {}
        for opt, loss_fn in stages:
            opt.zero_grad(set_to_none=True)
            loss, parts = loss_fn(step)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"step {step}: non-finite loss {parts}; lower the learning rate")
            loss.backward()
            opt.step()
            record.update(parts)
        for s in scheds:
            s.step()
        history.append(record)
        if progress is not None:
            progress(step + 1, record)
    return history
