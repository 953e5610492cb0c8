"""Training checkpoints: atomic, the last K kept, validated on load, resumed implicitly.

Layout under `train.out` (`checkpoint_dir` names a checkpoint for writer and reader alike):

    checkpoints/
      step_00000040/            one checkpoint, named by completed steps
        G/ds/...                DeepSpeed engine of the generators (module, optimizer, LR schedule)
        D/ds/...                DeepSpeed engine of the discriminators
        state_rank{r}.pt        our state per rank: step, epoch, sampler, RNG, counters, best
        sr_fp32.pt              the SR network's weights as the optimizer's float32 masters (under
                                bf16 / fp16 the engine's module holds a rounded copy)
        files.json              size + sha256 of every file above (written last: "complete")
      latest                    name of the newest checkpoint (a hint for people and tools)
      .tmp-step_...             a checkpoint being written; renamed when complete
    best/                       inference checkpoint of the best validation epoch (the last weights
                                when no validation ran): generator.pt, config.yaml, best.json
    last/                       inference checkpoint of the newest checkpoint: generator.pt,
                                config.yaml, last.json (`save_inference`; `udean export` makes
                                one from any checkpoint, `sr_weights`). All three hold float32
                                master weights.

Writing: every rank writes into the temp folder (DeepSpeed's save is collective; ZeRO ranks
write their own optimizer shards), rank 0 lists the files with their sha256, renames the folder
into place, rewrites `latest` and prunes: the new checkpoint and the `keep_last - 1` newest
before it stay. Pruning never touches a checkpoint of a higher step (left by a run that was
resumed from an earlier one; the resumed run replaces it when it gets there), so the newest
checkpoint that verifies is never deleted. A crash at any point leaves the previous checkpoints
intact; a disk too full for the previous checkpoint's size is an `OutputError` before writing.

Reading (the resume rule, docs/architecture.md "Resume"): a run resumes only a checkpoint of
the same config (`resume_mismatch`: every key but `FREE_KEYS`, which cannot change the trained
state) and the same data (the shard hashes); otherwise `ResumeRefused` names what differs.
A ZeRO >= 1 checkpoint holds the optimizer state sharded across its ranks: resuming it at
another world size is refused the same way (not treated as corruption). Candidates are tried
newest first, each verified (files.json, sizes, hashes) and loaded with weights_only=True; if
any rank fails, all ranks fall back to the previous checkpoint together, with a warning naming
what was wrong; when checkpoints exist but none loads, `ResumeRefused` says why: never a silent
start from step 0. RNG: each process saves and restores its own generators and the CUDA
generator of its own device only (a resume with fewer visible GPUs still loads).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hpc.atomic import atomic_path, atomic_write_text, check_free_space, file_mismatch, sha256_file
from preprocessing.config import diff_keys

TAG = "ds"  # DeepSpeed's tag inside G/ and D/
SR_FP32 = "sr_fp32.pt"  # in a checkpoint: the SR network's float32 master weights
NAME = re.compile(r"^step_(\d{8,})$")
# config keys that cannot change the trained state (paths, logging, checkpoint cadence, loader
# processes, validation, which only picks best/, the collective backend, compiled or eager
# kernels, inference settings): a resume may change them; every other key must be the one the
# run was started with
FREE_KEYS = ("train.out", "train.log_every", "train.num_workers", "train.checkpoint_every", "train.keep_last",
             "train.val_every", "train.val_subjects", "train.best_by", "train.progress_every", "train.max_nonfinite",
             "train.backend", "train.compile", "train.stage_dir",
             "data.out", "data.root", "infer")


class ResumeRefused(ValueError):
    """train.out holds a run this start must not continue (or cannot): a user-facing error."""


def resume_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted config keys that differ between the run's config and this start's, `FREE_KEYS` aside.
    The saved config is read with this version's defaults first: a key added since the run was
    saved (a new switch, off by default) is not a difference."""
    from udean.config import from_dict

    try:
        saved = from_dict(saved).to_dict()
    except ValueError:  # a key this version no longer has: compared as saved, so it differs
        pass
    return [k for k in diff_keys(saved, current) if not any(k == f or k.startswith(f + ".") for f in FREE_KEYS)]


def step_of(folder: Path) -> int:
    return int(NAME.match(folder.name).group(1))


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
def _cuda_index(device: Any) -> int | None:
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.current_device() if device.index is None else device.index


