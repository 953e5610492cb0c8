"""Threads: patches/s of a short `udean train` on the demo config with torch's default thread
count against the count `hpc.threads` sizes from the CPUs the process owns, on an idle machine
and on a busy one (another process spinning on one core), for 1 and 2 local ranks (torchrun).

    python benchmarks/threads.py                     # -> benchmarks/results/threads_cpu.json / .png
    python benchmarks/threads.py --steps 40 --ranks 1 2 --out /tmp/t.json

"default" is what `udean train` did before issue 18: torch's own intra-op count (one per core
of the machine, in every process), given here as OMP_NUM_THREADS=<that count>; "sized" leaves
OMP_NUM_THREADS unset, so `udean.train.size_threads` picks (docs/performance.md, "Threads").
A figure is the median patches/s of the train rows after the first `--warmup` steps (all ranks
together). The data is a small synthetic cohort preprocessed once.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, bar_chart, provenance, relative, write_json  # noqa: E402

from udean.commands import environment, executable  # noqa: E402

BUSY = "import time\nwhile True:\n    pass\n"  # one spinning core


def torch_default_threads() -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True,
                         text=True, env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    return int(out.stdout.strip())


def make_data(work: Path, shape: tuple[int, int, int]) -> Path:
    data = work / "data"
    if not (data / "manifest.json").exists():
        env = environment(1)
        for cmd in (["cohort", "--anatomy", "phantom", "--n", "11", "--out", work / "cohort", "--shape", *shape,
                     "--no-progress"],
                    ["preprocess", "--config", "demo", "--data-root", work / "cohort", "--out", data, "--no-progress"]):
            r = subprocess.run([executable("udean"), *map(str, cmd)], capture_output=True, text=True, env=env)
            if r.returncode:
                raise RuntimeError(r.stderr[-3000:])
    return data


def train_rate(data: Path, out: Path, ranks: int, threads: int | None, steps: int, warmup: int,
               config: str) -> dict[str, Any]:
    env = {k: v for k, v in environment(1).items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    args = ["train", "--config", config, f"data.out={data}", f"train.out={out}", "train.epochs=1",
            f"train.steps_per_epoch={steps}", "train.val_every=0", f"train.checkpoint_every={10 * steps}",
            "train.log_every=1", "train.num_workers=0"]
    cmd = [executable("udean"), *args] if ranks == 1 else \
        [executable("torchrun"), "--standalone", f"--nproc_per_node={ranks}", "-m", "udean", *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [row["patches_per_s"] for row in rows if row["kind"] == "train" and row["step"] > warmup]
    chosen = next((line for line in r.stderr.splitlines() if line.startswith("threads:")), None)
    return {"patches_per_s": statistics.median(rates), "rates": [round(x, 2) for x in rates],
            "wall_s": round(time.perf_counter() - t0, 1), "threads_line": chosen, "loadavg": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--config", default="demo")
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 80])
    p.add_argument("--work", default=None, help="keep the data here (default: a temp folder)")
    p.add_argument("--out", default=str(RESULTS / "threads_cpu.json"))
    args = p.parse_args(argv)
    default = torch_default_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        data = make_data(work, tuple(args.shape))
        for load in ("idle", "busy"):
            burner = subprocess.Popen([sys.executable, "-c", BUSY]) if load == "busy" else None
            try:
                for ranks in args.ranks:
                    for mode, threads in (("default", default), ("sized", None)):
                        out = work / f"run_{load}_{ranks}_{mode}"
                        res = train_rate(data, out, ranks, threads, args.steps, args.warmup, args.config)
                        rows.append({"load": load, "ranks": ranks, "threads": mode,
                                     "omp_num_threads": threads, **res})
                        print(f"{load:4s} {ranks} rank(s) {mode:7s}: {res['patches_per_s']:7.2f} patches/s "
                              f"({res['threads_line'] or f'OMP_NUM_THREADS={threads}'})", flush=True)
            finally:
                if burner is not None:
                    burner.kill()
                    burner.wait()
    doc = {"provenance": provenance(argv), "torch_default_threads": default,
           "cpus": len(os.sched_getaffinity(0)), "config": args.config, "steps": args.steps,
           "warmup": args.warmup, "rows": rows}
    write_json(args.out, doc)
    panels = [{"title": f"{ranks} local rank(s)", "xlabel": "patches/s (all ranks)",
               "labels": [f"{r['load']}, {r['threads']}" for r in rows if r["ranks"] == ranks],
               "values": [r["patches_per_s"] for r in rows if r["ranks"] == ranks],
               "notes": [f"{r['patches_per_s']:.1f}" for r in rows if r["ranks"] == ranks]} for ranks in args.ranks]
    png = bar_chart(Path(args.out).with_suffix(".png"), panels,
                    title=f"udean train --config {args.config}: torch default vs sized threads ({doc['cpus']} CPUs)")
    print(f"-> {relative(args.out)}" + (f", {relative(png)}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
