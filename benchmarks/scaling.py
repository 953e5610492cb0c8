"""Scaling benchmarks: training and preprocessing across ranks, measured here and projected.

    python benchmarks/scaling.py all                 # this machine: 1 and 2 ranks, a few minutes
    python benchmarks/scaling.py train --data DIR    # one training point; run under mpirun/srun/torchrun
    python benchmarks/scaling.py preprocess          # preprocessing at 1..N MPI ranks
    python benchmarks/scaling.py report              # merge points -> JSON + PNG + projection

Writes benchmarks/results/scaling_{train,preprocess,projection}.{json,png} (plus one
scaling_train_<mode>_n<p>.json per measured point); every JSON carries machine, versions, date,
command and load average under "provenance" (benchmarks.common). The projection
(benchmarks/projection.py) predicts the measured points from measured parts and extends them to
64+ GPUs; docs/scaling.md explains the figures.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"


def _run(cmd: list[str]) -> None:
    from udean.commands import environment

    print("+", shlex.join(cmd), flush=True)
    # one core per rank: 1 rank vs 2 ranks is 1 core vs 2
    subprocess.run(cmd, check=True, env=environment(1), cwd=REPO)


# --------------------------------------------------------------------------- subcommands
def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from benchmarks import scaling_train

    return scaling_train.main(rest)


def cmd_preprocess(args: argparse.Namespace, rest: list[str]) -> int:
    from benchmarks import scaling_preprocess

    return scaling_preprocess.main(rest)


def cmd_report(args: argparse.Namespace, rest: list[str]) -> int:
    from benchmarks import scaling_report

    return scaling_report.main(rest)


def cmd_all(args: argparse.Namespace, rest: list[str]) -> int:
    """This machine, end to end: small training data, training at 1..N ranks (weak and strong),
    preprocessing at 1..N ranks on full-size subjects, then the report."""
    p = argparse.ArgumentParser(prog="scaling.py all")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--work", default="/tmp/udean_scaling", help="scratch folder for cohorts and data")
    p.add_argument("--train-config", default="demo")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2, help="runs per training point; the fastest is kept")
    p.add_argument("--subjects", type=int, default=8, help="full-size subjects for preprocessing")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-preprocess", action="store_true")
    a = p.parse_args(rest)
    from udean.commands import mpirun

    work = Path(a.work)
    py = [sys.executable, str(Path(__file__).resolve())]
    if not a.skip_train:
        data = work / "train_data"
        if not (data / "manifest.json").is_file():
            # a small cohort preprocessed at the demo config's reduced patch size, through the real CLI
            _run(["udean", "cohort", "--n", "4", "--shape", "128", "128", "96", "--out", str(work / "train_cohort"),
                  "--no-progress"])
            _run(["udean", "preprocess", "--config", a.train_config, "--data-root", str(work / "train_cohort"),
                  "--out", str(data), "--no-progress", "data.split.preset=counts", "data.split.counts=[2,2,0,0]"])
        # each point a.repeats times, interleaved; the run with the lowest median step is kept (other
        # jobs on a shared machine only ever add time), and every run's median is recorded with it
        runs: dict[tuple[str, int], list[dict]] = {}
        for r in range(a.repeats):
            for mode in ("weak", "strong"):
                for n in a.ranks:
                    out = work / "train_points" / f"r{r}"
                    _run(mpirun(n) + py + ["train", "--data", str(data), "--config", a.train_config, "--mode", mode,
                                            "--batch", str(a.batch), "--steps", str(a.steps), "--backend", "gloo",
                                            "--out", str(out)])
                    runs.setdefault((mode, n), []).append(
                        json.loads((out / f"scaling_train_{mode}_n{n}.json").read_text()))
        from benchmarks.common import write_json

        for (mode, n), rs in runs.items():
            best = dict(min(rs, key=lambda x: x["step_total_s"]))
            best["repeats"] = [{"step_total_s": x["step_total_s"], "loadavg": x["provenance"]["loadavg"],
                                "date": x["provenance"]["date"]} for x in rs]
            best["selection"] = f"lowest median step of {len(rs)} runs (shared machine)"
            write_json(Path(a.results) / f"scaling_train_{mode}_n{n}.json", best)
    if not a.skip_preprocess:
        _run(py + ["preprocess", "--ranks", *map(str, a.ranks), "--subjects", str(a.subjects),
                   "--work", str(work / "preprocess"), "--out", a.results])
    _run(py + ["report", "--results", a.results])
    return 0


COMMANDS = {"all": cmd_all, "train": cmd_train, "preprocess": cmd_preprocess, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argparse.Namespace(), argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
