"""Two trainings on one machine (issue 27, item 5): steps/s of `udean train --config demo` alone,
then of two started together, under each OpenMP wait policy. Acceptance: each of the two keeps
at least 40 % of the solo steps/s.

    python benchmarks/concurrency.py        # -> benchmarks/results/concurrency_cpu.json / .png
    python benchmarks/concurrency.py --steps 40 --modes passive --out /tmp/c.json

Modes (the thread count is what `hpc.threads` sizes in both: OMP_NUM_THREADS unset):
- `passive`: what `udean` does (`hpc.threads.share_cores`: OMP_WAIT_POLICY=PASSIVE, a waiting
  OpenMP thread sleeps at once);
- `spin`: what it did before, GNU libgomp's default (a waiting thread polls up to 300000 times
  first), given as GOMP_SPINCOUNT=300000, which keeps `share_cores` off.

A figure is the median steps/s of the train rows (one per step) after `--warmup` steps; for a
pair, only the rows logged while both ran. The data is the demo's cohort, preprocessed once.
The machine's load average before and after each measurement is in the JSON: other jobs on the
machine change every steps/s figure here, so a result measured under load says so (`loaded`).
What load changes least is the CPU seconds a step costs (`cpu_s_per_step`, from /proc while the
runs go): a waiting thread that spins burns CPU time that trains nothing, so two spinning runs
pay more per step together than alone, and two passive runs about the same.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, bar_chart, provenance, relative, write_json  # noqa: E402
from benchmarks.threads import make_data  # noqa: E402

from udean.commands import environment, executable  # noqa: E402

MODES = {"passive": {}, "spin": {"GOMP_SPINCOUNT": "300000"}}
SHARE = 0.40  # each of two concurrent runs keeps this share of the solo steps/s


def start(data: Path, out: Path, steps: int, mode: str, config: str, log) -> subprocess.Popen:
    env = {k: v for k, v in environment(1).items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(MODES[mode])
    cmd = [executable("udean"), "train", "--config", config, f"data.out={data}", f"train.out={out}", "train.epochs=1",
           f"train.steps_per_epoch={steps}", "train.val_every=0", f"train.checkpoint_every={10 * steps}",
           "train.log_every=1", "train.num_workers=0", "train.fidelity_every=0", "train.image_every=0"]
    # a session of its own: a run stopped at the timeout takes its children with it (a JIT build of
    # DeepSpeed's CPU op left running would keep its lock)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def train_rows(out: Path, warmup: int) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    rows = [r for r in rows if r["kind"] == "train"]
    return [r for r in rows if r["step"] > warmup] or rows  # a run stopped early: what it did


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(data: Path, work: Path, runs: int, steps: int, warmup: int, mode: str, config: str,
            timeout: float) -> dict[str, Any]:
    """`runs` trainings started together -> each one's median steps/s over the rows logged while all
    ran. Runs still going after `timeout` s (a collapse) are stopped and measured on what they did."""
    load_before = os.getloadavg()[0]
    outs = [work / f"{mode}_{runs}_{i}" for i in range(runs)]
    for out in outs:
        shutil.rmtree(out, ignore_errors=True)  # a run folder of an earlier call would be resumed
    t0 = time.perf_counter()
    stopped = False
    samples: list[list[tuple[float, float]]] = [[] for _ in outs]  # (wall time, CPU seconds) per run
    with open(work / f"{mode}_{runs}.log", "a") as log:
        procs = [start(data, out, steps, mode, config, log) for out in outs]
        while any(p.poll() is None for p in procs) and time.perf_counter() - t0 < timeout:
            for p, got in zip(procs, samples):
                if (cpu := cpu_seconds(p.pid)) is not None:
                    got.append((time.time(), cpu))
            time.sleep(0.5)
        for p in procs:
            if p.poll() is None:
                stopped = True
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if not stopped and any(p.returncode for p in procs):
        raise RuntimeError(f"a training failed: see {work / f'{mode}_{runs}.log'}")
    rows = [train_rows(out, warmup) for out in outs]
    if not all(rows):
        raise RuntimeError(f"a run logged no step in {timeout:.0f} s: see {work / f'{mode}_{runs}.log'}")
    lo, hi = max(r[0]["time"] for r in rows), min(r[-1]["time"] for r in rows)  # all of them running
    rates = []
    for r in rows:
        both = [x["patches_per_s"] for x in r if lo <= x["time"] <= hi] or [x["patches_per_s"] for x in r]
        rates.append(statistics.median(both))
    if runs > 1 and hi - lo < 10:  # one start-up took as long as the other run's steps: no overlap to measure
        print(f"warning: the {runs} {mode} runs measured together overlapped {hi - lo:.0f} s only", flush=True)
    # CPU seconds per step while all ran: the cost of a step whatever else loads the machine (the
    # spinning of a waiting OpenMP thread is CPU time that does no step)
    cpu_per_step = []
    for r, got in zip(rows, samples):
        inside = [x for x in r if lo <= x["time"] <= hi] or r
        t = [g for g in got if inside[0]["time"] <= g[0] <= inside[-1]["time"]]
        n = inside[-1]["step"] - inside[0]["step"]
        cpu_per_step.append(round((t[-1][1] - t[0][1]) / n, 3) if len(t) > 1 and n > 0 else None)
    threads = next((line for line in (work / f"{mode}_{runs}.log").read_text().splitlines()
                    if line.startswith("threads:")), None)
    return {"mode": mode, "runs": runs, "patches_per_s": [round(x, 3) for x in rates],
            "cpu_s_per_step": cpu_per_step, "steps_done": [r[-1]["step"] for r in rows], "stopped_at_timeout": stopped, "overlap_s": round(hi - lo, 1),
            "wall_s": round(time.perf_counter() - t0, 1), "threads_line": threads,
            "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--config", default="demo")
    p.add_argument("--timeout", type=float, default=600, help="seconds per measurement before its runs are stopped")
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 80])
    p.add_argument("--work", default=None, help="keep the data and runs here (default: a temp folder)")
    p.add_argument("--out", default=str(RESULTS / "concurrency_cpu.json"))
    args = p.parse_args(argv)
    from udean.config import load

    batch = load(args.config).train.batch_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        data = make_data(work, tuple(args.shape))
        for mode in args.modes:
            solo = measure(data, work, 1, args.steps, args.warmup, mode, args.config, args.timeout)
            pair = measure(data, work, 2, args.steps, args.warmup, mode, args.config, args.timeout)
            base = solo["patches_per_s"][0]
            shares = [x / base for x in pair["patches_per_s"]]
            row = {"mode": mode, "solo_steps_per_s": round(base / batch, 3),
                   "solo_cpu_s_per_step": solo["cpu_s_per_step"][0], "pair_cpu_s_per_step": pair["cpu_s_per_step"],
                   "pair_steps_per_s": [round(x / batch, 3) for x in pair["patches_per_s"]],
                   "pair_share_of_solo": [round(s, 3) for s in shares], "passes": all(s >= SHARE for s in shares),
                   "solo": solo, "pair": pair}
            rows.append(row)
            print(f"{mode:8s}: solo {row['solo_steps_per_s']:.2f} steps/s; two together "
                  + ", ".join(f"{x:.2f} ({100 * s:.0f} %)" for x, s in zip(row["pair_steps_per_s"], shares))
                  + f"; CPU s per step {row['solo_cpu_s_per_step']} alone, {row['pair_cpu_s_per_step']} together"
                  + f"; load {solo['loadavg_before']} -> {pair['loadavg_after']}", flush=True)
    loads = [r[k]["loadavg_before"] for r in rows for k in ("solo", "pair")]
    doc = {"provenance": provenance(argv), "cpus": len(os.sched_getaffinity(0)), "config": args.config,
           "batch": batch, "steps": args.steps, "warmup": args.warmup, "share_needed": SHARE,
           "loaded": max(loads) > 0.5 * len(os.sched_getaffinity(0)), "rows": rows}
    write_json(args.out, doc)
    panels = [{"title": f"{r['mode']}: two runs keep {', '.join(f'{100 * s:.0f} %' for s in r['pair_share_of_solo'])}",
               "xlabel": "steps/s", "labels": ["alone", "two together: run 1", "two together: run 2"],
               "values": [r["solo_steps_per_s"], *r["pair_steps_per_s"]],
               "notes": [f"{r['solo_steps_per_s']:.2f}", *(f"{x:.2f}" for x in r["pair_steps_per_s"])],
               "ref": (SHARE * r["solo_steps_per_s"], f"{100 * SHARE:.0f} % of alone")} for r in rows]
    png = bar_chart(Path(args.out).with_suffix(".png"), panels,
                    title=f"udean train --config {args.config}, one vs two at once ({doc['cpus']} CPUs"
                          f"{', machine loaded' if doc['loaded'] else ''})")
    print(f"-> {relative(args.out)}" + (f", {relative(png)}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
