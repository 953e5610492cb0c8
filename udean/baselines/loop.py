"""The one training loop of the comparison methods (single process, plain PyTorch).

Paper, II-D: ADAM (beta1 0.9, beta2 0.99, eps 1e-8), cosine-decayed learning rate; the same
optimiser and schedule as `udean train`, so every method in the tables gets the same budget:
`Budget.steps` optimiser steps of `Budget.batch_size` patches.

A step runs its stages in order; a stage is (optimizer, loss function of the step index).
Supervised methods have one stage; GAN methods have a generator stage then a discriminator
stage (BasicSR order: the G step freezes D, the D step reads fakes the G step cached, detached).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from udean.engines import cosine_lr_factor

Loss = Callable[[int], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Budget:
    """What every method gets: `steps` optimiser steps of `batch_size` patches."""

    steps: int
    batch_size: int
    lr: float = 1e-4
    lr_min: float = 1e-8
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"budget: steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.lr_min <= self.lr:
            raise ValueError(f"budget: need 0 <= lr_min <= lr, got {self.lr_min}, {self.lr}")

    def split(self, parts: int) -> "Budget":
        """The budget of one of `parts` equal stages (two-stage methods share the total)."""
        return Budget(**{**self.__dict__, "steps": max(1, self.steps // parts)})


def adam(params: Iterable[torch.nn.Parameter], budget: Budget) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=budget.lr, betas=budget.betas, eps=budget.eps)


def fit(stages: Sequence[tuple[torch.optim.Optimizer, Loss]], budget: Budget,
        progress: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Run `budget.steps` steps; each step runs every stage (zero_grad, loss, backward, step).
    The learning rate of every optimizer decays from lr to lr_min (cosine). Returns one dict of
    loss values per step (the stages' dicts merged)."""
    scheds = [torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_lr_factor(s, budget.steps, budget.lr, budget.lr_min)) for opt, _ in stages]
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
