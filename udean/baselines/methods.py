"""Which method trains on what: the rows of the paper's Tables I and II (and the degradation-
shift study), each trained with the same `Budget` from the same seeded initialisation, weights
cached so a rerun only trains what is missing. benchmarks/quality.py runs this; so can anyone:

    nets, info = train_methods({"unpaired": cfg_u, "misaligned": cfg_m}, budget_of(cfg_u, 2000, "cpu"),
                               runs=Path("runs"), device="cpu")
    # nets[key]: LR tiles (B, S, h, w) -> SR tiles (B, 2S, 2h, 2w), for an `Inferer`

Data sets (a Config each, preprocessed at `cfg.data.out`): "unpaired" and "misaligned" (the
paper's two modes, same target / val / test subjects), optionally "realistic" (unpaired, target
LR with the acquisition effects truncation misses). Keys, and what each trains on:

    b1            SupervisedTSRCAN on misaligned (LR, moved HR) patch pairs        (Table I, 1)
    b2            SupervisedTSRCAN on rigidly registered pairs                     (Table I, 2)
    b3            SupervisedTSRCAN on (nearest-downsampled, HR) source pairs       (Table I, 3)
    cyclegan_unp, dasr_unp / cyclegan_mis, dasr_mis
                  CycleGANSR / DASR on the unpaired / misaligned pools             (Table II)
    udean_unp, udean_mis, udean_real
                  `udean train` (DeepSpeed, a child process) on each data set      (Tables I, II)
    sup_kspace, sup_real  (with "realistic")
                  SupervisedTSRCAN on source HR degraded by each training degradation (shift study)
    sup_trunc     SupervisedTSRCAN on (k-space truncation of the source HR, HR): the paper's
                  degradation whatever the target's (benchmarks/shift.py: the degradation shift)
    oracle        SupervisedTSRCAN on (the unpaired data set's own degradation of the source HR,
                  HR): the true degradation, an upper bound no user has (shift.py; = sup_kspace)
    denoise       not trained: DIPY's Rician non-local means + tricubic, its strength chosen on the
                  paired val volumes (none: DIPY's noise estimate as it is; `udean.baselines.denoise`);
                  a volume method, not a network (`VOLUME_METHODS`)

`train_one(key, ...)` trains (or loads) one of them; `train_methods` every one quality.py needs.
ZSSR trains on each test volume itself (`udean.baselines.zssr.ZSSR`, an evaluator method).
"""
from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from udean.baselines.loop import Budget
from udean.config import Config, save

Progress = Callable[[str, int], Callable[[int, dict], None] | None]  # (key, steps) -> per-step callback


