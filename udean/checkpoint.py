"""Training checkpoints: atomic, the last K kept, validated on load, resumed implicitly.

Layout under `train.out` (`checkpoint_dir` names a checkpoint for writer and reader alike):

    checkpoints/
      step_00000040/            one checkpoint, named by completed steps
        G/ds/...                DeepSpeed engine of the generators (module, optimizer, LR schedule)
        D/ds/...                DeepSpeed engine of the discriminators
        state_rank{r}.pt        our state per rank: step, epoch, sampler, RNG, counters, best
        files.json              size + sha256 of every file above (written last: "complete")
      latest                    name of the newest checkpoint (a hint for people and tools)
      .tmp-step_...             a checkpoint being written; renamed when complete
    best/                       inference checkpoint of the best validation epoch (the last weights
                                when no validation ran): generator.pt, config.yaml, best.json
    last/                       inference checkpoint of the newest checkpoint: generator.pt,
                                config.yaml, last.json (`save_inference`; `udean export` makes
                                one from any checkpoint, `generator_state`)

Writing: every rank writes into the temp folder (DeepSpeed's save is collective; ZeRO ranks
write their own optimizer shards), rank 0 lists the files with their sha256, renames the folder
into place, rewrites `latest` and prunes to the newest `keep_last`. A crash at any point leaves
the previous checkpoints intact. Reading: newest first, each is verified (files.json, sizes,
hashes) and loaded with weights_only=True; if any rank fails, all ranks fall back to the
previous checkpoint together, with a warning naming what was wrong.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hpc.atomic import atomic_path, atomic_write_text, file_mismatch, sha256_file

TAG = "ds"  # DeepSpeed's tag inside G/ and D/
NAME = re.compile(r"^step_(\d{8,})$")


def checkpoint_dir(out: str | os.PathLike, step: int) -> Path:
    """The folder of the checkpoint taken after `step` completed steps (writer and reader)."""
    return Path(out) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with files.json), newest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME.match(p.name)) and (p / "files.json").exists()]
    return [p for _, p in sorted(found, reverse=True)]


def _inventory(folder: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "files.json"}


def verify(folder: Path) -> str | None:
    """None if every file listed in files.json is there with its size and hash, else what is wrong."""
    try:
        listed = json.loads((folder / "files.json").read_text())
    except (OSError, ValueError) as exc:
        return f"files.json unreadable ({exc})"
    for rel, want in listed.items():
        why = file_mismatch(folder / rel, want["bytes"], want["sha256"])
        if why:
            return f"{rel}: {why}"
    return None


# --------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every RNG of this process, in types torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load
def save(out: str | os.PathLike, step: int, engines, state: dict[str, Any], dist, keep_last: int) -> Path:
    """Collective: write the checkpoint of `step` atomically, keep the newest `keep_last`."""
    final = checkpoint_dir(out, step)
    tmp = final.parent / f".tmp-{final.name}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
        tmp.mkdir(parents=True)
    dist.barrier()
    engines.g.save_checkpoint(str(tmp / "G"), tag=TAG, save_latest=False)
    engines.d.save_checkpoint(str(tmp / "D"), tag=TAG, save_latest=False)
    with atomic_path(tmp / f"state_rank{dist.rank}.pt") as p:
        torch.save({**state, "rank": dist.rank, "rng": rng_state()}, p)
    dist.barrier()
    if dist.is_main:
        atomic_write_text(tmp / "files.json", json.dumps(_inventory(tmp), indent=1))
        if final.exists():  # the same step saved before (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(final.parent / "latest", final.name + "\n")
        for old in list_checkpoints(out)[keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _load_one(folder: Path, engines, rank: int) -> dict[str, Any]:
    path = folder / f"state_rank{rank}.pt"
    if not path.exists():  # a different world size than the run that saved: rank 0's counters
        path = folder / "state_rank0.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, engine in (("G", engines.g), ("D", engines.d)):
        loaded, _ = engine.load_checkpoint(str(folder / name), tag=TAG)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder / name}")
    if rank == int(state.get("rank", rank)):
        set_rng_state(state["rng"])
    return state


def load_latest(out: str | os.PathLike, engines, dist, warn: Callable[[str], None]) -> dict[str, Any] | None:
    """Collective: load the newest valid checkpoint into the engines and return our state
    (None when there is none). A corrupt one is skipped, with `warn`, for the one before it."""
    candidates = dist.broadcast_object([str(p) for p in list_checkpoints(out)] if dist.is_main else None)
    for i, name in enumerate(candidates):
        folder = Path(name)
        problem = dist.broadcast_object(verify(folder) if dist.is_main else None)
        state = None
        if problem is None:
            try:
                state = _load_one(folder, engines, dist.rank)
            except Exception as exc:  # noqa: BLE001 - any unreadable piece means: not this one
                problem = f"{type(exc).__name__}: {exc}"
        if not dist.all_reduce_flag(problem is not None):
            return state
        nxt = Path(candidates[i + 1]).name if i + 1 < len(candidates) else "a fresh start"
        warn(f"checkpoint {folder.name} is corrupt ({problem or 'failed on another rank'}); "
             f"falling back to {nxt}")
    return None


def save_inference(folder: str | os.PathLike, weights: dict[str, torch.Tensor], info: dict[str, Any],
                   cfg=None, name: str | None = None) -> Path:
    """Rank 0: an inference checkpoint folder (best/, last/, `udean export`): generator.pt (the
    SR network's weights), config.yaml (the run's config: `udean infer` takes the grid, slice
    axis and intensity scaling from its data: section) and <name>.json (`info`, plus `input`:
    what inference applies to a scan, `preprocessing.nifti.scan_spec` of the LR role). Each file
    is written atomically, weights first."""
    folder = Path(folder)
    name = name or folder.name
    with atomic_path(folder / "generator.pt") as p:
        torch.save(weights, p)
    if cfg is not None:
        from udean.config import save as save_config

        save_config(cfg, folder / "config.yaml")
        info = {**info, "input": inference_input(dataset_config(cfg))}
    atomic_write_text(folder / f"{name}.json", json.dumps(info, indent=1))
    return folder / "generator.pt"


def dataset_config(cfg):
    """The data config the network learned from: the one the data set at `cfg.data.out` was made
    with (its manifest: `udean preprocess --hr ...` flags are not in the training config), else
    `cfg.data`."""
    from preprocessing.config import DataConfig
    from preprocessing.manifest import load_manifest

    try:
        recorded = load_manifest(cfg.data.out).config
    except ValueError:
        return cfg.data
    try:
        return DataConfig.model_validate({**recorded, "out": cfg.data.out}) if recorded else cfg.data
    except ValueError:
        return cfg.data


def inference_input(data) -> dict[str, Any]:
    """What inference conforms an LR scan to (udean/infer.py docstring), from a data config: the
    LR role's grid and intensity scaling (`preprocessing.nifti.scan_spec`), resampled within
    `data.own.max_resample` for every checkpoint, and the thin-slab axis."""
    from dataclasses import asdict, replace

    from preprocessing.nifti import scan_spec

    spec = replace(scan_spec(data, "LR"), max_resample=data.own.max_resample)
    return {**asdict(spec), "slice_axis": data.patches.slice_axis}


def save_best(out: str | os.PathLike, weights: dict[str, torch.Tensor], info: dict[str, Any], cfg=None) -> Path:
    """Rank 0: the inference weights of the best validation so far -> best/ (`save_inference`)."""
    return save_inference(Path(out) / "best", weights, info, cfg)


def generator_state(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The generators' weights in the training checkpoint `folder` (DeepSpeed's saved module,
    G/ds/mp_rank_00_model_states.pt), verified against files.json and read with
    weights_only=True; ValueError naming the folder otherwise."""
    from udean.engines import _allow_deepspeed_checkpoint_types

    folder = Path(folder)
    if not (folder / "files.json").is_file():
        raise ValueError(f"{folder}: not a complete training checkpoint (no files.json)")
    problem = verify(folder)
    if problem:
        raise ValueError(f"{folder}: corrupt training checkpoint ({problem})")
    path = folder / "G" / TAG / "mp_rank_00_model_states.pt"
    _allow_deepspeed_checkpoint_types()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable for any reason: say which file
        raise ValueError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    module = state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict) or not module:
        raise ValueError(f"{path}: no module weights in it (a ZeRO-3 checkpoint keeps them partitioned: "
                         "export is for ZeRO stages 0-2)")
    return module
