"""Quality benchmark: every row of the paper's Table I and II, plus a degradation-shift study,
trained with one budget and scored by one evaluator on the same test volumes.

    python benchmarks/quality.py --protocol tiny      # CI smoke test: minutes on a CPU
    python benchmarks/quality.py --protocol reduced   # a real comparison, < 1 h on one GPU
    python benchmarks/quality.py --protocol paper --root /data/HCP   # the paper's protocol
    python benchmarks/quality.py --protocol reduced --anatomy phantom --shape 64 64 48 --steps 300 model.features=16

Stages (every one resumes: the cohort and shards are kept, UDEAN runs resume from their
checkpoints, baseline weights are cached under <out>/runs/<hash of config + budget>/).
  1. data       a cohort (`--anatomy`, preprocessing/cohort.py: mni, the default, real T1 brains
                made from the ICBM152 2009 template, its brain box at the protocol's voxel (`tiny`
                3 mm, `reduced` 1 mm), HCP's brain mask beside each scan; phantom, the procedural
                full heads at 0.7 mm, `--shape`) or --root HCP, preprocessed three times
                (`preprocessing.driver.preprocess`): unpaired, misaligned (same target / val /
                test subjects, II-C) and "realistic" (unpaired, target LR with partial Fourier,
                elliptical k-space and noise: the acquisition effects truncation misses)
  2. train      every method by `udean.baselines.methods.train_methods` (the registry: what
                trains on what, seeded, cached): UDEAN (`udean train`, DeepSpeed) on each data set,
                the baselines of udean/baselines with the same budget (optimiser steps x batch,
                Adam, cosine LR)
  3. evaluate   `udean.evaluate.Evaluator` on the test volumes (the evaluator of
                `udean evaluate`): whole volume, head mask and, where the volumes have one, brain
                mask; tricubic from there too; figures by `udean.figures`
  4. report     Table I, Table II and the shift study as Markdown + JSON with the paper's
                numbers beside ours; Fig. 3 / 4-style PNGs with error maps

Outputs: <results>/quality_<tag>.{md,json} and quality_<tag>_fig3.png / _fig4.png, with the
provenance (machine, versions, date, command; benchmarks.common) and the anatomy ("mni",
"phantom", or "root" for --root data) in the JSON and the Markdown. The work folder's cohort and
data sets are per anatomy (<out>/cohort/<anatomy>, <out>/data/<anatomy>/).
The sliding window is the config's `infer:` section (e.g. `infer.batch_size=32`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, provenance, relative  # noqa: E402

# the paper's Tables I and II: (SSIM mean, std, PSNR mean, std)
PAPER = {
    "b1": (0.8939, 0.0140, 32.7886, 1.5546),
    "b2": (0.9025, 0.0116, 32.7823, 1.5013),
    "b3": (0.9266, 0.0102, 33.5980, 2.5317),
    "udean_mis": (0.9247, 0.0097, 34.2729, 1.8080),
    "udean_unp": (0.9242, 0.0083, 33.5159, 1.7234),
    "tricubic": (0.8981, 0.0106, 31.5862, 1.8520),
    "zssr": (0.8984, 0.0158, 32.5224, 2.0981),
    "cyclegan_unp": (0.9164, 0.0080, 33.9767, 1.7352),
    "dasr_unp": (0.8931, 0.0094, 32.3309, 1.4671),
    "cyclegan_mis": (0.8994, 0.0111, 32.7870, 1.5203),
    "dasr_mis": (0.8946, 0.0091, 32.2544, 1.4658),
}
NAMES = {
    "b1": "TS-RCAN with misaligned LR and HR",
    "b2": "TS-RCAN with registered LR and HR",
    "b3": "TS-RCAN with degradation shift",
    "udean_mis": "UDEAN with misaligned LR and HR",
    "udean_unp": "UDEAN with unpaired LR and HR",
    "tricubic": "Tricubic interpolation",
    "zssr": "ZSSR",
    "cyclegan_unp": "CycleGAN with unpaired HR and LR",
    "dasr_unp": "DASR with unpaired HR and LR",
    "cyclegan_mis": "CycleGAN with misaligned HR and LR",
    "dasr_mis": "DASR with misaligned HR and LR",
    # degradation-shift study: supervised on synthetic pairs of the training degradation
    "sup_kspace": "TS-RCAN, synthetic LR by k-space truncation",
    "sup_real": "TS-RCAN, synthetic LR by realistic acquisition",
    "udean_real": "UDEAN unpaired, target LR by realistic acquisition",
}
ANATOMY = {"mni": "real-anatomy cohort (ICBM152 2009 template, every subject a deformation of one averaged template)",
           "phantom": "phantom cohort"}
TABLE_I = ["b1", "b2", "b3", "udean_mis", "udean_unp"]
TABLE_II = ["tricubic", "zssr", "cyclegan_unp", "dasr_unp", "udean_unp", "cyclegan_mis", "dasr_mis", "udean_mis"]
# shift study rows: (key, trained on); udean_unp / b3 trained on k-space truncation / nearest
SHIFT = [("tricubic", "-"), ("b3", "nearest"), ("sup_kspace", "k-space truncation"), ("udean_unp", "k-space truncation"),
         ("sup_real", "realistic"), ("udean_real", "realistic")]
# acquisition effects of the "realistic" LR (DataConfig.degradation)
REALISTIC = ["data.degradation.partial_fourier=0.75", "data.degradation.elliptical=true",
             "data.degradation.noise_sigma=0.01"]


@dataclass
class Protocol:
    config: str  # configs/<name>.yaml
    shape: tuple[int, int, int] | None  # phantom cohort size (0.7 mm); None: --root data
    overrides: list[str] = field(default_factory=list)
    steps: int = 0  # optimiser steps per method; 0: train.epochs x one pass over the target patches
    registration_iterations: int = 200
    mni_voxel_mm: float = 1.0  # the mni cohort: the template's brain box at this voxel


PROTOCOLS = {
    # CI smoke test: every method and table, minutes on a shared CPU
    "tiny": Protocol("tiny", (64, 64, 48), [
        "data.split.counts=[2,2,1,2]", "train.batch_size=2", "train.lr=1e-3", "train.lr_min=1e-5",
        "train.precision=fp32", "train.log_every=10"], steps=40, registration_iterations=30, mni_voxel_mm=3.0),
    # a real comparison on one GPU in under an hour (narrower model, fewer subjects and steps)
    "reduced": Protocol("demo", (160, 160, 128), [
        "data.split.counts=[8,8,2,4]", "data.patches.lr_size=[32,32]", "data.patches.stride=[16,16]",
        "data.patches.max_per_subject=96", "data.patches.min_foreground=0.3",
        "model.features=32", "model.n_groups=3", "model.n_rcab=3", "model.reduction=8", "model.encoder_layers=4",
        "model.disc_features=32", "model.disc_blocks=2",
        "train.batch_size=8", "train.lr=2e-4", "train.lr_min=1e-6", "train.precision=fp32", "train.log_every=50",
        "train.num_workers=2"], steps=2000),
    # the paper: HCP at full size, 120/120/30/30, 30 epochs (needs --root)
    "paper": Protocol("paper", None, []),
}


# --------------------------------------------------------------------------- helpers
class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, key: str, fn: Callable):
        t = time.perf_counter()
        out = fn()
        self.seconds[key] = round(self.seconds.get(key, 0.0) + time.perf_counter() - t, 2)
        return out


# --------------------------------------------------------------------------- stage 1: data
def make_data(args, proto: Protocol, out: Path, console) -> dict:
    """{"unpaired" | "misaligned" | "realistic": Config} with preprocessed data under out/data/."""
    from preprocessing.driver import preprocess
    from udean.config import load, save

    root = Path(args.root) if args.root else out / "cohort" / args.anatomy
    # the paper's tables degrade by k-space truncation (and "realistic" by its own effects), whatever
    # level the protocol's config names (the demo's is pf_noise)
    base = ["data.degradation.level=custom"] + list(proto.overrides) + list(args.overrides)
    if proto.shape is not None and not args.root:
        from preprocessing.cohort import cohort_ready, write_cohort

        shape, voxel = cohort_spec(args, proto)
        base.append(f"data.voxel_size_mm={voxel}")
        first = load(proto.config, base)
        n = sum(first.data.split.counts) if first.data.split.preset == "counts" else None
        if n is None:
            raise ValueError("a synthetic cohort needs data.split.preset=counts")
        if not (root.is_dir() and cohort_ready(root, n, shape, voxel_mm=voxel)):
            console.print(f"cohort: {n} {args.anatomy} subjects {shape} at {voxel:g} mm -> {root}")
            write_cohort(root, n, shape if args.anatomy == "phantom" else None, seed=first.data.split.seed,
                         progress=False, anatomy=args.anatomy, voxel_mm=voxel)
    elif not args.root:
        raise ValueError(f"--protocol {args.protocol} needs --root (the HCP folder)")
    # --root: 0.7 mm (HCP); a flat root is read as it is
    data = out / "data" / (args.anatomy if not args.root else "root")
    cfgs = {}
    for name, extra in (("unpaired", ["data.mode=unpaired"]), ("misaligned", ["data.mode=misaligned"]),
                        ("realistic", ["data.mode=unpaired", *REALISTIC])):
        cfg = load(proto.config, base + extra + [f"data.root={root}", f"data.out={data / name}"])
        if name == "realistic" and args.skip_shift:
            continue
        t = time.perf_counter()
        summary = preprocess(cfg.data, progress=False)
        if summary.failed:
            from preprocessing.manifest import load_manifest

            bad = load_manifest(cfg.data.out).failed()
            raise RuntimeError(f"preprocessing {name}: {len(bad)} subject(s) failed: {bad[0].error}")
        console.print(f"data {name}: {cfg.data.out} ({time.perf_counter() - t:.1f} s)", highlight=False)
        Path(cfg.data.out).mkdir(parents=True, exist_ok=True)
        save(cfg, Path(cfg.data.out) / "quality_config.yaml")
        cfgs[name] = cfg
    return cfgs


def cohort_spec(args, proto: Protocol) -> tuple[tuple[int, int, int], float]:
    """(shape, voxel mm) of the protocol's `--anatomy` cohort: mni the template's brain box at
    `proto.mni_voxel_mm` (`--shape` is the phantom's), the phantom `--shape` or the protocol's at 0.7 mm."""
    from preprocessing.cohort import cohort_shape, default_voxel_mm

    if args.anatomy == "mni":
        if args.shape:
            raise ValueError("--shape is the phantom's (--anatomy phantom); the mni cohort is the template's brain box")
        return cohort_shape("mni", None, proto.mni_voxel_mm), proto.mni_voxel_mm
    return tuple(args.shape or proto.shape), default_voxel_mm("phantom")


# --------------------------------------------------------------------------- stage 3/4: evaluate, report
def evaluate(cfgs: dict, nets: dict, budget, args, device, console, info: dict) -> dict:
    """Every trained network, tricubic and ZSSR by the suite's `Evaluator` on the test volumes."""
    from preprocessing.manifest import load_manifest
    from udean.baselines.zssr import ZSSR
    from udean.evaluate import Evaluator, tricubic
    from udean.infer import Inferer

    unp = cfgs["unpaired"]
    inferer = Inferer.from_config(unp.infer, unp.data.patches, device)
    zssr = ZSSR(unp.model, budget, inferer, unp.loss.alpha, unp.loss.ssim_window)

    def zssr_fn(v):
        t = time.perf_counter()
        out_ = zssr(v)
        info.setdefault("zssr", {}).setdefault("train_seconds", 0.0)
        info["zssr"]["train_seconds"] = round(info["zssr"]["train_seconds"] + time.perf_counter() - t, 2)
        info["zssr"].setdefault("per_volume", []).append({"subject": v.subject, "first": zssr.histories[-1][0],
                                                          "last": zssr.histories[-1][-1]})
        return out_

    methods: dict[str, Callable] = {"tricubic": lambda v: tricubic(v.lr, v.hr.shape)}
    for key in TABLE_I + TABLE_II + ["sup_kspace", "sup_real", "udean_real"]:
        if key in nets and key not in methods:
            methods[key] = lambda v, net=nets[key]: inferer(v.lr, net)
    methods["zssr"] = zssr_fn

    def volumes(cfg):
        return load_manifest(cfg.data.out).volume_paths("test")[: args.limit or None]

    shown: dict = {}

    def keep_first(vol, preds, scores):
        if not shown:
            shown.update(vol=vol, preds=preds, scores=scores)

    console.print(f"evaluating {len(methods)} methods on the test volumes")
    window = unp.loss.ssim_window
    # the whole volume and the head always; the brain where the volumes have a brain mask
    regions = ["brain"] + ([] if args.region == "volume" else [args.region])
    results = {"kspace": {r.name: r for r in Evaluator(methods, regions=regions, window=window).run(
        volumes(unp), on_volume=keep_first)}}
    if "realistic" in cfgs:
        shift = Evaluator({k: methods[k] for k, _ in SHIFT if k in methods}, regions=regions, window=window)
        results["realistic"] = {r.name: r for r in shift.run(volumes(cfgs["realistic"]))}
    return {"results": results, "shown": shown}


def row(r, key: str) -> dict:
    d = r.to_dict()
    p = PAPER.get(key)
    return {"key": key, "method": NAMES[key], **{k: d[k] for k in SCORED if k in d}, "n": d["n"],
            "subjects": d["subjects"],
            "paper": None if p is None else {"ssim_mean": p[0], "ssim_std": p[1], "psnr_mean": p[2], "psnr_std": p[3]}}


# every table: the whole volume, the dilated head mask and, where the volumes have one, the brain
# mask (udean.evaluate regions)
SCORED = [f"{k}{r}_{s}" for r in ("", "_head", "_brain") for k in ("ssim", "psnr") for s in ("mean", "std")]


def _cells(r: dict, brain: bool) -> str:
    """SSIM | PSNR | SSIM (head) | PSNR (head) [| SSIM (brain) | PSNR (brain)] cells (results
    without a region: -)."""
    from udean.evaluate import pm

    keys = (("ssim", 4), ("psnr", 2), ("ssim_head", 4), ("psnr_head", 2)) + (
        (("ssim_brain", 4), ("psnr_brain", 2)) if brain else ())
    return " | ".join(pm(r[f"{k}_mean"], r[f"{k}_std"], n) if f"{k}_mean" in r else "-" for k, n in keys)


def markdown(doc: dict) -> str:
    from udean.evaluate import pm

    meta = doc["meta"]
    prov = meta["provenance"]
    gpu = prov["machine"]["gpu"]
    lines = [f"# Quality benchmark: Tables I and II (`--protocol {meta['protocol']}`, anatomy: "
             f"{meta.get('anatomy', 'phantom')})", "",
             f"- date: {prov['date']}", f"- machine: {prov['machine']['cpu']}, {prov['machine']['cores']} cores, "
             f"device `{meta['device']}`" + (f" ({gpu['name']})" if gpu else "") + f", torch {prov['versions']['torch']}",
             f"- command: `{prov['command']}`", f"- wall time: {meta['seconds']:.0f} s",
             f"- data: {ANATOMY.get(meta.get('anatomy'), 'synthetic cohort')} {meta['shape']} voxels "
             f"({meta.get('voxel_mm', 0.7):g} mm), source/target/val/test = "
             f"{'/'.join(map(str, meta['split']))}; test subjects scored: {meta['test_subjects']}; region: {meta['region']}"
             if meta.get("shape") else f"- data: {meta['root']}",
             f"- budget, every method: {meta['budget']['steps']} optimiser steps x {meta['budget']['batch_size']} patches, "
             f"Adam lr {meta['budget']['lr']:g} -> {meta['budget']['lr_min']:g} (cosine); two-stage methods split it in "
             "half; ZSSR spends it once per test volume",
             f"- model: {meta['model']}", "",
             "SSIM / PSNR (dB): mean ± sample std over test subjects, x2 x2 x2; the paper's numbers (HCP, full "
             "protocol) are beside ours for reference, not for a like-for-like comparison.", ""]

    brain = any("psnr_brain_mean" in r for r in doc["table_i"] + doc["table_ii"])
    regions = "| SSIM | PSNR | SSIM (head) | PSNR (head) " + ("| SSIM (brain) | PSNR (brain) " if brain else "")

    def table(title: str, keys: list[str]) -> None:
        lines.extend([f"## {title}", "", f"| Method {regions}| paper SSIM | paper PSNR | train s |",
                      "|---|---|---|---|---|" + ("---|---|" if brain else "") + "---|---|---|"])
        for r in doc["table_i" if title.startswith("Table I:") else "table_ii"]:
            if r["key"] not in keys:
                continue
            p = r["paper"]
            secs = doc["methods"].get(r["key"], {}).get("train_seconds", "")
            lines.append(f"| {r['method']} | {_cells(r, brain)} | "
                         + (f"{pm(p['ssim_mean'], p['ssim_std'], 4)} | {pm(p['psnr_mean'], p['psnr_std'], 2)}" if p else "- | -")
                         + f" | {secs} |")
        lines.append("")

    table("Table I: supervised benchmarks vs UDEAN", TABLE_I)
    table("Table II: unsupervised methods", TABLE_II)
    if doc.get("shift"):
        lines.extend(["## Degradation shift: train on one LR degradation, test on both", "",
                      "realistic = partial Fourier 0.75 + elliptical k-space + complex noise sigma 0.01 (Rician magnitude).", "",
                      "| Method | trained on | test: k-space truncation SSIM | PSNR | SSIM (head) | PSNR (head) "
                      "| test: realistic SSIM | PSNR | SSIM (head) | PSNR (head) |",
                      "|---|---|---|---|---|---|---|---|---|---|"])
        for r in doc["shift"]:
            lines.append(f"| {r['method']} | {r['trained_on']} | {_cells(r['kspace'], False)} | "
                         f"{_cells(r['realistic'], False)} |")
        lines.append("")
    reg = doc["methods"].get("b2", {}).get("registration")
    if reg:
        mv = np.mean([r["mae_moved"] for r in reg])
        rg = np.mean([r["mae_registered"] for r in reg])
        lines.extend([f"Registration (benchmark 2): mean |HR_moved - HR| {mv:.4f} -> {rg:.4f} after rigid MI registration "
                      f"({len(reg)} subjects; the shrink part of the motion is not rigid and stays).", ""])
    for f in doc.get("figures", []):
        lines.append(f"![{Path(f).stem}]({Path(f).name})")
    lines.append("")
    return "\n".join(lines)


def figures(shown: dict, results_dir: Path, tag: str) -> list[str]:
    from udean.figures import volume_figure

    if not shown:
        return []
    vol, preds, scores = shown["vol"], shown["preds"], shown["scores"]
    out = []
    for name, keys in (("fig3", ["tricubic", *TABLE_I]), ("fig4", TABLE_II)):
        label = {k: NAMES[k].replace(" with ", "\n").replace(" LR and HR", "").replace(" HR and LR", "") for k in keys}
        png = results_dir / f"quality_{tag}_{name}.png"
        volume_figure(vol, {label[k]: preds[k] for k in keys if k in preds}, png,
                      scores={label[k]: scores[k] for k in keys if k in scores},
                      title=f"{vol.subject} (test): {'Table I' if name == 'fig3' else 'Table II'} methods, x2x2x2")
        out.append(relative(png))
    return out


# --------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="trailing key.sub=value arguments override the config (udean config tree)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="reduced")
    p.add_argument("--out", default=None, help="work folder (cohort, data, runs); default quality_out/<protocol>_<anatomy>")
    p.add_argument("--results", default=str(RESULTS), help="where the tables and figures go")
    p.add_argument("--tag", default=None, help="file tag: quality_<tag>.*; default the protocol")
    p.add_argument("--root", default=None, help="HCP root instead of a synthetic cohort (required for paper)")
    p.add_argument("--anatomy", choices=("mni", "phantom"), default="mni",
                   help="the cohort: mni, real T1 brains from the ICBM152 2009 template (default); phantom, the "
                        "procedural full heads")
    p.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="phantom cohort size (--anatomy phantom)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per method (the shared budget)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N test volumes (0: all)")
    p.add_argument("--region", choices=("volume", "bbox"), default="volume",
                   help="a region scored besides the whole volume and the head mask (always both)")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-shift", action="store_true", help="no degradation-shift study")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hpc.atomic import atomic_write_text
    from udean.baselines.methods import budget_of, runs_dir, train_methods
    from udean.infer import pick_device

    args = parse(argv)
    proto = PROTOCOLS[args.protocol]
    console = Console()
    t0 = time.perf_counter()
    out = Path(args.out or Path("quality_out") / f"{args.protocol}_{args.anatomy}").resolve()
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    tag = args.tag or args.protocol
    device = pick_device(args.device)
    timer = Timer()

    console.rule(f"[bold]quality benchmark, protocol {args.protocol}[/] -> {out}")
    cfgs = timer.run("data", lambda: make_data(args, proto, out, console))
    unp = cfgs["unpaired"]
    steps = args.steps if args.steps is not None else proto.steps
    budget = budget_of(unp, steps, device)
    console.print(f"budget: {budget.steps} steps x {budget.batch_size} patches per method, on {device}")

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[loss]}"), console=console) as bar:
        def progress(key: str, total: int):
            task = bar.add_task(key, total=total, loss="")

            def update(done: int, rec: dict) -> None:
                bar.update(task, completed=done, loss=" ".join(f"{k} {v:.3f}" for k, v in list(rec.items())[:3]))
            return update

        runs = runs_dir(out / "runs", unp, budget, registration=proto.registration_iterations)
        nets, info = timer.run("train", lambda: train_methods(
            cfgs, budget, runs, device, registration_iterations=proto.registration_iterations, progress=progress,
            console=console))
    ev = timer.run("evaluate", lambda: evaluate(cfgs, nets, budget, args, device, console, info))
    res = ev["results"]

    ks = res["kspace"]
    doc = {"table_i": [row(ks[k], k) for k in TABLE_I if k in ks],
           "table_ii": [row(ks[k], k) for k in TABLE_II if k in ks],
           "other": [row(ks[k], k) for k in ks if k not in TABLE_I + TABLE_II],
           "shift": [], "methods": info}
    if "realistic" in res:
        for key, trained in SHIFT:
            if key in ks and key in res["realistic"]:
                a, b = row(ks[key], key), row(res["realistic"][key], key)
                fields = (*SCORED, "subjects")
                doc["shift"].append({"key": key, "method": NAMES[key], "trained_on": trained,
                                     "kspace": {k: a[k] for k in fields}, "realistic": {k: b[k] for k in fields}})
    doc["figures"] = figures(ev["shown"], results_dir, tag)
    timer.seconds["total"] = round(time.perf_counter() - t0, 1)
    doc["meta"] = {
        "protocol": args.protocol, "provenance": provenance(argv), "device": str(device),
        "seconds": timer.seconds["total"], "stages": timer.seconds,
        "anatomy": "root" if args.root else args.anatomy,
        **({"shape": list(cohort_spec(args, proto)[0]), "voxel_mm": cohort_spec(args, proto)[1]}
           if proto.shape and not args.root else {"shape": None}), "root": relative(args.root),
        "split": list(unp.data.split.counts), "test_subjects": len(next(iter(ks.values())).subjects),
        "region": args.region, "budget": budget.to_dict(),
        "model": {k: v for k, v in unp.model.model_dump().items()}, "patches": unp.data.patches.model_dump(),
        "realistic_degradation": REALISTIC, "config": unp.to_dict()}
    js, md = results_dir / f"quality_{tag}.json", results_dir / f"quality_{tag}.md"
    atomic_write_text(js, json.dumps(doc, indent=1, default=float) + "\n")
    atomic_write_text(md, markdown(doc))
    console.print(markdown(doc), highlight=False)
    console.print(f"results: {md}\n         {js}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
