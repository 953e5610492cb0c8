"""Degradation-shift benchmark (issue 19): does UDEAN adapt to a target degradation that k-space
truncation misses, where interpolation, denoising + interpolation and a model trained on
truncated LR do not?

    python benchmarks/shift.py --protocol tiny --jobs 2           # CI smoke test, minutes
    python benchmarks/shift.py --jobs 2                           # the CPU protocol: hours
    python benchmarks/shift.py --levels pf_noise --seeds 1 --methods udean_unp oracle tricubic
    python benchmarks/shift.py --udean-config recommended model.features=16   # another recipe

One harness, one evaluator: a synthetic cohort, preprocessed once per level of shift
(`data.degradation.level`: truncation, pf, pf_noise, psf, mixed; preprocessing/config.py
LEVELS) and mode (unpaired, misaligned), with the noise-free truth of every source patch stored
(`data.degradation.truth`, for the fidelity logs of UDEAN's runs). Every method of
`udean.baselines.methods` (the registry: what trains on what) with the same SR network, the
same budget (optimiser steps x batch, Adam, cosine LR: `--steps`, `--batch`, `--width`) and the
same `udean.evaluate.Evaluator` on the level's test volumes, whole volume and head mask:

    tricubic      Tricubic interpolation
    denoise       non-local means + tricubic, strength chosen on val (Rician-biased: NLM assumes
                  Gaussian noise)
    sup_trunc     supervised TS-RCAN on truncated LR of the source HR (the paper's benchmark 3:
                  the shift); one model per seed, the same for every level
    oracle        supervised on the level's true degradation of the source HR (an upper bound)
    udean_unp     UDEAN on unpaired source HR / target LR (`udean train`, DeepSpeed)
    udean_mis     UDEAN on misaligned source HR (the target subjects moved) / target LR
    udean_fixed   udean_unp with every target-matching weight 0 (lambda da, fa, spectrum, noise):
                  the SR learns on the degradation network's start, which nothing moves; the
                  control of the fidelity logs (seed 0 only)
    cyclegan_unp, dasr_unp   CycleGAN and DASR on the unpaired pools

Real anatomy (`--real DIR`): a flat folder of held-out HR scans (NIfTI, isotropic; voxel size
from the first file's header or `--real-voxel`), preprocessed as test volumes at every level
(each scan gets the level's degradation; `mixed`: its own draw) and scored with every model
trained on the synthetic cohort: the same rows, in tables of their own (results_real/).

Seeds (`--seeds N`): UDEAN, the supervised rows and the oracle train with seeds 0..N-1 (default
3), CycleGAN and DASR with seed 0; mean ± std over test subjects x seeds. The UDEAN recipe is
`--udean-config PATH|name` plus trailing overrides (they apply to the one config every method
and data set is built from); by default the protocol's config with the recommended recipe (`recipe()`).

Resumes: every run (level, method, seed) writes <work>/results/<level>/<method>/s<seed>.json
when it is done (weights are cached under <work>/weights/<hash of config + budget>/), and a
rerun skips what exists; killing it loses at most the runs in flight. `--jobs N` runs N of them
at once, each in its own process with one thread (plan the full run with the wall times in
the results). Outputs (`--results`, default benchmarks/results): shift_<tag>.json (`rows`:
method, level, region, psnr_mean, ssim_mean, psnr_std, ssim_std, seeds, n; per-run details;
provenance), shift_<tag>.md, shift_<tag>_<level>.png (bars) and shift_<tag>_<level>_slices.png.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, bar_chart, provenance, relative, write_json  # noqa: E402

LEVELS = ("truncation", "pf", "pf_noise", "psf", "mixed")
# key -> (row label, trained with every seed?)
METHODS = {
    "tricubic": ("Tricubic interpolation", False),
    "denoise": ("Denoise (NLM, Rician-biased) + tricubic", False),
    "sup_trunc": ("Supervised on truncated LR (the shift)", True),
    "oracle": ("Supervised on the true degradation (oracle)", True),
    "udean_unp": ("UDEAN, unpaired", True),
    "udean_mis": ("UDEAN, misaligned", True),
    "udean_fixed": ("UDEAN, degradation not adapted", False),
    "cyclegan_unp": ("CycleGAN, unpaired", False),
    "dasr_unp": ("DASR, unpaired", False),
}


def adaptation_off(cfg):
    """`cfg` with every weight that matches X_{s~t} to X_t at 0 (lambda_da, lambda_fa,
    lambda_spectrum, lambda_noise): method udean_fixed."""
    from udean.config import from_dict

    d = cfg.to_dict()
    d["loss"].update(lambdas=[*d["loss"]["lambdas"][:4], 0.0, 0.0], lambda_spectrum=0.0, lambda_noise=0.0)
    return from_dict(d)


def recipe() -> list[str]:
    """The recommended recipe as overrides: every key where udean/configs/recommended.yaml differs
    from paper.yaml (one home for it: the `tiny` protocol's config gets it this way; `demo` is
    based on recommended already)."""
    from preprocessing.config import diff_keys, flatten
    from udean.config import load

    paper, rec = load("paper").to_dict(), load("recommended").to_dict()
    values = flatten(rec)
    return [f"{k}={json.dumps(values[k])}" for k in diff_keys(paper, rec)]


@dataclass
class Protocol:
    udean_config: str  # the default --udean-config (`recipe()` is added to it)
    shape: tuple[int, int, int]  # synthetic cohort
    counts: tuple[int, int, int, int]  # source / target / val / test subjects
    data: list[str] = field(default_factory=list)  # data: overrides (patches)
    steps: int = 1000
    batch: int = 8
    width: int = 16
    seeds: int = 3


PROTOCOLS = {
    # CI: every level, method and table on tiny data, one seed, a few steps
    "tiny": Protocol("tiny", (64, 64, 48), (2, 2, 1, 2), ["data.patches.max_per_subject=12"], steps=6, batch=2,
                     width=8, seeds=1),
    # the CPU protocol: 96x96x80 heads, the minimum budget (1000 steps x 8, demo width)
    "cpu": Protocol("demo", (96, 96, 80), (6, 6, 1, 3), [
        "data.patches.lr_size=[32,32]", "data.patches.stride=[16,16]", "data.patches.slab_stride=1",
        "data.patches.max_per_subject=96", "data.patches.min_foreground=0.3"]),
}


# --------------------------------------------------------------------------- configs
def configs(args, proto: Protocol, work: Path) -> dict[str, dict[str, dict]]:
    """{level: {"unpaired" | "misaligned": config as a dict}}: the one config, per data set."""
    from udean.config import load

    base = ([] if args.udean_config else recipe()) + [
        f"data.root={work / 'cohort'}", "data.split.preset=counts", f"data.split.counts={list(proto.counts)}",
        *proto.data, f"train.batch_size={args.batch or proto.batch}", f"model.features={args.width or proto.width}",
        "train.precision=fp32", "train.num_workers=0", "train.fidelity_every=100", "train.log_every=50",
        *args.overrides]
    name = args.udean_config or proto.udean_config
    first = load(name, base)
    margin = list(first.model.source_margin)
    out = {}
    for level in sorted(set(args.levels) | ({"truncation"} if "sup_trunc" in args.methods else set())):
        out[level] = {}
        for mode in ("unpaired", "misaligned") if "udean_mis" in args.methods else ("unpaired",):
            cfg = load(name, base + [f"data.mode={mode}", f"data.degradation.level={level}",
                                     "data.degradation.truth=true", f"data.patches.source_margin={margin}",
                                     f"data.out={work / 'data' / level / mode}"])
            out[level][mode] = cfg.to_dict()
    return out


def real_configs(args, cfgs: dict, work: Path) -> dict[str, dict]:
    """{level: the config of the `--real` scans' test data at that level} ({} without --real):
    the level's unpaired config with the scans as its only (test) subjects."""
    if not args.real:
        return {}
    import nibabel as nib

    root = Path(args.real).resolve()
    scans = sorted(f for f in root.iterdir() if f.name.endswith((".nii", ".nii.gz")) and not f.name.startswith("."))
    if not scans:
        raise SystemExit(f"shift.py: --real {root}: no .nii / .nii.gz files in it")
    voxel = args.real_voxel or float(np.mean(nib.load(scans[0]).header.get_zooms()[:3]))
    out = {}
    for level, modes in cfgs.items():
        d = json.loads(json.dumps(modes["unpaired"]))
        d["data"].update(root=str(root), layout="flat", out=str(work / "real" / level), voxel_size_mm=voxel)
        d["data"]["split"].update(preset="counts", counts=[0, 0, 0, len(scans)])
        out[level] = _cfg(d).to_dict()
    return out


def _cfg(d: dict):
    from udean.config import from_dict

    return from_dict(d)


# --------------------------------------------------------------------------- jobs (one process each)
def result_path(work: Path, level: str, method: str, seed: int, real: bool = False) -> Path:
    return work / ("results_real" if real else "results") / level / method / f"s{seed}.json"


def claim(work: Path, cfgs: dict, steps: int) -> None:
    """A work folder's results belong to one recipe: each level's folder records the configs
    and budget its runs were made with (results/<level>/config.json), and a later invocation
    with another one is refused (naming the keys) instead of reporting the old runs as its own."""
    from hpc.atomic import atomic_write_text
    from preprocessing.config import diff_keys

    for level, modes in cfgs.items():
        want = json.loads(json.dumps({"configs": modes, "steps": steps}, default=str))
        path = work / "results" / level / "config.json"
        if path.is_file():
            have = json.loads(path.read_text())
            if have != want:
                keys = diff_keys(have, want)
                raise SystemExit(f"shift.py: {path} holds {level} runs of another recipe or budget (differs in: "
                                 f"{', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}); choose another --work")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(want, indent=1) + "\n")


