"""The whole cohort on one machine: all 1113 subjects (synthetic, at a small shape) through every job
the cluster runs on them, at 100 and 1113 subjects.

    python benchmarks/cohort_scale.py            # -> benchmarks/results/cohort_scale.{json,png}
    python benchmarks/cohort_scale.py --subjects 16 --steps 2 --damage 2 --out /tmp/c.json   # smoke (tests)

One synthetic cohort of the largest count is written (`udean cohort`, 64x64x48); each count N
reads its first N subjects (`data.subjects_limit`). Per count, the stages, each as a user runs it:

- preprocess: `mpirun -n 2 udean preprocess --config tiny` (every subject in a group, about
  0.45/0.45/0.05/0.05 source/target/val/test);
- verify: `udean shards verify`;
- regenerate: `--damage` shards deleted and as many corrupted (a byte flipped), then
  `slurm/regenerate_shards.sh` itself, outside SLURM (`UDEAN_MPI_LAUNCH=mpirun`, 2 tasks): verify,
  `udean shards regenerate`, verify; the files must come back byte for byte;
- train: `mpirun -n 2 udean train --config tiny`, `--steps` steps, 2 loader workers per rank,
  then the same command again (a resumed start: it only checks the data and loads the checkpoint);
- loader: the training DataLoader (2 workers) over every source/target shard, `udean.data.shards`
  as built (at most MAX_OPEN shards open per reader) and unbounded (every shard touched kept
  open, as before issue 28), `--batches` batches of 8.

Measured per stage: wall time, peak RSS and open files of its processes (sampled every 0.1 s from
/proc: per process, rank or loader worker; a worker's private memory is its USS, what it does not
share with the rank it was forked from), and from the jobs' own logs: rank 0's bookkeeping per
subject (`logs/preprocess_runs.jsonl`: `bookkeeping_ms`, the dispatcher's ms per message, manifest
rewrites) and the ranks' wait for their next subject (`logs/preprocess.jsonl`), the training
start (the `data` event of metrics.jsonl: files, how many hashed per rank, seconds; time to the
first step). The projection of rank 0's ceiling to 64, 128 and 256 ranks (docs/scaling.md) uses
the dispatcher's measured ms per message and the full-size subject cost of
benchmarks/results/scaling_preprocess.json. The work folder (about 1 GB at 1113) is removed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, bar_chart, provenance, relative, write_json  # noqa: E402

BIN = Path(sys.executable).parent
SHAPE = (64, 64, 48)


def split(n: int) -> list[str]:
    """Every subject in a group, about 0.45/0.45/0.05/0.05 (source takes what rounding leaves)."""
    target, held = int(0.45 * n), max(1, int(0.05 * n))
    return ["data.split.preset=counts", f"data.split.counts=[{n - target - 2 * held},{target},{held},{held}]"]


FULL_SIZE = RESULTS / "scaling_preprocess.json"  # the per-subject seconds at 320x320x256
PROJECT_RANKS = (64, 128, 256)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_rmaps_base_oversubscribe": "1", **extra}


def _mpirun(n: int, *cmd: Any) -> list[str]:
    return [str(BIN / "mpirun"), "--oversubscribe", "-n", str(n), "-x", "OMP_NUM_THREADS=1", *map(str, cmd)]


# --------------------------------------------------------------------------- /proc sampling
def _proc(pid: int) -> dict[str, Any] | None:
    """rss and uss (MiB), open files (all, .h5), parent and command line of one process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = os.listdir(f"/proc/{pid}/fd")
        h5 = 0
        for fd in fds:
            try:
                h5 += os.readlink(f"/proc/{pid}/fd/{fd}").endswith(".h5")
            except OSError:
                pass
        uss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                uss += int(line.split()[1])
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        return {"pid": pid, "ppid": int(fields["PPid"]), "rss_mb": int(fields.get("VmRSS", "0 kB").split()[0]) / 1024,
                "uss_mb": uss / 1024, "files": len(fds), "h5": h5,
                "cmd": Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")}
    except (OSError, ValueError, KeyError):
        return None  # gone between the listing and the read


class Sampler:
    """Peaks over the process tree of `root` (itself included), every `period` s, by role: a
    Python process with its parent's command line is a loader worker (forked from it), another
    Python process a rank; "all": the sum of every process's RSS (launchers too)."""

    def __init__(self, root: int, period: float = 0.1):
        self.root, self.period = root, period
        self.peak: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[dict[str, Any]]:
        children: dict[int, list[int]] = {}
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit():  # ppid is the 2nd field after the ")" that ends the command name
                    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(pid))
            except (OSError, ValueError, IndexError):
                continue
        tree, todo = {}, [self.root]
        while todo:
            pid = todo.pop()
            if (p := _proc(pid)) is not None:
                tree[pid] = p
            todo.extend(children.get(pid, []))
        for p in tree.values():
            python = "python" in p["cmd"].split(" ", 1)[0]
            same = p["cmd"] == tree.get(p["ppid"], {}).get("cmd")
            p["role"] = "other" if not python else "worker" if same else "rank"
        return list(tree.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            tree = self._tree()
            for role in ("rank", "worker"):
                mine = [p for p in tree if p["role"] == role]
                if not mine:
                    continue
                peak = self.peak.setdefault(role, {})
                for key in ("rss_mb", "uss_mb", "files", "h5"):
                    peak[key] = max(peak.get(key, 0), max(p[key] for p in mine))
                peak["processes"] = max(peak.get("processes", 0), len(mine))
            total = sum(p["rss_mb"] for p in tree)
            self.peak.setdefault("all", {})["rss_mb"] = max(self.peak.get("all", {}).get("rss_mb", 0), total)
            self._stop.wait(self.period)

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        return {role: {k: round(v, 1) for k, v in d.items()} for role, d in self.peak.items()}


def run_stage(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,),
              timeout: float = 3600) -> dict[str, Any]:
    """Run one job to its end, sampled; its wall time, return code, output tail and peaks."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    sampler = Sampler(proc.pid)
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        peaks = sampler.stop()
    wall = time.perf_counter() - t0
    if proc.returncode not in ok:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {proc.returncode}\n{output[-4000:]}")
    return {"wall_s": round(wall, 3), "rc": proc.returncode, "peak": peaks, "command": " ".join(relative(c) for c in cmd),
            "output_tail": output[-600:]}


# --------------------------------------------------------------------------- stages
def preprocess(cohort: Path, data: Path, n: int, work: Path) -> dict[str, Any]:
    cmd = _mpirun(2, BIN / "udean", "preprocess", "--config", "tiny", "--data-root", cohort, "--out", data,
                  "--no-progress", f"data.subjects_limit={n}", *split(n))
    res = run_stage(cmd, work)
    run = json.loads((data / "logs" / "preprocess_runs.jsonl").read_text().splitlines()[-1])
    rows = [json.loads(x) for x in (data / "logs" / "preprocess.jsonl").read_text().splitlines()]
    waits = [r["timings"]["wait_for_task"] for r in rows if "wait_for_task" in r["timings"]]
    res.update(subjects=run["subjects"], processed=run["processed"], failed=run["failed"], used=run["used"],
               rank0_bookkeeping_ms=run["bookkeeping_ms"], dispatch_ms=run["dispatch_ms"],
               manifest_writes=run["manifest_writes"], manifest_write_ms=run["manifest_write_ms"],
               subjects_per_rank={r: sum(x["rank"] == r for x in rows) for r in (0, 1)},
               subject_s_mean=round(statistics.mean(r["seconds"] for r in rows), 4),
               wait_for_task_ms={"mean": round(statistics.mean(waits) * 1e3, 2),
                                 "median": round(statistics.median(waits) * 1e3, 2),
                                 "max": round(max(waits) * 1e3, 2)} if waits else None)
    return res


def damage(data: Path, k: int, seed: int = 0) -> tuple[dict[str, str], list[str], list[str]]:
    """Delete k patch shards and flip a byte in k others; their sha256 before, and which."""
    from hpc.atomic import sha256_file
    from preprocessing.manifest import load_manifest

    rows = [r for r in load_manifest(data).shards if r.kind != "volume"]
    picked = random.Random(seed).sample(rows, 2 * k)
    before = {r.path: sha256_file(data / r.path) for r in picked}
    deleted, corrupted = [r.path for r in picked[:k]], [r.path for r in picked[k:]]
    for rel in deleted:
        (data / rel).unlink()
    for rel in corrupted:
        b = bytearray((data / rel).read_bytes())
        b[len(b) // 2] ^= 1
        (data / rel).write_bytes(bytes(b))
    return before, deleted, corrupted


def regenerate(data: Path, k: int, work: Path) -> dict[str, Any]:
    from hpc.atomic import sha256_file

    before, deleted, corrupted = damage(data, k)
    runs_before = len((data / "logs" / "preprocess_runs.jsonl").read_text().splitlines())
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_")}  # the script as a 2-task job would run it
    env.update(UDEAN_MPI_LAUNCH="mpirun", SLURM_NTASKS="2", UDEAN_MPIRUN_ARGS="--oversubscribe",
               UDEAN_VENV=str(BIN.parent), UDEAN_REPO=str(REPO))
    res = run_stage(["bash", str(REPO / "slurm" / "regenerate_shards.sh"), str(data)], REPO, env)
    runs = [json.loads(x) for x in (data / "logs" / "preprocess_runs.jsonl").read_text().splitlines()[runs_before:]]
    restored = all(sha256_file(data / rel) == sha for rel, sha in before.items())
    if not restored:
        raise RuntimeError("regenerate: the damaged shards did not come back byte for byte")
    res.update(deleted=len(deleted), corrupted=len(corrupted), restored_byte_identical=restored,
               redone=runs[-1]["processed"], rank0_bookkeeping_ms=runs[-1]["bookkeeping_ms"],
               dispatch_ms=runs[-1]["dispatch_ms"], manifest_subjects=runs[-1]["subjects"])
    return res


def train(data: Path, run: Path, steps: int, work: Path) -> dict[str, Any]:
    cmd = _mpirun(2, BIN / "udean", "train", "--config", "tiny", f"data.out={data}", f"train.out={run}",
                  "train.epochs=1", f"train.steps_per_epoch={steps}", "train.num_workers=2", "train.val_every=0",
                  f"train.checkpoint_every={steps}", "train.log_every=10")
    out = {}
    for start in ("first", "resumed"):
        t0 = time.time()
        res = run_stage(cmd, work)
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        event = [m for m in metrics if m.get("event") == "data"][-1]
        res["data_check"] = {k: event[k] for k in ("files", "hashed", "hashed_per_rank", "seconds")}
        if start == "first":
            first = min(m["time"] for m in metrics if m["kind"] == "train")
            res["time_to_first_step_s"] = round(first - t0, 2)
            res["steps"] = max(m["step"] for m in metrics if m["kind"] == "train")
        out[start] = res
    return out


def loader(data: Path, batches: int, workers: int = 2) -> dict[str, Any]:
    """The training DataLoader over every shard in this process, bounded and unbounded readers;
    the workers' peaks sampled."""
    import torch

    from preprocessing.manifest import load_manifest
    from udean.config import load
    from udean.data.shards import MAX_OPEN, PatchShards
    from udean.train import data_loader, patch_data

    m = load_manifest(data)
    t = load("tiny", ["train.batch_size=8", f"train.num_workers={workers}"]).train
    out = {}
    for name, max_open in (("bounded", MAX_OPEN), ("unbounded", None)):
        groups = [[r for r in m.shards if r.group == g and r.kind != "volume"] for g in ("source", "target")]
        src, tgt = (PatchShards([data / r.path for r in rows], [r.patches for r in rows], max_open=max_open)
                    for rows in groups)
        dataset, sampler = patch_data(src, tgt, t, steps_per_epoch=batches)
        sampler_proc = Sampler(os.getpid())
        t0 = time.perf_counter()
        n = sum(1 for _ in data_loader(dataset, sampler, t, torch.device("cpu")))
        wall = time.perf_counter() - t0
        peaks = sampler_proc.stop()
        out[name] = {"max_open": max_open, "shards": len(src.paths) + len(tgt.paths), "batches": n,
                     "pairs_per_s": round(n * t.batch_size / wall, 1), "worker": peaks.get("worker", {})}
    return out


