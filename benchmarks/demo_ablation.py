"""Which of the recipe's switches matter: the demo's training run again with one of them turned
back (to the paper's setting, or off) at a time, each scored by `udean evaluate` beside tricubic
and the untrained skip, on the whole volume and in the head mask.

    udean demo                                    # once: cohort, shards and config in demo_out/
    python benchmarks/demo_ablation.py            # -> benchmarks/results/demo_ablation_cpu.{json,md,png}
    python benchmarks/demo_ablation.py --only demo adaptation_off --jobs 1

A variant is `udean train --config <demo>/config.yaml train.out=<work>/<name> KEY=VALUE ...`
(the demo's exact config and data, plus the variant's overrides), then `udean.evaluate.evaluate`
(what `udean evaluate` runs) of its best checkpoint (highest val PSNR) on the demo's test
subjects. `--jobs N` trains N variants at once with OMP_NUM_THREADS = cores / N. A variant whose
results.json exists in <work> is reused (another --work for another demo).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, bar_chart, provenance, relative, write_json  # noqa: E402
from udean.config import load  # noqa: E402
from udean.losses import adaptation_off  # noqa: E402

# name -> (what it changes, overrides on top of the demo's config: udean/configs/recommended.yaml's
# switches, docs/shift.md "What made the difference")
VARIANTS = {
    "demo": ("the demo: the recommended recipe, width 32, no augmentation", []),
    "adaptation_off": ("nothing matches X_{s~t} to X_t (lambda_da, spectrum, noise 0) and no blur bound or prior: "
                       "the degradation never adapts",
                       adaptation_off(load("demo").loss)),
    "no_adversary": ("lambda_da 0: the spectrum and noise matches alone adapt the degradation",
                     ["loss.lambdas=[1,0,0,0,0,0]"]),
    "no_spectrum": ("lambda_spectrum 0: the LR adversary and the noise match alone", ["loss.lambda_spectrum=0"]),
    "no_noise_match": ("lambda_noise 0: the spectrum match can trade noise for blur", ["loss.lambda_noise=0"]),
    "no_bound": ("lambda_bound 0: the learned blur may amplify frequencies", ["loss.lambda_bound=0"]),
    "no_prior": ("lambda_prior 0: no pull of the learned blur toward none", ["loss.lambda_prior=0"]),
    "width_16": ("model.features 16 (the previous demo's width)", ["model.features=16"]),
    "augment": ("issue 19's flips (target LR) and 8 flips / rotations (source HR)",
                ["train.augment=flips", "train.augment_source=dihedral"]),
    "paper_objective": ("the paper's six terms (lambdas 1, 0.1, 1, 1, 0.1, 0.1) on the physics degradation",
                        ["loss.lambdas=[1,0.1,1,1,0.1,0.1]"]),
}


def run_variant(name: str, demo: Path, work: Path, threads: int) -> dict:
    from rich.console import Console

    from udean.commands import environment, executable
    from udean.evaluate import evaluate

    out = work / name
    results = out / "eval" / "results.json"
    what, overrides = VARIANTS[name]
    seconds = None
    if not results.exists():
        out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        cmd = [executable("udean"), "train", "--config", str(demo / "config.yaml"), f"train.out={out / 'run'}", *overrides]
        with open(out / "log.txt", "a") as log:
            rc = subprocess.call(cmd, env=environment(threads, override=True), stdout=log, stderr=subprocess.STDOUT)
            if rc != 0:
                raise RuntimeError(f"variant {name}: udean train failed ({rc}); log: {out / 'log.txt'}")
            evaluate(load(demo / "config.yaml"), out / "run", demo / "data", out / "eval", figures=0,
                     console=Console(file=log, width=120))
        seconds = round(time.perf_counter() - t, 1)
        (out / "seconds.txt").write_text(str(seconds))
    elif (out / "seconds.txt").exists():
        seconds = float((out / "seconds.txt").read_text())
    doc = json.loads(results.read_text())
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "changes": what, "overrides": overrides, "train_and_eval_seconds": seconds,
            "threads": threads, "methods": {m["method"]: m for m in doc["methods"]},
            "val": [[v["step"], round(v["psnr"], 3), round(v["ssim"], 4)] for v in rows if v.get("kind") == "val"]}


def markdown(doc: dict) -> str:
    lines = ["# Demo ablation: the recipe's switches one at a time", "",
             f"- machine: {doc['provenance']['machine']['cpu']}, {doc['provenance']['machine']['cores']} cores, "
             f"GPU: {doc['provenance']['machine']['gpu'] or 'none'}; date {doc['provenance']['date']}",
             f"- command: `{doc['provenance']['command']}`",
             f"- data: `{doc['demo']}` (the demo's cohort, shards and config); test subjects scored on the whole volume"
             " and, where the results have it, in the dilated head mask (udean.evaluate.head_mask)",
             "", "| variant | changes | UDEAN PSNR | UDEAN SSIM | - tricubic PSNR | - tricubic SSIM | "
             "- tricubic PSNR (head) | - tricubic SSIM (head) | val PSNR / SSIM by step |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["variants"]:
        ours, tri = r["methods"]["UDEAN (ours)"], r["methods"]["Tricubic interpolation"]
        curve = " ".join(f"{s}: {p:.2f}/{q:.3f}" for s, p, q in r["val"][1::2])
        head = (f"{ours['psnr_head_mean'] - tri['psnr_head_mean']:+.2f} | {ours['ssim_head_mean'] - tri['ssim_head_mean']:+.4f}"
                if "psnr_head_mean" in ours else "- | -")  # results from before the head region
        lines.append(f"| {r['name']} | {r['changes']} | {ours['psnr_mean']:.2f} | {ours['ssim_mean']:.4f} | "
                     f"{ours['psnr_mean'] - tri['psnr_mean']:+.2f} | {ours['ssim_mean'] - tri['ssim_mean']:+.4f} | "
                     f"{head} | {curve} |")
    tri = doc["variants"][0]["methods"]["Tricubic interpolation"]
    lines += ["", f"Tricubic interpolation: {tri['psnr_mean']:.2f} dB / {tri['ssim_mean']:.4f}."]
    skip = doc["variants"][0]["methods"].get("Image skip alone")
    if skip:
        lines.append(f"Image skip alone (the untrained model): {skip['psnr_mean']:.2f} dB / {skip['ssim_mean']:.4f}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="variants:\n" + "\n".join(f"  {k:24s} {v[0]}" for k, v in VARIANTS.items()))
    p.add_argument("--demo", default="demo_out", help="a finished `udean demo --out` folder (default demo_out)")
    p.add_argument("--work", default=None, help="where the variants train (default <demo>/ablation)")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="variants to run")
    p.add_argument("--jobs", type=int, default=2, help="variants trained at once (default 2)")
    p.add_argument("--tag", default="cpu", help="results file: demo_ablation_<tag>.{json,md,png}")
    args = p.parse_args(argv)
    demo = Path(args.demo).resolve()
    if not (demo / "config.yaml").exists() or not (demo / "data" / "manifest.json").exists():
        p.error(f"{demo} is not a finished demo folder (no config.yaml or data/manifest.json): run `udean demo` first")
    work = Path(args.work).resolve() if args.work else demo / "ablation"
    jobs = max(1, args.jobs)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ThreadPoolExecutor(jobs) as pool:
        rows = list(pool.map(lambda n: run_variant(n, demo, work, threads), args.only))
    for r in rows:
        ours = r["methods"]["UDEAN (ours)"]
        print(f"{r['name']:24s} {ours['psnr_mean']:.2f} dB {ours['ssim_mean']:.4f}", flush=True)
    doc = {"provenance": provenance(argv), "demo": relative(demo), "variants": rows}
    stem = RESULTS / f"demo_ablation_{args.tag}"
    write_json(stem.with_suffix(".json"), doc)
    from hpc.atomic import atomic_write_text

    atomic_write_text(stem.with_suffix(".md"), markdown(doc))
    tri = rows[0]["methods"]["Tricubic interpolation"]
    names = [r["name"] for r in rows]

    def gains(key):
        return [r["methods"]["UDEAN (ours)"][key] - tri[key] for r in rows]

    bar_chart(stem.with_suffix(".png"), [
        {"title": f"UDEAN - tricubic, {what} (test)", "xlabel": unit, "labels": names, "values": gains(key),
         "ref": (0.0, "tricubic")}
        for what, unit, key in (("PSNR", "dB", "psnr_mean"), ("SSIM", "SSIM", "ssim_mean"),
                                ("PSNR, head", "dB", "psnr_head_mean"), ("SSIM, head", "SSIM", "ssim_head_mean"))
    ], title="demo ablation: one switch of the recipe at a time")
    print(f"results: {stem}.json / .md / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