def budget_of(cfg: Config, steps: int, device: str | torch.device) -> Budget:
    """`steps` optimiser steps with `cfg.train`'s optimizer; `steps` <= 0: the paper's budget,
    train.epochs x one pass over the target LR patches."""
    from preprocessing.manifest import load_manifest

    t = cfg.train
    if steps <= 0:
        steps = t.epochs * max(1, load_manifest(cfg.data.out).patch_count("target") // t.batch_size)
    return Budget(steps=steps, train=t, device=str(device))


def runs_dir(root: Path, cfg: Config, budget: Budget, **extra) -> Path:
    """<root>/<hash>: trained weights are reused only for the same config, budget and `extra`."""
    key = {"config": cfg.to_dict(), "budget": budget.to_dict(), **extra}
    return Path(root) / hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached(path: Path, module: torch.nn.Module, train: Callable[[], list], device, info: dict) -> torch.nn.Module:
    """Train `module` unless `path` holds its weights; `info` (filled by `train` and here: time,
    first / last losses) is saved beside the weights and restored with them. Returns the module
    in eval mode on `device`."""
    side = path.with_suffix(".json")
    if path.is_file() and side.is_file():
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
        info.update(json.loads(side.read_text()), cached=True)
        return module.to(device).eval()
    t = time.perf_counter()
    history = train()
    info.update(train_seconds=round(time.perf_counter() - t, 2), first=history[0], last=history[-1], steps=len(history))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": module.state_dict()}, path)
    side.write_text(json.dumps(info, indent=1))
    return module.to(device).eval()


def train_udean(cfg: Config, run: Path, budget: Budget, console=None) -> Path:
    """`udean train` in a child process (DeepSpeed, one process) into `run`, with the shared
    budget; its log is appended to <run>.log. Resumes (or does nothing) when `run` holds checkpoints."""
    from udean.commands import environment, executable

    run.mkdir(parents=True, exist_ok=True)
    conf = run.parent / f"{run.name}.yaml"
    save(cfg, conf)
    cmd = [executable("udean"), "train", "--config", str(conf), f"train.out={run}", "train.epochs=1",
           f"train.steps_per_epoch={budget.steps}", f"train.checkpoint_every={budget.steps}", "train.val_every=1",
           "train.val_subjects=1"]
    line, log = shlex.join(cmd), run.parent / f"{run.name}.log"
    if console is not None:
        console.print(f"[dim]$ {line}[/]", highlight=False)
    res = subprocess.run(cmd, env=environment(1), capture_output=True, text=True)
    with open(log, "a") as f:  # appended: a relaunch on a cached run keeps its training log
        f.write(f"$ {line}\n{res.stdout}{res.stderr}")
    if res.returncode != 0:
        raise RuntimeError(f"udean train failed ({res.returncode}); log: {log}\n" + (res.stdout + res.stderr)[-3000:])
    return run


VOLUME_METHODS = ("denoise",)  # keys whose result maps a VolumePair to a prediction, not LR tiles
KEYS = ("b1", "b2", "b3", "cyclegan_unp", "dasr_unp", "cyclegan_mis", "dasr_mis", "udean_unp", "udean_mis",
        "udean_real", "sup_kspace", "sup_real", "sup_trunc", "oracle", *VOLUME_METHODS)


def train_one(key: str, data: dict[str, Config], budget: Budget, runs: Path, device, *,
              registration_iterations: int = 200, progress: Progress | None = None,
              console=None) -> tuple[Callable, dict]:
    """Method `key` (the module docstring) trained on `data`, or loaded from `runs` where it was
    trained with the same config and budget -> (SR network, or for VOLUME_METHODS an evaluator
    method; info: seconds, first / last losses, ...)."""
    from preprocessing.config import DegradationConfig
    from preprocessing.manifest import load_manifest
    from udean.baselines import pairs
    from udean.baselines.cyclegan import CycleGANSR
    from udean.baselines.dasr import DASR
    from udean.baselines.supervised import SupervisedTSRCAN
    from udean.infer import load_sr_model

    if key not in KEYS:
        raise ValueError(f"method {key!r}: allowed {', '.join(KEYS)}")
    unp = data["unpaired"]
    slab, model, loss = unp.data.patches.slab, unp.model, unp.loss
    info: dict = {}
    callback = None if progress is None else progress(key, budget.steps)

    def fresh(cls, *a, **k):
        torch.manual_seed(budget.seed)  # every method starts from the same seeded initialisation
        return cls(model, slab, *a, alpha=loss.alpha, window=loss.ssim_window, **k)

    def supervised(make_pairs: Callable[[], tuple]) -> Callable:
        net = fresh(SupervisedTSRCAN)

        def train():
            lr, hr = make_pairs()
            info["pairs"] = int(len(lr))
            return net.fit(lr, hr, budget, progress=callback)

        return cached(runs / f"{key}.pt", net, train, device, info)

    def unsupervised(cls, name: str) -> Callable:
        net = fresh(cls)
        lr_t, hr_s = pairs.unpaired_pools(load_manifest(data[name].data.out))
        return cached(runs / f"{key}.pt", net, lambda: net.fit(lr_t, hr_s, budget, progress=callback), device, info)

    def own_degradation(name: str) -> Callable:
        """Supervised on the source HR degraded as data set `name`'s target was (its level's draws)."""
        m_unp, m = load_manifest(unp.data.out), load_manifest(data[name].data.out)
        return supervised(lambda: pairs.degraded_pairs(m_unp, DegradationConfig(**m.config["degradation"])))

    if key == "b1":
        return supervised(lambda: pairs.misaligned_pairs(load_manifest(data["misaligned"].data.out))), info
    if key == "b2":
        def registered():
            if console is not None:
                console.print("registering moved HR to LR (SimpleITK, Mattes MI, Euler3D)")
            lr, hr, reports = pairs.registered_pairs(load_manifest(data["misaligned"].data.out),
                                                     iterations=registration_iterations)
            info["registration"] = reports
            return lr, hr

        return supervised(registered), info
    if key == "b3":
        return supervised(lambda: pairs.nearest_pairs(pairs.source_hr(load_manifest(unp.data.out)))), info
    if key in ("cyclegan_unp", "dasr_unp", "cyclegan_mis", "dasr_mis"):
        cls = CycleGANSR if key.startswith("cyclegan") else DASR
        return unsupervised(cls, "unpaired" if key.endswith("unp") else "misaligned"), info
    if key.startswith("udean_"):
        name = {"udean_unp": "unpaired", "udean_mis": "misaligned", "udean_real": "realistic"}[key]
        t = time.perf_counter()
        run = train_udean(data[name], runs / f"udean_{name}", budget, console)
        net, _ = load_sr_model(run, device)
        return net, {"train_seconds": round(time.perf_counter() - t, 2), "run": str(run)}
    if key in ("sup_kspace", "oracle"):
        return own_degradation("unpaired"), info
    if key == "sup_real":
        return own_degradation("realistic"), info
    if key == "sup_trunc":
        m_unp = load_manifest(unp.data.out)
        return supervised(lambda: pairs.degraded_pairs(m_unp, DegradationConfig())), info
    # denoise: the strength is its only parameter, chosen on val (cached like weights)
    from preprocessing.shards import read_volume
    from udean.baselines.denoise import NOTE, choose_strength, denoise_tricubic

    side = runs / "denoise.json"
    if side.is_file():
        info.update(json.loads(side.read_text()), cached=True)
    else:
        t = time.perf_counter()
        val = [read_volume(p) for p in load_manifest(unp.data.out).volume_paths("val")]
        k, scores = choose_strength(val, loss.ssim_window)
        note = NOTE if scores else f"{NOTE}; no paired val volume to choose k on: k = {k:g}"
        info.update(strength=k, val_psnr_head=scores, note=note, train_seconds=round(time.perf_counter() - t, 2))
        runs.mkdir(parents=True, exist_ok=True)
        side.write_text(json.dumps(info, indent=1))
    return denoise_tricubic(info["strength"]), info


def train_methods(data: dict[str, Config], budget: Budget, runs: Path, device, *, registration_iterations: int = 200,
                  progress: Progress | None = None, console=None) -> tuple[dict[str, Callable], dict[str, dict]]:
    """Every method quality.py tables (the module docstring; udean_real, sup_kspace, sup_real
    with "realistic") trained (or loaded from `runs`) -> ({key: SR network}, {key: info:
    seconds, first / last losses, registration reports ...})."""
    keys = ["b1", "b2", "b3", "cyclegan_unp", "dasr_unp", "cyclegan_mis", "dasr_mis", "udean_unp", "udean_mis"]
    if "realistic" in data:
        keys += ["udean_real", "sup_kspace", "sup_real"]
    nets: dict[str, Callable] = {}
    info: dict[str, dict] = {}
    for key in keys:
        nets[key], info[key] = train_one(key, data, budget, runs, device, registration_iterations=registration_iterations,
                                         progress=progress, console=console)
    return nets, info
