"""Kill trials: SIGKILL at random moments, rerun, and compare with a run that was never killed.

preprocess: a 2-rank `mpirun udean preprocess` of a small synthetic cohort loses one rank to
SIGKILL (at a random time from start-up to the end, or right after k subjects were recorded),
then reruns (1 or 2 ranks; some trials start from an earlier trial's partly done folder): the
shards must be byte-identical and the manifest equal (timings aside) to a clean run's, and
`udean shards verify` must pass.
train: a deterministic `udean train` (tiny config, a checkpoint every step) gets SIGKILL at a
random time (start-up, a step, a checkpoint being written), then reruns: the last checkpoint
(both engines' module, optimizer and LR schedule, our step, sampler and RNG) must be bit-equal
to the uninterrupted run's, and metrics.jsonl must hold every step once, with its losses.

    python benchmarks/kill_trials.py --preprocess 20 --train 10    # -> benchmarks/results/kill_trials.json
    python benchmarks/kill_trials.py --preprocess 3 --train 3 --out /tmp/k.json   # what CI runs (tests)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, provenance, relative, write_json  # noqa: E402

BIN = Path(sys.executable).parent
COHORT_SHAPE = (48, 48, 40)
TRAIN = ["train.epochs=2", "train.steps_per_epoch=4", "train.val_every=0", "train.deterministic=true",
         "train.checkpoint_every=1", "train.keep_last=2", "train.log_every=1"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def _udean(args: list[Any], ranks: int = 1) -> list[str]:
    cmd = [str(BIN / "udean"), *map(str, args)]
    if ranks > 1:
        cmd = [str(BIN / "mpirun"), "--oversubscribe", "-n", str(ranks), "-x", "OMP_NUM_THREADS=1", *cmd]
    return cmd


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait_lines(path: Path, k: int, proc: subprocess.Popen, limit: float = 60) -> None:
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < limit and (
            not path.exists() or len(path.read_text().splitlines()) < k):
        time.sleep(0.002)


def _finish(proc: subprocess.Popen, what: str) -> None:
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{what}: hung after SIGKILL")


# --------------------------------------------------------------------------- preprocess
def files(out: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under shards/ and volumes/ (temp files included)."""
    import hashlib

    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("shards", "volumes") for p in sorted((out / sub).rglob("*")) if p.is_file()}


def manifest(out: Path) -> dict:
    from preprocessing.manifest import without_timing

    d = without_timing(json.loads((out / "manifest.json").read_text()))
    d["config"].pop("out", None)  # where it was written: each trial has its own folder
    return d


def preprocess_cmd(cohort: Path, out: Path, ranks: int) -> list[str]:
    return _udean(["preprocess", "--config", "tiny", "--data-root", cohort, "--out", out, "--no-progress"], ranks)