def prepare(data_cfg: dict) -> str:
    """Preprocess one data set (resumes: finished subjects are kept)."""
    import torch

    from preprocessing.driver import preprocess
    from preprocessing.manifest import load_manifest

    torch.set_num_threads(1)
    cfg = _cfg(data_cfg)
    if preprocess(cfg.data, progress=False).failed:
        raise RuntimeError(f"preprocessing {cfg.data.out}: {load_manifest(cfg.data.out).failed()[0].error}")
    return cfg.data.out


def run(spec: dict) -> dict:
    """Train (or load) one method at one seed and score it on the test volumes of every level in
    spec["levels"] (sup_trunc: every level; the others: their own), and on the `--real` scans at
    every level in spec["real_levels"]; writes the result files."""
    import torch

    from hpc.atomic import atomic_write_text
    from preprocessing.manifest import load_manifest
    from preprocessing.shards import read_volume
    from udean.baselines.methods import VOLUME_METHODS, budget_of, runs_dir, train_one
    from udean.evaluate import Evaluator, tricubic
    from udean.infer import Inferer

    torch.set_num_threads(1)
    work, method, seed = Path(spec["work"]), spec["method"], spec["seed"]
    train_level = spec["train_level"]
    data = {mode: _cfg(d).model_copy(update={"train": _cfg(d).train.model_copy(update={"seed": seed})})
            for mode, d in spec["configs"][train_level].items()}
    if method == "udean_fixed":
        data = {mode: adaptation_off(c) for mode, c in data.items()}
    unp = data["unpaired"]
    budget = budget_of(unp, spec["steps"], "cpu")
    t = time.perf_counter()
    info: dict = {}
    if method == "tricubic":
        fn = lambda v: tricubic(v.lr, v.hr.shape)  # noqa: E731
    else:
        runs = runs_dir(work / "weights", unp, budget, method=method)
        net, info = train_one("udean_unp" if method == "udean_fixed" else method, data, budget, runs, "cpu")
        if method in VOLUME_METHODS:
            fn = net
        else:
            inferer = Inferer.from_config(unp.infer, unp.data.patches, "cpu")
            fn = lambda v: inferer(v.lr, net)  # noqa: E731
        if method.startswith("udean_"):
            info["fidelity"] = fidelity_rows(Path(info["run"]) / "metrics.jsonl")
    train_s = time.perf_counter() - t
    out = {}
    for level, real in [(lv, False) for lv in spec["levels"]] + [(lv, True) for lv in spec["real_levels"]]:
        t = time.perf_counter()
        test = _cfg(spec["reals"][level] if real else spec["configs"][level]["unpaired"])
        volumes = [read_volume(p) for p in load_manifest(test.data.out).volume_paths("test")]
        keep = {}

        def first(vol, preds, scores):
            if not keep:
                keep.update(subject=vol.subject, pred=preds[method])

        (res,) = Evaluator({method: fn}, window=unp.loss.ssim_window).run(volumes, on_volume=first)
        path = result_path(work, level, method, seed, real)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".npy"), keep["pred"].astype(np.float16))  # the slice figure's panel
        doc = {"method": method, "level": level, "seed": seed, "data": "real" if real else "synthetic",
               "trained_at": train_level, "subjects": res.subjects,
               "train_seconds": round(float(info.get("train_seconds", train_s)), 1),
               "eval_seconds": round(time.perf_counter() - t, 1), "cached": bool(info.get("cached")),
               "info": {k: v for k, v in info.items() if k in ("strength", "val_psnr_head", "note", "pairs", "fidelity",
                                                              "first", "last", "steps")}}
        atomic_write_text(path, json.dumps(doc, indent=1, default=float) + "\n")
        out[f"{level}{' (real)' if real else ''}"] = doc
    return out