def rng_state(device: Any = None) -> dict[str, Any]:
    """This process's RNGs, in types torch.load(weights_only=True) accepts: Python, NumPy,
    torch's CPU generator and, for a CUDA `device`, that device's generator only (the one this
    process draws from; the other visible GPUs belong to other ranks)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if (index := _cuda_index(device)) is not None:
        state["cuda"] = torch.cuda.get_rng_state(index)
    return state


def cuda_state_for(saved: Any, index: int) -> torch.Tensor | None:
    """The saved CUDA generator state for device `index`: the one tensor saved now, or (older
    checkpoints saved every visible GPU) entry `index` of that list when it has one."""
    if isinstance(saved, torch.Tensor):
        return saved
    if isinstance(saved, (list, tuple)) and 0 <= index < len(saved):
        return saved[index]
    return None


def set_rng_state(state: dict[str, Any], device: Any = None) -> None:
    torch.set_rng_state(state["torch"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    index = _cuda_index(device)
    if index is not None and (cuda := cuda_state_for(state.get("cuda"), index)) is not None:
        torch.cuda.set_rng_state(cuda, index)


# --------------------------------------------------------------------------- save / load
def _size(folder: Path) -> int:
    try:
        return sum(int(v["bytes"]) for v in json.loads((folder / "files.json").read_text()).values())
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def save(out: str | os.PathLike, step: int, engines, state: dict[str, Any], dist, keep_last: int,
         sr_weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Collective: write the checkpoint of `step` atomically; keep it and the `keep_last - 1`
    newest older ones. OutputError on every rank (before anything is written) when the disk
    has less room than the previous checkpoint took. `sr_weights` (`Engines.inference_weights`):
    written as `SR_FP32` by rank 0."""
    from hpc.atomic import OutputError

    final = checkpoint_dir(out, step)
    tmp = final.parent / f".tmp-{final.name}"
    problem = None
    if dist.is_main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
            tmp.mkdir(parents=True)
            previous = list_checkpoints(out)
            check_free_space(tmp, _size(previous[0]) if previous else 0)
        except (OSError, OutputError) as exc:
            problem = str(exc) if isinstance(exc, OutputError) else str(OutputError(tmp, exc))
    problem = dist.broadcast_object(problem)
    if problem:  # decided together: no rank starts a collective save the others skip
        raise OutputError(tmp, problem.split(": ", 1)[-1])
    dist.barrier()
    engines.g.save_checkpoint(str(tmp / "G"), tag=TAG, save_latest=False)
    engines.d.save_checkpoint(str(tmp / "D"), tag=TAG, save_latest=False)
    with atomic_path(tmp / f"state_rank{dist.rank}.pt") as p:
        torch.save({**state, "rank": dist.rank, "rng": rng_state(getattr(dist, "device", None))}, p)
    if dist.is_main and sr_weights is not None:
        with atomic_path(tmp / SR_FP32) as p:
            torch.save(sr_weights, p)
    dist.barrier()
    if dist.is_main:
        atomic_write_text(tmp / "files.json", json.dumps(_inventory(tmp), indent=1))
        if final.exists():  # the same step saved before (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(final.parent / "latest", final.name + "\n")
        older = [c for c in list_checkpoints(out) if step_of(c) < step]
        for old in older[max(keep_last - 1, 0):]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def refusal(folder: Path, state: dict[str, Any], expect: dict[str, Any] | None, world_size: int) -> str | None:
    """Why the run in `folder`'s state must not be resumed by this start, or None.

    expect: {"config": Config.to_dict(), "data": data fingerprint, "parts": `built_parts` of the
    engines' modules} of this start (None: no check)."""
    if expect is None:
        return None
    if isinstance(state.get("config"), dict):
        keys = resume_mismatch(state["config"], expect["config"])
        if keys:
            return (f"checkpoint {folder.name} was trained with another config: {', '.join(keys[:10])} differ "
                    "(only " + ", ".join(FREE_KEYS) + " may change on a resume)")
    if state.get("data") and expect.get("data") and state["data"] != expect["data"]:
        return (f"checkpoint {folder.name} was trained on other data: the source/target shards of data.out are "
                "not the ones it saw")
    if expect.get("parts"):
        saved = state.get("parts") or full_parts(expect["config"])  # written before parts were recorded: all built
        if saved != expect["parts"]:
            diff = sorted({f"{k}.{n}" for k in ("g", "d") for n in set(saved.get(k, [])) ^ set(expect["parts"][k])})
            return (f"checkpoint {folder.name} holds other networks than this start builds ({', '.join(diff)} differ; "
                    "an earlier version built every network, also those no active loss term reads): its weights "
                    "and optimizer state do not fit; resume it with the version that wrote it")
    saved_world, zero = int(state.get("world_size", world_size)), int(expect["config"]["train"]["zero_stage"])
    if zero >= 1 and saved_world != world_size:
        return (f"checkpoint {folder.name} holds ZeRO stage {zero} optimizer state sharded over {saved_world} "
                f"rank(s); this job has {world_size}: resume it with {saved_world} rank(s)")
    return None