def preprocess_trials(n: int, work: Path, seed: int) -> list[dict[str, Any]]:
    from preprocessing.cohort import write_cohort

    cohort = work / "cohort"
    write_cohort(cohort, 6, shape=COHORT_SHAPE, seed=0, progress=False)
    t_clean = time.perf_counter()
    clean = _run(preprocess_cmd(cohort, work / "clean", 1))
    t_clean = time.perf_counter() - t_clean
    assert clean.returncode == 0, clean.stderr[-3000:]
    want_files, want_manifest = files(work / "clean"), manifest(work / "clean")
    rng = random.Random(seed)
    trials = []
    for trial in range(n):
        out = work / f"p{trial}"
        if trial % 3 == 2 and (work / f"p{trial - 1}.killed").exists():
            # start from the partly done folder an earlier trial's kill left (none: killed before it existed)
            shutil.copytree(work / f"p{trial - 1}.killed", out, symlinks=True)
        proc = subprocess.Popen(preprocess_cmd(cohort, out, 2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, env=_env())
        t0 = time.perf_counter()
        if trial % 2:  # after k subjects were recorded: inside the work phase
            point = f"after {rng.randint(0, 4)} subjects"  # of 6: the last ones raced the end of the run
            _wait_lines(out / "logs" / "preprocess.jsonl", int(point.split()[1]), proc)
        else:  # anywhere from start-up to well before the end (a fixed 2.5 s outlasted a quiet machine's run)
            time.sleep(rng.uniform(0.2, max(0.4, 0.6 * t_clean)))
            point = "random time"
        victims = _children(proc.pid)
        killed = bool(victims) and proc.poll() is None
        if killed:
            os.kill(rng.choice(victims), signal.SIGKILL)
        at = round(time.perf_counter() - t0, 3)
        _finish(proc, f"preprocess trial {trial}")
        if out.exists():
            shutil.copytree(out, work / f"p{trial}.killed", symlinks=True)
        whole = True
        if (out / "manifest.json").exists():
            try:
                manifest(out)
            except ValueError:
                whole = False
        ranks = 2 if trial % 2 else 1
        rerun = _run(preprocess_cmd(cohort, out, ranks))
        verify = _run(_udean(["shards", "verify", out]))
        trials.append({"trial": trial, "kill": point, "at_s": at, "killed": killed, "killed_rc": proc.returncode,
                       "manifest_whole_after_kill": whole, "rerun_ranks": ranks, "rerun_rc": rerun.returncode,
                       "shards_identical": rerun.returncode == 0 and files(out) == want_files,
                       "manifest_identical": rerun.returncode == 0 and manifest(out) == want_manifest,
                       "verify_rc": verify.returncode,
                       "error": None if rerun.returncode == 0 else rerun.stderr[-500:]})
    return trials


# --------------------------------------------------------------------------- train
def _load(path: Path) -> dict:
    import torch

    from udean.engines import _allow_deepspeed_checkpoint_types

    _allow_deepspeed_checkpoint_types()
    return torch.load(path, map_location="cpu", weights_only=True)


def _difference(a: Any, b: Any, where: str) -> str | None:
    import torch

    if isinstance(a, torch.Tensor):
        ok = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return None if ok else where
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return f"{where}: keys"
        return next((d for k in a if (d := _difference(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return f"{where}: length"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _difference(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where}: {a!r} != {b!r}"


def checkpoint_difference(x: Path, y: Path) -> str | None:
    """None when two checkpoints hold bit-equal training state, else the first difference."""
    for engine in ("G", "D"):
        sx, sy = (_load(p / engine / "ds" / "mp_rank_00_model_states.pt") for p in (x, y))
        for key in ("module", "optimizer", "lr_scheduler", "global_steps", "skipped_steps"):
            if d := _difference(sx[key], sy[key], f"{engine}.{key}"):
                return d
    sx, sy = (_load(p / "state_rank0.pt") for p in (x, y))
    for key in ("step", "epoch", "sampler", "rng", "nonfinite_run", "best"):
        if d := _difference(sx[key], sy[key], f"state.{key}"):
            return d
    return None


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    if len({r["step"] for r in train}) != len(train):
        return {}  # a step twice: the replaced rows were not replaced
    return {r["step"]: r["g.total"] for r in train}


def train_cmd(data: Path, out: Path) -> list[str]:
    return _udean(["train", "--config", "tiny", f"data.out={data}", f"train.out={out}", *TRAIN])


def train_trials(n: int, work: Path, seed: int) -> list[dict[str, Any]]:
    from preprocessing.cohort import write_cohort

    cohort, data = work / "cohort", work / "data"
    if not (data / "manifest.json").exists():
        write_cohort(cohort, 6, shape=(64, 64, 48), seed=0, progress=False)
        made = _run(preprocess_cmd(cohort, data, 1))
        assert made.returncode == 0, made.stderr[-3000:]
    clean = _run(train_cmd(data, work / "clean_run"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    # a second, warm run sizes the random kill times: the first one's start-up includes one-time
    # work (op builds, caches), so its length would put many kills after the end of a run
    t0 = time.perf_counter()
    again = _run(train_cmd(data, work / "timing_run"))
    clean_s = time.perf_counter() - t0
    assert again.returncode == 0, again.stderr[-3000:]
    last = work / "clean_run" / "checkpoints" / "step_00000008"
    want = _losses(work / "clean_run")
    rng = random.Random(seed)
    trials = []
    for trial in range(n):
        out = work / f"t{trial}"
        proc = subprocess.Popen(train_cmd(data, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=_env())
        t0 = time.perf_counter()
        if trial % 2:  # inside the loop: after k train rows
            k = rng.randint(1, 7)
            _wait_lines(out / "metrics.jsonl", k, proc, limit=clean_s * 3)
            time.sleep(rng.uniform(0.0, 0.3))
            point = f"after step {k} (+ up to 0.3 s)"
        else:  # anywhere from start-up to the end
            time.sleep(rng.uniform(0.0, 0.9 * clean_s))
            point = "random time"
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        at = round(time.perf_counter() - t0, 3)
        _finish(proc, f"train trial {trial}")
        rerun = _run(train_cmd(data, out), timeout=600)
        diff = checkpoint_difference(last, out / "checkpoints" / "step_00000008") if rerun.returncode == 0 else "rerun failed"
        trials.append({"trial": trial, "kill": point, "at_s": at, "killed": killed, "rerun_rc": rerun.returncode,
                       "weights_bit_equal": diff is None, "difference": diff,
                       "metrics_identical": rerun.returncode == 0 and _losses(out) == want,
                       "error": None if rerun.returncode == 0 else rerun.stderr[-500:]})
    return trials


def passed(trials: list[dict[str, Any]]) -> bool:
    keys = ("shards_identical", "manifest_identical", "weights_bit_equal", "metrics_identical")
    return all(all(t[k] for k in keys if k in t) and t.get("verify_rc", 0) == 0 for t in trials)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preprocess", type=int, default=20, help="preprocess trials")
    p.add_argument("--train", type=int, default=10, help="training trials")
    p.add_argument("--seed", type=int, default=None, help="the kill points (default: random, recorded)")
    p.add_argument("--work", default=None, help="work folder (default: a temp folder, removed)")
    p.add_argument("--out", default=str(RESULTS / "kill_trials.json"))
    args = p.parse_args(argv)
    seed = random.SystemRandom().randrange(2**31) if args.seed is None else args.seed
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        pre = preprocess_trials(args.preprocess, work / "pre", seed) if args.preprocess else []
        t1 = time.perf_counter()
        tr = train_trials(args.train, work / "train", seed) if args.train else []
        t2 = time.perf_counter()
    doc = {"provenance": provenance(argv), "seed": seed,
           "preprocess": {"trials": pre, "killed": sum(t["killed"] for t in pre), "passed": passed(pre),
                          "seconds": round(t1 - t0, 1)},
           "train": {"trials": tr, "killed": sum(t["killed"] for t in tr), "passed": passed(tr),
                     "seconds": round(t2 - t1, 1)}}
    write_json(args.out, doc)
    ok = passed(pre) and passed(tr)
    print(f"kill trials: preprocess {sum(t['killed'] for t in pre)}/{len(pre)} killed, "
          f"{'all identical' if passed(pre) else 'DIFFERENCES'}; train {sum(t['killed'] for t in tr)}/{len(tr)} killed, "
          f"{'all bit-equal' if passed(tr) else 'DIFFERENCES'} -> {relative(args.out)}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