def fidelity_rows(metrics: Path) -> list[dict]:
    """The fidelity rows of a UDEAN run's metrics.jsonl (udean/fidelity.py)."""
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in ("kind", "time", "epoch")} for r in rows if r.get("kind") == "fidelity"]


def jobs(args, work: Path, cfgs: dict, steps: int, seeds: int, reals: dict) -> list[dict]:
    """The runs not done yet (or not scored on the `--real` scans yet), longest first (UDEAN),
    so the pool stays full."""
    todo = []
    for method in args.methods:
        for seed in range(seeds if METHODS[method][1] else 1):
            levels = list(args.levels) if method == "sup_trunc" else None
            for level in (["truncation"] if levels else args.levels):
                want = levels or [level]
                missing = [lv for lv in want if not result_path(work, lv, method, seed).is_file()]
                real = [lv for lv in want if reals and not result_path(work, lv, method, seed, True).is_file()]
                if missing or real:
                    todo.append({"work": str(work), "method": method, "seed": seed, "train_level": level,
                                 "levels": missing, "real_levels": real, "configs": cfgs, "reals": reals,
                                 "steps": steps})
    order = {m: i for i, m in enumerate(("udean_unp", "udean_mis", "udean_fixed", "sup_trunc", "oracle", "dasr_unp", "cyclegan_unp",
                                         "denoise", "tricubic"))}
    return sorted(todo, key=lambda j: order[j["method"]])


