"""`udean export RUN [--step N] [--out DIR]`: an inference checkpoint from any training
checkpoint, for `udean infer` / `udean evaluate` (udean.checkpoint, "Layout").

A training checkpoint (RUN/checkpoints/step_N) holds both engines, their optimizers and our
state; inference needs only the SR network (paper, Fig. 1: LR encoder + SR decoder). Export
reads its float32 master weights (sr_fp32.pt; a checkpoint written before those were saved: the
generator's weights DeepSpeed saved, in the engine's precision, said so in export.json), verified
against files.json and read with weights_only=True, checks that they fit the run's SR network
(strict: RUN/config.yaml) and writes generator.pt, config.yaml and export.json to DIR (default
RUN/export/step_N).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from udean import checkpoint
from udean.config import Config


def training_checkpoint(run: str | Path, step: int | None = None) -> Path:
    """The training checkpoint of `run` after `step` steps (default: the newest complete one);
    `run` may also be a checkpoint folder itself. ValueError naming the folder otherwise."""
    run = Path(run)
    if (run / "files.json").is_file() and step is None:
        return run
    if step is not None:
        folder = checkpoint.checkpoint_dir(run, step)
        if not (folder / "files.json").is_file():
            have = ", ".join(p.name for p in checkpoint.list_checkpoints(run)) or "none"
            raise ValueError(f"{folder}: no complete training checkpoint of step {step} (have: {have})")
        return folder
    found = checkpoint.list_checkpoints(run)
    if not found:
        raise ValueError(f"{run}: no training checkpoints (expected {run}/checkpoints/step_N)")
    return found[0]


def run_config(folder: Path) -> Config:
    """The config of the run a training checkpoint belongs to (RUN/config.yaml)."""
    from udean.config import load

    path = folder.parent.parent / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{folder}: no {path} (the run's config) beside the checkpoints")
    return load(path)


def from_training_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], Config]:
    """(inference weights, the run's config) of a training checkpoint folder
    (`checkpoint.sr_weights`); the weights must fit the run's SR network (strict)."""
    from udean.models.udean import load_inference

    folder = Path(folder)
    cfg = run_config(folder)
    weights = checkpoint.sr_weights(folder)
    try:
        load_inference(weights, cfg.model)
    except (RuntimeError, ValueError) as exc:
        text = " ".join(str(exc).split())
        raise ValueError(f"{folder}: its weights do not fit the model of {folder.parent.parent / 'config.yaml'} "
                         f"({text[:300]})") from None
    return weights, cfg


def export(run: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    """Write the inference checkpoint of `run`'s checkpoint `step` (default: newest) to `out`
    (default RUN/export/step_N); returns the generator.pt written."""
    folder = training_checkpoint(run, step)
    weights, cfg = from_training_checkpoint(folder)
    kind = ("float32 master weights" if (folder / checkpoint.SR_FP32).is_file() else
            "the engine's module weights (the checkpoint predates its float32 masters: rounded under bf16 / fp16)")
    n = int(checkpoint.NAME.match(folder.name).group(1)) if checkpoint.NAME.match(folder.name) else None
    out = Path(out) if out is not None else folder.parent.parent / "export" / folder.name
    return checkpoint.save_inference(out, weights, {"step": n, "checkpoint": str(folder), "weights": kind}, cfg,
                                     name="export")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="training run folder (train.out), or one of its checkpoints "
                                              "RUN/checkpoints/step_N")
    p.add_argument("--step", type=int, default=None, help="the checkpoint after N steps (default: the newest)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/export/step_N)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    path = export(args.run, args.step, args.out)
    Console().print(f"udean export: {path} (+ config.yaml, export.json); use it with "
                    f"`udean infer --checkpoint {path.parent} IN OUT`", highlight=False)
    return 0
