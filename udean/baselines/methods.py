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
    budget; its log goes to <run>.log. Resumes (or does nothing) when `run` holds checkpoints."""
    from udean.commands import environment, executable

    run.mkdir(parents=True, exist_ok=True)
    conf = run.parent / f"{run.name}.yaml"
    save(cfg, conf)
    cmd = [executable("udean"), "train", "--config", str(conf), f"train.out={run}", "train.epochs=1",
           f"train.steps_per_epoch={budget.steps}", f"train.checkpoint_every={budget.steps}", "train.val_every=1",
           "train.val_subjects=1"]
    if console is not None:
        console.print(f"[dim]$ {shlex.join(cmd)}[/]", highlight=False)
    res = subprocess.run(cmd, env=environment(1), capture_output=True, text=True)
    (run.parent / f"{run.name}.log").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"udean train failed ({res.returncode}); log: {run.parent / f'{run.name}.log'}\n"
                           + (res.stdout + res.stderr)[-3000:])
    return run


def train_methods(data: dict[str, Config], budget: Budget, runs: Path, device, *, registration_iterations: int = 200,
                  progress: Progress | None = None, console=None) -> tuple[dict[str, Callable], dict[str, dict]]:
    """Every method of the module docstring trained (or loaded from `runs`) -> ({key: SR network},
    {key: info: seconds, first / last losses, registration reports ...})."""
    from preprocessing.config import DegradationConfig
    from preprocessing.manifest import load_manifest
    from udean.baselines import pairs
    from udean.baselines.cyclegan import CycleGANSR
    from udean.baselines.dasr import DASR
    from udean.baselines.supervised import SupervisedTSRCAN
    from udean.infer import load_sr_model

    unp, mis = data["unpaired"], data["misaligned"]
    m_unp, m_mis = load_manifest(unp.data.out), load_manifest(mis.data.out)
    slab, model, loss = unp.data.patches.slab, unp.model, unp.loss
    nets: dict[str, Callable] = {}
    info: dict[str, dict] = {}

    def say(text: str) -> None:
        if console is not None:
            console.print(text)

    def callback(key: str):
        return None if progress is None else progress(key, budget.steps)

    def fresh(cls, *a, **k):
        torch.manual_seed(budget.seed)  # every method starts from the same seeded initialisation
        return cls(model, slab, *a, alpha=loss.alpha, window=loss.ssim_window, **k)

    def supervised(key: str, make_pairs: Callable[[], tuple]) -> None:
        net = fresh(SupervisedTSRCAN)

        def train():
            lr, hr = make_pairs()
            info.setdefault(key, {})["pairs"] = int(len(lr))
            return net.fit(lr, hr, budget, progress=callback(key))

        nets[key] = cached(runs / f"{key}.pt", net, train, device, info.setdefault(key, {}))

    def unsupervised(key: str, cls, m) -> None:
        net = fresh(cls)
        lr_t, hr_s = pairs.unpaired_pools(m)
        nets[key] = cached(runs / f"{key}.pt", net, lambda: net.fit(lr_t, hr_s, budget, progress=callback(key)),
                           device, info.setdefault(key, {}))

    # Table I: supervised benchmarks
    supervised("b1", lambda: pairs.misaligned_pairs(m_mis))

    def registered():
        say("registering moved HR to LR (SimpleITK, Mattes MI, Euler3D)")
        lr, hr, reports = pairs.registered_pairs(m_mis, iterations=registration_iterations)
        info.setdefault("b2", {})["registration"] = reports
        return lr, hr

    supervised("b2", registered)
    supervised("b3", lambda: pairs.nearest_pairs(pairs.unpaired_pools(m_unp)[1]))
    # Table II: unsupervised peers on unpaired and misaligned data
    unsupervised("cyclegan_unp", CycleGANSR, m_unp)
    unsupervised("dasr_unp", DASR, m_unp)
    unsupervised("cyclegan_mis", CycleGANSR, m_mis)
    unsupervised("dasr_mis", DASR, m_mis)
    # UDEAN itself, the same budget
    for key, name in (("udean_unp", "unpaired"), ("udean_mis", "misaligned"), ("udean_real", "realistic")):
        if name not in data:
            continue
        t = time.perf_counter()
        run = train_udean(data[name], runs / f"udean_{name}", budget, console)
        nets[key], _ = load_sr_model(run, device)
        info[key] = {"train_seconds": round(time.perf_counter() - t, 2), "run": str(run)}
    # degradation-shift study: supervised on synthetic pairs made with each training degradation
    if "realistic" in data:
        supervised("sup_kspace", lambda: pairs.degraded_pairs(m_unp, DegradationConfig(**m_unp.config["degradation"])))
        real = load_manifest(data["realistic"].data.out)
        supervised("sup_real", lambda: pairs.degraded_pairs(m_unp, DegradationConfig(**real.config["degradation"])))
    return nets, info