def projection(pre: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's ceiling (subjects per second it can hand out and record) against the rate the
    other ranks bring results at 64, 128, 256 ranks, for full-size subjects; with the per-subject
    manifest rewrite of before issue 28 for comparison."""
    full = json.loads(FULL_SIZE.read_text()) if FULL_SIZE.is_file() else None
    if full is None:
        return {"note": f"{relative(FULL_SIZE)} missing: no full-size subject cost to project with"}
    proj = next(v for k, v in full["projection_1113"].items() if k.startswith("all_1113"))
    subject_s = proj["total_work_s"] / sum(proj["counts"].values())
    from preprocessing.driver import MANIFEST_EVERY_S

    writer_share = pre["manifest_write_ms"] / (MANIFEST_EVERY_S * 1e3)  # of rank 0's time, the writer thread's
    now_ms = pre["dispatch_ms"] / (1 - writer_share)
    before_ms = pre["dispatch_ms"] + pre["manifest_write_ms"]  # every record rewrote the manifest
    rows = []
    for p in PROJECT_RANKS:
        demand = (p - 1) / subject_s  # results per second from p - 1 ranks (rank 0 dispatches only above 16)
        rows.append({"ranks": p, "results_per_s": round(demand, 1),
                     "rank0_busy": round(demand * now_ms / 1e3, 4), "rank0_busy_before": round(demand * before_ms / 1e3, 3),
                     "wall_s_1113": round(max(1113 * subject_s / (p - 1), 1113 * now_ms / 1e3), 1),
                     "wall_s_1113_before": round(max(1113 * subject_s / (p - 1), 1113 * before_ms / 1e3), 1)})
    return {"subject_s_full_size": round(subject_s, 4), "from": relative(FULL_SIZE),
            "rank0_ms_per_subject": round(now_ms, 4), "rank0_ms_per_subject_before": round(before_ms, 3),
            "ceiling_subjects_per_s": round(1e3 / now_ms, 1), "ceiling_subjects_per_s_before": round(1e3 / before_ms, 1),
            "ranks_at_ceiling": int(1e3 / now_ms * subject_s) + 1,
            "ranks_at_ceiling_before": int(1e3 / before_ms * subject_s) + 1, "by_ranks": rows}


# --------------------------------------------------------------------------- main
def chart(path: Path, doc: dict[str, Any]) -> None:
    counts = [c["subjects"] for c in doc["counts"]]
    stages = ("preprocess", "verify", "regenerate", "train_first", "train_resumed")
    walls, labels = [], []
    for c in doc["counts"]:
        for s in stages:
            r = c["train"][s.split("_")[1]] if s.startswith("train") else c[s]
            labels.append(f"{c['subjects']}: {s}")
            walls.append(r["wall_s"])
    book = [(f"{c['subjects']}: rank 0 now", c["preprocess"]["rank0_bookkeeping_ms"]) for c in doc["counts"]]
    book += [(f"{c['subjects']}: a manifest rewrite", c["preprocess"]["manifest_write_ms"]) for c in doc["counts"]]
    workers = [(f"{c['subjects']}: {k}", c["loader"][k]["worker"]) for c in doc["counts"] for k in ("bounded", "unbounded")]
    def panel(title: str, xlabel: str, pairs: list, fmt: str = "{:.0f}", **kw) -> dict[str, Any]:
        return {"title": title, "xlabel": xlabel, "labels": [x for x, _ in pairs], "values": [v for _, v in pairs],
                "notes": [fmt.format(v) if v is not None else "-" for _, v in pairs], **kw}

    loadavg = doc["provenance"]["loadavg"][0], doc["provenance"]["loadavg_end"][0]
    bar_chart(path, [
        panel("wall time per stage", "s", list(zip(labels, walls))),
        panel("rank 0 per subject (before: one manifest rewrite each)", "ms", book, "{:.2f}", ref=(2.0, "2 ms")),
        panel("loader worker: open .h5 files (peak)", "files", [(x, w.get("h5")) for x, w in workers]),
        panel("loader worker: private memory (peak USS)", "MiB", [(x, w.get("uss_mb")) for x, w in workers]),
    ], title=f"cohort at scale: {', '.join(map(str, counts))} subjects, {'x'.join(map(str, doc['shape']))}, 2 ranks; "
             f"machine load average {loadavg[0]:.1f} at the start, {loadavg[1]:.1f} at the end (2 cores)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, nargs="+", default=[100, 1113], help="cohort sizes (default 100 1113)")
    p.add_argument("--steps", type=int, default=50, help="training steps")
    p.add_argument("--damage", type=int, default=20, help="shards deleted, and as many corrupted, before regenerating")
    p.add_argument("--batches", type=int, default=100, help="loader batches of 8 per reader")
    p.add_argument("--work", default=None, help="parent of the work folder (default: the system's temp folder)")
    p.add_argument("--out", default=str(RESULTS / "cohort_scale.json"))
    args = p.parse_args(argv)
    from preprocessing.cohort import write_cohort

    doc: dict[str, Any] = {"shape": list(SHAPE), "config": "tiny", "ranks": 2, "provenance": provenance(argv)}
    with tempfile.TemporaryDirectory(dir=args.work, prefix="cohort_scale.") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        write_cohort(work / "cohort", max(args.subjects), shape=SHAPE, seed=0, progress=False)
        doc["cohort_s"] = round(time.perf_counter() - t0, 1)
        doc["counts"] = []
        for n in sorted(args.subjects):
            data = work / f"data_{n}"
            c: dict[str, Any] = {"subjects": n}
            c["preprocess"] = preprocess(work / "cohort", data, n, work)
            c["verify"] = run_stage([str(BIN / "udean"), "shards", "verify", str(data)], work)
            c["regenerate"] = regenerate(data, args.damage, work)
            c["train"] = train(data, work / f"run_{n}", args.steps, work)
            c["loader"] = loader(data, args.batches)
            c["disk_mb"] = round(sum(f.stat().st_size for f in data.rglob("*") if f.is_file()) / 2**20, 1)
            doc["counts"].append(c)
            pre, tr = c["preprocess"], c["train"]
            print(f"{n} subjects: preprocess {pre['wall_s']:.1f} s (rank 0 {pre['rank0_bookkeeping_ms']:.3f} ms/subject, "
                  f"a manifest rewrite {pre['manifest_write_ms']:.1f} ms), verify {c['verify']['wall_s']:.1f} s, "
                  f"regenerate {c['regenerate']['wall_s']:.1f} s, train {tr['first']['wall_s']:.1f} s "
                  f"(resumed start {tr['resumed']['wall_s']:.1f} s, hashed {tr['resumed']['data_check']['hashed']}), "
                  f"loader worker h5 files {c['loader']['bounded']['worker'].get('h5')} / "
                  f"{c['loader']['unbounded']['worker'].get('h5')} unbounded", flush=True)
        doc["disk_free_gb_at_end"] = round(shutil.disk_usage(work).free / 2**30, 1)
    largest = max(doc["counts"], key=lambda c: c["subjects"])
    doc["projection"] = projection(largest["preprocess"])
    doc["provenance"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out = write_json(args.out, doc)
    chart(out.with_suffix(".png"), doc)
    print(f"-> {relative(out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