def pool(n: int) -> ProcessPoolExecutor:
    # a fresh process per job: one thread each, no state carried between runs
    return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)


# --------------------------------------------------------------------------- report
def collect(work: Path, levels, methods, real: bool = False) -> tuple[list[dict], list[dict]]:
    """(rows: one per level x method x region, runs: one per result file) of the synthetic test
    volumes, or with `real` of the `--real` scans (rows and runs carry "data")."""
    rows, runs = [], []
    data = "real" if real else "synthetic"
    for level in levels:
        for method in methods:
            docs = [json.loads(p.read_text()) for p in sorted(result_path(work, level, method, 0, real).parent.glob("s*.json"))]
            if not docs:
                continue
            runs += [{**{k: d[k] for k in ("method", "level", "seed", "train_seconds", "eval_seconds", "info")},
                      "data": data} for d in docs]
            for region, suffix in (("volume", ""), ("head", "_head")):
                row = {"method": method, "label": METHODS[method][0], "level": level, "region": region, "data": data,
                       "seeds": [d["seed"] for d in docs], "n": sum(len(d["subjects"]) for d in docs)}
                for score in ("psnr", "ssim"):
                    v = np.array([s[score + suffix] for d in docs for s in d["subjects"]], dtype=np.float64)
                    row[f"{score}_mean"] = float(v.mean())
                    row[f"{score}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
                rows.append(row)
    return rows, runs


def markdown(doc: dict) -> str:
    meta, prov = doc["meta"], doc["meta"]["provenance"]
    lines = [f"# Degradation shift (`--protocol {meta['protocol']}`)", "",
             f"- date: {prov['date']}; machine: {prov['machine']['cpu']}, {prov['machine']['cores']} cores, "
             f"no GPU used; {meta['jobs']} run(s) at a time, one thread each",
             f"- command: `{prov['command']}`", f"- wall time of this invocation: {meta['seconds']:.0f} s",
             f"- data: synthetic cohort {meta['shape']} (0.7 mm), source/target/val/test = "
             f"{'/'.join(map(str, meta['counts']))}; levels: {', '.join(meta['levels'])} (preprocessing/config.py LEVELS)",
             f"- budget, every learned method: {meta['budget']['steps']} optimiser steps x {meta['budget']['batch_size']} "
             f"patches, Adam lr {meta['budget']['lr']:g} -> {meta['budget']['lr_min']:g} (cosine), SR width "
             f"{meta['width']}; UDEAN recipe: `{meta['udean_config']}` {' '.join(meta['udean_overrides'])}"]
    if meta.get("real"):
        lines.append(f"- real anatomy: {meta['real']['scans']} held-out scan(s) in `{meta['real']['root']}` "
                     f"({meta['real']['voxel_mm']:g} mm), each degraded at every level and scored with the models "
                     "trained on the synthetic cohort (the \"real anatomy\" tables)")
    lines += ["", "PSNR (dB) / SSIM, mean ± sample std over test subjects x seeds; whole volume and the dilated "
              "head mask (udean.evaluate.head_mask). Decisions are made on the head: a noisy background rewards any "
              "denoising in whole-volume scores. Denoise + tricubic: NLM assumes Gaussian noise, the data are "
              "Rician (magnitude).", ""]
    for level in meta["levels"]:
        for data in ("synthetic", "real"):
            rows = [r for r in doc["rows"] if r["level"] == level and r["data"] == data]
            if not rows:
                continue
            train = data == "synthetic"
            lines += [f"## {level}" if train else f"### {level}: real anatomy (held out)", "",
                      "| Method | seeds | SSIM | PSNR | SSIM (head) | PSNR (head) | head PSNR - tricubic "
                      + ("| train s |" if train else "|"), "|---|---|---|---|---|---|---|" + ("---|" if train else "")]
            lines += _table(rows, doc["runs"], level, train) + [""]
            if train:
                lines += fidelity_table(doc["runs"], level)
        for f in doc["figures"].get(level, []):
            lines.append(f"![{Path(f).stem}]({Path(f).name})")
        lines.append("")
    return "\n".join(lines)


def _table(rows: list[dict], runs: list[dict], level: str, seconds: bool) -> list[str]:
    """The rows of one level and data set, a Markdown line per method."""
    from udean.evaluate import pm

    tri = {r["region"]: r for r in rows if r["method"] == "tricubic"}
    out = []
    for method in METHODS:
        got = {r["region"]: r for r in rows if r["method"] == method}
        if not got:
            continue
        v, h = got["volume"], got["head"]
        delta = f"{h['psnr_mean'] - tri['head']['psnr_mean']:+.2f}" if "head" in tri else "-"
        secs = [r["train_seconds"] for r in runs if (r["method"], r["level"], r["data"]) == (method, level, "synthetic")]
        out.append(f"| {v['label']} | {len(v['seeds'])} | {pm(v['ssim_mean'], v['ssim_std'], 4)} | "
                   f"{pm(v['psnr_mean'], v['psnr_std'], 2)} | {pm(h['ssim_mean'], h['ssim_std'], 4)} | "
                   f"{pm(h['psnr_mean'], h['psnr_std'], 2)} | {delta} |" + (f" {np.mean(secs):.0f} |" if seconds else ""))
    return out


def fidelity_table(runs: list[dict], level: str) -> list[str]:
    """Markdown: the fidelity logs (udean/fidelity.py) of each UDEAN run at `level`, at its first
    and last measurement: is X_{s~t} becoming the target's degradation of Y_s?"""
    rows = [r for r in runs if r["level"] == level and r["data"] == "synthetic" and r["method"].startswith("udean_")
            and r["info"].get("fidelity")]
    if not rows:
        return []
    out = ["Fidelity of the learned degradation (udean/fidelity.py, on fixed probe patches): PSNR of the noise-free "
           "X_{s~t} against the true noise-free degradation of the same Y_s, the noise level of X_{s~t} and X_t, the "
           "spread (std of log noise level over patches) of each, and the distance of their radial k-space profiles "
           "(decades).", "", "| run | step | PSNR to truth (dB) | noise X_{s~t} / X_t | spread X_{s~t} / X_t "
           "| profile distance |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (list(METHODS).index(r["method"]), r["seed"])):
        fid = r["info"]["fidelity"]
        for f in (fid[0], fid[-1]):
            spread = (f"{f['noise_spread_st']:.3f} / {f['noise_spread_t']:.3f}" if "noise_spread_st" in f else "-")
            out.append(f"| {METHODS[r['method']][0]}, seed {r['seed']} | {f['step']} | {f.get('psnr_truth', float('nan')):.2f} "
                       f"| {f['noise_st']:.4f} / {f['noise_t']:.4f} | {spread} | {f['profile_distance']:.3f} |")
    return out + [""]


def _relative_tree(tree):
    """A config tree with every path inside the repository written relative to it (`relative`)."""
    if isinstance(tree, dict):
        return {k: _relative_tree(v) for k, v in tree.items()}
    return relative(tree) if isinstance(tree, str) and Path(tree).is_absolute() else tree


def figures(doc: dict, work: Path, cfgs: dict, results: Path, tag: str) -> dict[str, list[str]]:
    """Per level: a bar chart (PSNR / SSIM minus tricubic's, head and whole volume) and the
    slices of the first test subject for every method (seed 0)."""
    from preprocessing.manifest import load_manifest
    from preprocessing.shards import read_volume
    from udean.figures import volume_figure

    out: dict[str, list[str]] = {}
    for level in doc["meta"]["levels"]:
        rows = [r for r in doc["rows"] if r["level"] == level and r["data"] == "synthetic"]
        tri = {r["region"]: r for r in rows if r["method"] == "tricubic"}
        if not rows or len(tri) < 2:
            continue
        panels = []
        for score, region in (("psnr", "head"), ("psnr", "volume"), ("ssim", "head"), ("ssim", "volume")):
            rs = [r for r in rows if r["region"] == region and r["method"] != "tricubic"]
            panels.append({"title": f"{level}: {score.upper()} - tricubic, {region}", "labels": [r["label"] for r in rs],
                           "values": [r[f"{score}_mean"] - tri[region][f"{score}_mean"] for r in rs],
                           "notes": [f"± {r[f'{score}_std']:.{2 if score == 'psnr' else 4}f}" for r in rs],
                           "xlabel": "dB" if score == "psnr" else "SSIM", "ref": (0.0, "tricubic")})
        files = []
        png = bar_chart(results / f"shift_{tag}_{level}.png", panels, title=f"degradation shift: {level}")
        if png is not None:
            files.append(relative(png))
        vol = read_volume(load_manifest(_cfg(cfgs[level]["unpaired"]).data.out).volume_paths("test")[0])
        preds, scores = {}, {}
        for method in METHODS:
            npy = result_path(work, level, method, 0).with_suffix(".npy")
            res = result_path(work, level, method, 0)
            if npy.is_file() and res.is_file():
                label = METHODS[method][0].replace(", ", "\n").replace(" (", "\n(")
                preds[label] = np.load(npy).astype(np.float32)
                s = json.loads(res.read_text())["subjects"][0]
                scores[label] = {"psnr": s["psnr_head"], "ssim": s["ssim_head"]}
        if preds:
            files.append(relative(volume_figure(vol, preds, results / f"shift_{tag}_{level}_slices.png", scores=scores,
                                                title=f"{vol.subject} (test), {level}: head PSNR / SSIM, x2x2x2")))
        out[level] = files
    return out


# --------------------------------------------------------------------------- main
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="trailing key.sub=value arguments override the UDEAN config (and so every "
                                "data set and the SR network of every method)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    p.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--seeds", type=int, default=None, help="training seeds of UDEAN, supervised, oracle (default 3)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per learned method (default 1000)")
    p.add_argument("--batch", type=int, default=None, help="patches per step (default 8)")
    p.add_argument("--width", type=int, default=None, help="model.features of every network (default 16, the demo's)")
    p.add_argument("--udean-config", default=None,
                   help="the UDEAN recipe, a config PATH or shipped name (default: the protocol's + the recommended recipe)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each its own process with one thread")
    p.add_argument("--work", default=None, help="cohort, data, weights, per-run results; default shift_out/<protocol>")
    p.add_argument("--results", default=str(RESULTS), help="where the tables and figures go")
    p.add_argument("--tag", default=None, help="file tag: shift_<tag>.*; default the protocol")
    p.add_argument("--real", default=None, metavar="DIR",
                   help="a folder of held-out real HR scans (NIfTI): every model is also scored on them at every level")
    p.add_argument("--real-voxel", type=float, default=None, metavar="MM",
                   help="their isotropic voxel size (default: the first file's header)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from preprocessing.cohort import cohort_ready, write_cohort

    args = parse(argv)
    proto = PROTOCOLS[args.protocol]
    t0 = time.perf_counter()
    work = Path(args.work or Path("shift_out") / args.protocol).resolve()
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    tag = args.tag or args.protocol
    steps = args.steps or proto.steps
    seeds = args.seeds or proto.seeds
    n = sum(proto.counts)
    if not cohort_ready(work / "cohort", n, proto.shape):
        print(f"cohort: {n} synthetic subjects {proto.shape} -> {work / 'cohort'}", flush=True)
        write_cohort(work / "cohort", n, proto.shape, seed=0, progress=False)
    cfgs = configs(args, proto, work)

    reals = real_configs(args, cfgs, work)
    with pool(args.jobs) as ex:  # data: every level x mode (and the --real scans at every level)
        for f in as_completed([ex.submit(prepare, d) for lv in cfgs.values() for d in lv.values()]
                              + [ex.submit(prepare, d) for d in reals.values()]):
            print(f"data: {relative(f.result())}", flush=True)
    claim(work, cfgs, steps)
    todo = jobs(args, work, cfgs, steps, seeds, reals)
    print(f"{len(todo)} run(s) to do, {args.jobs} at a time", flush=True)
    with pool(args.jobs) as ex:
        futures = {ex.submit(run, j): j for j in todo}
        for f in as_completed(futures):
            j = futures[f]
            for level, d in f.result().items():
                print(f"{level:10s} {j['method']:12s} seed {j['seed']}: head PSNR "
                      f"{np.mean([s['psnr_head'] for s in d['subjects']]):.2f} dB, train {d['train_seconds']:.0f} s"
                      f"{' (cached)' if d['cached'] else ''}", flush=True)

    from udean.baselines.methods import budget_of

    rows, runs = collect(work, args.levels, args.methods)
    if reals:
        rows2, runs2 = collect(work, args.levels, args.methods, real=True)
        rows, runs = rows + rows2, runs + runs2
    first = _cfg(next(iter(cfgs.values()))["unpaired"])
    doc = {"rows": rows, "runs": runs, "meta": {
        "protocol": args.protocol, "levels": list(args.levels), "methods": list(args.methods), "seeds": seeds,
        "jobs": args.jobs, "shape": list(proto.shape), "counts": list(proto.counts),
        "budget": budget_of(first, steps, "cpu").to_dict(), "width": first.model.features,
        "udean_config": args.udean_config or proto.udean_config,
        "udean_overrides": ([] if args.udean_config else recipe()) + list(args.overrides),
        "config": _relative_tree(first.to_dict()), "provenance": provenance(argv),
        "real": reals and {"root": relative(Path(args.real).resolve()),
                           "scans": next(iter(reals.values()))["data"]["split"]["counts"][3],
                           "voxel_mm": next(iter(reals.values()))["data"]["voxel_size_mm"]}}}
    doc["figures"] = figures(doc, work, cfgs, results, tag)
    doc["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(results / f"shift_{tag}.json", doc)
    from hpc.atomic import atomic_write_text

    atomic_write_text(results / f"shift_{tag}.md", markdown(doc))
    print(f"results: {relative(results / f'shift_{tag}.md')}\n         {relative(results / f'shift_{tag}.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