def full_parts(config: dict[str, Any]) -> dict[str, list[str]]:
    """The networks of a full build of this config (every one, whatever the loss reads)."""
    from udean.config import from_dict
    from udean.models.udean import discriminator_parts, generator_parts

    model = from_dict(config).model
    return {"g": list(generator_parts(model)), "d": list(discriminator_parts(model))}


def _load_one(folder: Path, engines, dist, expect: dict[str, Any] | None) -> dict[str, Any]:
    """Our state and both engines from `folder`; ResumeRefused before loading anything when the
    run there is not this start's to continue."""
    path = folder / f"state_rank{dist.rank}.pt"
    if not path.exists():  # a different world size than the run that saved (ZeRO 0): rank 0's counters
        path = folder / "state_rank0.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    why = refusal(folder, state, expect, dist.world_size)
    if why:
        raise ResumeRefused(why)
    for name, engine in (("G", engines.g), ("D", engines.d)):
        loaded, _ = engine.load_checkpoint(str(folder / name), tag=TAG)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder / name}")
    if dist.rank == int(state.get("rank", dist.rank)):
        set_rng_state(state["rng"], getattr(dist, "device", None))
    return state


def load_latest(out: str | os.PathLike, engines, dist, warn: Callable[[str], None],
                expect: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Collective: load the newest valid checkpoint into the engines and return our state; None
    when `out` has no checkpoint. A corrupt one is skipped, with `warn`, for the one before it.
    ResumeRefused (on every rank) when the run is not this start's to continue (`refusal`) or
    when checkpoints exist but none loads."""
    candidates = dist.broadcast_object([str(p) for p in list_checkpoints(out)] if dist.is_main else None)
    reasons = []
    for i, name in enumerate(candidates):
        folder = Path(name)
        problem = dist.broadcast_object(verify(folder) if dist.is_main else None)
        state, refused = None, None
        if problem is None:
            try:
                state = _load_one(folder, engines, dist, expect)
            except ResumeRefused as exc:
                refused = str(exc)
            except Exception as exc:  # noqa: BLE001 - any unreadable piece means: not this one
                problem = f"{type(exc).__name__}: {exc}"
        if dist.all_reduce_flag(refused is not None):
            why = dist.broadcast_object(refused if dist.is_main else None) or "refused on another rank"
            raise ResumeRefused(f"{out}: {why}; or start over with --restart (the old run is moved aside, not "
                                "deleted) or another train.out")
        if not dist.all_reduce_flag(problem is not None):
            engines.g_updated()  # collective: every rank loaded
            return state
        reasons.append(f"{folder.name}: {problem or 'failed on another rank'}")
        if i + 1 < len(candidates):
            warn(f"checkpoint {folder.name} is corrupt ({problem or 'failed on another rank'}); "
                 f"falling back to {Path(candidates[i + 1]).name}")
    if candidates:
        raise ResumeRefused(f"{out}: has {len(candidates)} checkpoint(s) and none loads ({'; '.join(reasons)}); "
                            "not starting over from step 0: repair or remove them, or use --restart (the old run "
                            "is moved aside, not deleted)")
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


def sr_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The SR network's weights (`inference_state_dict` keys) in the training checkpoint `folder`,
    verified against files.json and read with weights_only=True: its float32 masters (`SR_FP32`),
    or, in a checkpoint written before those were saved, the generator's weights DeepSpeed saved
    (the engine's copy: rounded under bf16 / fp16). ValueError naming the folder otherwise."""
    from udean.engines import _allow_deepspeed_checkpoint_types
    from udean.models.udean import INFERENCE_PARTS

    folder = Path(folder)
    if not (folder / "files.json").is_file():
        raise ValueError(f"{folder}: not a complete training checkpoint (no files.json)")
    problem = verify(folder)
    if problem:
        raise ValueError(f"{folder}: corrupt training checkpoint ({problem})")
    fp32 = (folder / SR_FP32).is_file()
    path = folder / SR_FP32 if fp32 else folder / "G" / TAG / "mp_rank_00_model_states.pt"
    _allow_deepspeed_checkpoint_types()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable for any reason: say which file
        raise ValueError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    module = state if fp32 else state.get("module") if isinstance(state, dict) else None
    if not isinstance(module, dict) or not module:
        raise ValueError(f"{path}: no module weights in it (a ZeRO-3 checkpoint keeps them partitioned: "
                         "export is for ZeRO stages 0-2)")
    return {k: v for k, v in module.items() if k.split(".", 1)[0] in INFERENCE_PARTS}


def unreadable_weights(path: str | os.PathLike, exc: BaseException) -> str:
    """The one-line error for a weights file torch.load (weights_only) refused or could not read."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    why = ("it holds pickled objects other than tensors (refused unread: loading them could run code)"
           if isinstance(exc, pickle.UnpicklingError) else
           f"truncated, or not a torch checkpoint ({type(exc).__name__}: {first[:160]})")
    return f"{path}: cannot be loaded as weights: {why}"
