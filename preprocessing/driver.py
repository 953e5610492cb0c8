"""`udean preprocess`: NIfTI subjects -> HDF5 shards + manifest.json, MPI-parallel
(docs/architecture.md, "Distributed").

Rank 0 plans (discover, split, what a previous run already did), then hands out one subject at a
time from a dynamic queue (subjects differ in cost) while also processing subjects itself (up to
`RANK0_WORKS_UP_TO` ranks): a helper thread on rank 0 answers the other ranks, polling so no core
spins. Every rank writes its own shard files. Rank 0's bookkeeping is O(1) per subject: the
dispatcher hands a rank its next subject (non-blocking send) before recording the result it
brought, and a result is one line appended to
`<out>/manifest.journal` (preprocessing/manifest.py) and one to the log; a writer thread rewrites
manifest.json from the rows every `MANIFEST_EVERY_S` seconds (outside the lock the dispatcher
takes), and at the end, when the journal is removed. A killed job loses only the subjects in
flight: the next run (and every reader) folds the journal into the manifest. A bad input is a
"failed" row and the job goes on; any other exception on any rank aborts the whole job
(MPI_Abort) instead of hanging it. Without an MPI launcher it runs as one rank.

Input errors and output errors are told apart: a bad input fails its subject; a failed write
(`hpc.atomic.OutputError`: disk full, I/O error, a vanished temp file) stops the job (exit 74)
with one line, leaving no half-written file and every finished subject in the manifest.
Rank 0 holds the output folder's lock (`hpc.lock`) for the whole job: a second job into the
same folder is refused before it touches anything; a previous data set made with another
config is replaced only with `--overwrite`. A subject is reused when its input path, size and
mtime are unchanged and its shards still verify; until it is checked again, the plan keeps its
previous row, so a killed resume loses nothing either.

Exit codes of `udean preprocess`: 0 every subject ok; 1 some subject failed (0 with
`--allow-failures`, unless every subject failed); 2 a user error before any work (config,
data root, the lock, a previous data set of another config); 74 an output error.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hpc import mpi
from hpc.atomic import OutputError, file_mismatch
from hpc.lock import folder_lock
from preprocessing.config import DataConfig, diff_keys
from preprocessing.discover import Subject, plan
from preprocessing.manifest import Journal, Manifest, ShardRow, SubjectRow, load_manifest, manifest_path, write_manifest
from preprocessing.plan import resolve as resolve_grid, tables
from preprocessing.subject import SubjectResult, process

TAG_RESULT, TAG_TASK, TAG_FINAL = 11, 12, 13
POLL_S = 0.002
# Rank 0 processes subjects itself up to this many ranks; beyond, it only dispatches and records:
# while its main thread runs a subject, the dispatcher waits for the GIL before each message (up
# to Python's 5 ms switch interval), and rank 0 is one rank in 17 or more
RANK0_WORKS_UP_TO = 16
MANIFEST_EVERY_S = 5.0  # manifest.json rewritten at most this often during a run (the journal has every subject)
EXIT_FAILED, EXIT_OUTPUT = 1, 74  # some subject failed; a write failed (sysexits EX_IOERR)


# --------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="HCP root or flat NIfTI folder (overrides data.root)")
    p.add_argument("--out", default=None, help="output folder (overrides data.out)")
    p.add_argument("--layout", choices=("hcp", "hcp_acpc", "flat"), default=None, help="overrides data.layout")
    p.add_argument("--mode", choices=("unpaired", "misaligned"), default=None, help="overrides data.mode")
    g = p.add_argument_group("your own scans by role (README \"Your own data\"; instead of --data-root)")
    for flag, key, text in OWN_FLAGS:
        g.add_argument(flag, default=None, metavar="DIR" if key != "dataset" else "FILE",
                       help=f"{text} (data.own.{key})")
    g.add_argument("--voxel-size", type=float, default=None, metavar="MM",
                   help="HR voxel size in mm, the LR role's 2x (data.voxel_size_mm); own data without it: planned "
                        "from the scans (the HR folder's median finest voxel; --plan shows it)")
    g.add_argument("--register", action="store_true", default=None,
                   help="register paired val/test HR onto their LR rigidly (data.own.registration=rigid)")
    p.add_argument("--plan", action="store_true",
                   help="print the plan (grid, what each scan gets, intensity scaling) and stop: nothing is written")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--allow-failures", action="store_true",
                   help="exit 0 although some subjects failed (never when all failed); default: exit 1")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a data set in --out that was made with another data config (default: refuse)")


OWN_FLAGS = (("--hr", "hr", "HR scans -> source (unpaired HR patches)"),
             ("--lr", "lr", "authentic LR scans -> target, used as acquired (no synthetic degradation)"),
             ("--val-hr", "val_hr", "paired val HR scans (matched to --val-lr by file name)"),
             ("--val-lr", "val_lr", "paired val LR scans"),
             ("--test-hr", "test_hr", "paired test HR scans (matched to --test-lr by file name)"),
             ("--test-lr", "test_lr", "paired test LR scans"),
             ("--dataset", "dataset", "a dataset.json naming the role folders"))


def data_config(args: argparse.Namespace) -> DataConfig:
    cfg: DataConfig = args.cfg.data
    upd = {k: v for k, v in (("root", args.data_root), ("out", args.out), ("layout", args.layout),
                             ("mode", args.mode), ("voxel_size_mm", getattr(args, "voxel_size", None)))
           if v is not None}
    own = {key: str(Path(getattr(args, key)).absolute()) for _, key, _ in OWN_FLAGS if getattr(args, key, None)}
    if getattr(args, "register", None):
        own["registration"] = "rigid"
    if getattr(args, "voxel_size", None) is not None and (own or cfg.own.enabled):
        own["grid"] = "voxel_size"  # the HR voxel as given, not planned from the scans
    if own:
        upd["own"] = {**cfg.own.model_dump(), **own}
    return DataConfig.model_validate({**cfg.model_dump(), **upd}) if upd else cfg


def run(args: argparse.Namespace) -> int:
    cfg = data_config(args)
    comm = mpi.world()
    if args.plan:  # rank 0 prints; no lock is taken and nothing is written
        if comm.rank == 0:
            from rich.console import Console

            Console().print(*tables(resolve_grid(cfg, plan(cfg))[1], per_scan=True))
        return 0
    summary = preprocess(cfg, comm, progress=not args.no_progress, overwrite=args.overwrite)
    return summary.exit_code(args.allow_failures, "udean preprocess", say=comm.rank == 0)


@dataclass
class Summary:
    """What a preprocessing run did (the same on every rank)."""

    subjects: int = 0
    processed: int = 0
    reused: int = 0
    failed: int = 0  # subjects with status "failed" in the manifest
    used: int = 0  # subjects in a group (not "unused")
    seconds: float = 0.0
    redone: list[str] = field(default_factory=list)  # `udean shards regenerate`: the subjects redone
    out: str = ""
    # rank 0's bookkeeping: mean ms per recorded subject (row, journal, log, progress: what the
    # dispatcher waits for), and the manifest rewrites (writer thread and the last one)
    bookkeeping_ms: float = 0.0
    manifest_writes: int = 0
    manifest_write_ms: float = 0.0
    dispatch_ms: float = 0.0  # mean time of the dispatcher thread per worker message: rank 0's ceiling is 1 / this

    def exit_code(self, allow_failures: bool = False, what: str = "preprocess", say: bool = True) -> int:
        """0 when no subject failed, or some (not all) did and `allow_failures`; else EXIT_FAILED,
        after one line (if `say`: rank 0) naming the count and where the errors are."""
        if not self.failed:
            return 0
        where = f"the failed rows of {manifest_path(self.out)} and {Path(self.out) / LOG}"
        accepted = allow_failures and self.failed < self.used
        hint = "" if accepted or self.failed >= self.used else " (--allow-failures accepts failed subjects)"
        if say:
            print(f"{what}: {'' if accepted else 'error: '}{self.failed} of {self.used} subjects failed"
                  f"{', accepted (--allow-failures)' if accepted else ''}; errors: {where}{hint}", file=sys.stderr)
        return 0 if accepted else EXIT_FAILED


@dataclass
class Task:
    """One subject for a rank: process it, unless `expect` (its previous shard rows) still verify."""

    subject: Subject
    expect: list[ShardRow] | None = None
    previous: SubjectRow | None = None


# --------------------------------------------------------------------------- planning (rank 0)
def verify_rows(out: Path, rows: Iterable[ShardRow]) -> str | None:
    """None when every shard row matches its file (size, sha256), else the first reason."""
    for r in rows:
        why = file_mismatch(out / r.path, r.bytes, r.sha256)
        if why:
            return f"{out / r.path}: {why}"
    return None


LOG = Path("logs") / "preprocess.jsonl"
RUNS_LOG = Path("logs") / "preprocess_runs.jsonl"


def input_stat(subject: Subject) -> list[int] | None:
    """[bytes, mtime_ns] of the subject's input (and of its acquired LR, own data), None if one
    cannot be read: what reuse compares."""
    stat = []
    for path in (subject.input, subject.lr_input):
        if path is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            return None
        stat += [int(st.st_size), int(st.st_mtime_ns)]
    return stat


def _clean_temps(out: Path) -> None:
    """Temp files of a killed run (atomic_path names them .<name>.<random>.tmp). Called with the
    folder's lock held: no other job is writing here."""
    for sub in ("shards", "volumes", "."):
        d = out / sub
        if d.is_dir():
            for p in d.rglob(".*.tmp") if sub != "." else d.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def _previous(cfg: DataConfig, out: Path, overwrite: bool) -> Manifest | None:
    """The previous run's manifest to resume from; a data set of another config (or an
    unreadable manifest) is refused unless `overwrite`."""
    if not manifest_path(out).is_file():
        return None
    try:
        m = load_manifest(out)
    except ValueError as exc:
        if not overwrite:
            raise ValueError(f"{exc}; --overwrite replaces that data set, or choose another --out") from None
        print(f"preprocess: replacing the data set of an unreadable manifest (--overwrite): {exc}", file=sys.stderr)
        return None
    if m.config_hash != cfg.hash():
        keys = diff_keys({k: v for k, v in m.config.items() if k != "out"}, cfg.model_dump(mode="json", exclude={"out"}))
        what = f"{manifest_path(out)} holds a data set made with another data config (differs in: " \
               f"{', '.join(keys[:8]) or 'the config hash'})"
        if not overwrite:
            raise ValueError(f"{what}; --overwrite redoes every subject over it, or choose another --out")
        print(f"preprocess: {what}; redoing every subject (--overwrite)", file=sys.stderr)
        return None
    return m


def prepare(cfg: DataConfig, out: Path, subjects: list[Subject], only: set[str] | None = None,
            overwrite: bool = False) -> tuple[Manifest, list[Task]]:
    """The manifest to fill (previous rows kept) and the tasks: one per subject to (re)check.
    `subjects`: `discover.plan(cfg)`."""
    prev = _previous(cfg, out, overwrite)
    prev_rows = {r.id: r for r in prev.subjects} if prev else {}
    prev_shards: dict[str, list[ShardRow]] = collections.defaultdict(list)
    for s in prev.shards if prev else []:
        prev_shards[s.subject].append(s)
    m = Manifest(out, cfg.model_dump(mode="json"), cfg.hash())
    tasks = []
    for s in subjects:
        old = prev_rows.get(s.id)
        reuse = (old is not None and old.group == s.group and old.input == s.input and old.lr_input == s.lr_input
                 and old.status == "ok" and old.input_stat is not None and old.input_stat == input_stat(s))
        if only is not None and s.id not in only:
            if old is None:
                raise ValueError(f"{manifest_path(out)}: no row for subject {s.id}; run `udean preprocess` instead")
            m.subjects.append(old)
            m.shards.extend(prev_shards.get(s.id, []))
            continue
        if s.group == "unused":
            m.subjects.append(SubjectRow(s.id, s.group, s.input, status="ok"))
            continue
        expect = prev_shards.get(s.id, []) if reuse and only is None else None
        if expect is not None:  # kept as it was until checked again: a killed resume loses nothing
            m.subjects.append(old)
            m.shards.extend(expect)
        else:
            m.subjects.append(SubjectRow(s.id, s.group, s.input))
        tasks.append(Task(s, expect, old if expect is not None else None))
    return m, tasks


# --------------------------------------------------------------------------- one task (any rank)
def run_task(task: Task, cfg: DataConfig, out: Path) -> SubjectResult:
    """Skip the subject when its previous shards still verify, else process it. Out of memory
    fails the subject alone, with a message (a bigger volume than this rank can hold)."""
    if task.expect is not None and task.previous is not None and len(task.expect) == len(task.previous.shards):
        if verify_rows(out, task.expect) is None:
            return SubjectResult(task.previous, task.expect, reused=True)
    s = task.subject
    stat = input_stat(s)  # before reading: a file changed during the run is not reused next time
    try:
        res = process(s, cfg, out)
    except MemoryError as exc:
        res = SubjectResult(SubjectRow(s.id, s.group, s.input, status="failed", error=(
            f"{s.input}: out of memory while processing ({exc or 'MemoryError'}): give each rank more "
            "memory (fewer ranks per node)")))
    res.row.input_stat = stat
    return res


# --------------------------------------------------------------------------- rank 0
class _Recorder:
    """Rank 0's book: the rows by subject, the journal, the log, progress. `record` is O(1) and
    thread-safe; `write` rebuilds manifest.json from a snapshot of the rows, outside the lock."""

    def __init__(self, m: Manifest, n_tasks: int, progress: bool) -> None:
        self.out, self.config, self.config_hash = m.out, m.config, m.config_hash
        self.rows = {r.id: r for r in m.subjects}
        self.shards: dict[str, list[ShardRow]] = collections.defaultdict(list)
        for s in m.shards:
            self.shards[s.subject].append(s)
        self.lock = threading.Lock()
        self.done = self.failed = self.reused = 0
        self.changes = self.written = 0  # records so far / records in the last manifest written
        self.record_s = self.write_s = 0.0
        self.writes = 0
        self.served, self.serve_s = 0, 0.0  # the dispatcher's messages and its time on them (recv to recorded)
        self.t0 = time.perf_counter()
        self.n = n_tasks
        self.journal: Journal | None = None
        self.log_path = m.out / LOG
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log = open(self.log_path, "a")
        except OSError as exc:
            raise OutputError(self.log_path, exc) from exc
        self._bar = None
        from rich.console import Console

        self.console = Console(stderr=True)
        if progress and n_tasks:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._bar = Progress(TextColumn("preprocess"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("[red]{task.fields[failed]} failed"),
                                 TextColumn("{task.fields[rate]} subj/min"), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
            self._task = self._bar.add_task("subjects", total=n_tasks, failed=0, rate="-")
            self._bar.start()

    def manifest(self) -> Manifest:
        return Manifest(self.out, self.config, self.config_hash, list(self.rows.values()),
                        [s for rows in self.shards.values() for s in rows])

    def start(self) -> None:
        """The plan on disk before any shard is, then an empty journal."""
        self.write()
        self.journal = Journal(self.out, self.config_hash)

    def write(self) -> None:
        """Rewrite manifest.json if anything was recorded since the last write. Only one thread
        at a time calls it (the writer thread, or the main thread once that one has stopped)."""
        with self.lock:
            if self.writes and self.changes == self.written:
                return
            m, changes = self.manifest(), self.changes  # O(rows) of references; sorted and written below
        t = time.perf_counter()
        write_manifest(m)
        self.write_s += time.perf_counter() - t
        self.writes += 1
        self.written = changes

    def record(self, res: SubjectResult, rank: int) -> None:
        row = res.row
        with self.lock:
            t = time.perf_counter()
            self.rows[row.id] = row
            self.shards[row.id] = list(res.shards)
            self.journal.append(row, res.shards)
            self.changes += 1
            self.done += 1
            self.reused += res.reused
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9) * 60
            if row.status == "failed":
                self.failed += 1
                self.console.print(f"[red]preprocess: subject {row.id} failed:[/] {row.error}",
                                   highlight=False, markup=True)
            for note in res.notes:
                self.console.print(f"preprocess: subject {row.id}: {note}", highlight=False, markup=False)
            try:
                self.log.write(json.dumps({"time": time.time(), "rank": rank, "id": row.id, "group": row.group,
                                           "status": row.status, "error": row.error, "reused": res.reused,
                                           "seconds": row.seconds, "timings": res.timings, "notes": res.notes,
                                           "done": self.done, "total": self.n, "rate_per_min": rate}) + "\n")
                self.log.flush()
            except OSError as exc:
                raise OutputError(self.log_path, exc) from exc
            if self._bar is not None:
                self._bar.update(self._task, advance=1, failed=self.failed, rate=f"{rate:.1f}")
            self.record_s += time.perf_counter() - t

    def close(self, finished: bool) -> None:
        """`finished`: the last manifest is written, so the journal goes."""
        if self._bar is not None:
            self._bar.stop()
        if self.journal is not None:
            self.journal.close(remove=finished)
        self.log.close()


def _write_every(rec: _Recorder, period: float, stop: threading.Event, errors: list) -> None:
    """Writer thread on rank 0: manifest.json every `period` seconds while subjects are recorded."""
    try:
        while not stop.wait(period):
            rec.write()
    except BaseException as exc:  # surfaced by the main thread, which stops the job
        errors.append((exc, traceback.format_exc()))


def _dispatch(comm: Any, queue: collections.deque, lock: threading.Lock, rec: _Recorder, errors: list) -> None:
    """Helper thread on rank 0: answer each worker's result with its next task (or None), then
    record the result: the worker does not wait for rank 0's bookkeeping."""
    try:
        active = comm.size - 1
        status = mpi.make_status(comm)
        src = mpi.any_source(comm)
        sending: list = []  # isend requests: a blocking send waited for the worker's next poll (2-6 ms measured)
        while active:
            if not comm.iprobe(source=src, tag=TAG_RESULT, status=status):
                sending = [r for r in sending if not r.Test()]
                time.sleep(POLL_S)
                continue
            t = time.perf_counter()
            rank = status.Get_source()
            res = comm.recv(source=rank, tag=TAG_RESULT)
            with lock:
                task = queue.popleft() if queue else None
            sending.append(comm.isend(task, dest=rank, tag=TAG_TASK))
            if task is None:
                active -= 1
            if res is not None:
                rec.record(res, rank)
            rec.served += 1
            rec.serve_s += time.perf_counter() - t
        for r in sending:
            r.wait()
    except BaseException as exc:  # surfaced by the main thread, which aborts the job
        errors.append((exc, traceback.format_exc()))


def _recv_polling(comm: Any, source: int, tag: int) -> Any:
    """Blocking receive without a spinning core (OpenMPI busy-waits in recv)."""
    while not comm.iprobe(source=source, tag=tag):
        time.sleep(POLL_S)
    return comm.recv(source=source, tag=tag)


def _serve(comm: Any, cfg: DataConfig, out: Path, m: Manifest, tasks: list[Task], progress: bool) -> Summary:
    rec = _Recorder(m, len(tasks), progress)
    queue = collections.deque(tasks)
    lock = threading.Lock()
    errors: list = []
    helper = None
    stop = threading.Event()
    writer = threading.Thread(target=_write_every, args=(rec, MANIFEST_EVERY_S, stop, errors), daemon=True)
    finished = False
    try:
        rec.start()
        writer.start()
        if comm.size > 1:
            if not mpi.thread_level_ok(comm):
                raise RuntimeError("MPI library does not provide MPI_THREAD_SERIALIZED; rank 0 needs it")
            helper = threading.Thread(target=_dispatch, args=(comm, queue, lock, rec, errors), daemon=True)
            helper.start()
        while not errors and comm.size <= RANK0_WORKS_UP_TO:
            with lock:
                task = queue.popleft() if queue else None
            if task is None:
                break
            rec.record(run_task(task, cfg, out), 0)
        while helper is not None and helper.is_alive() and not errors:
            helper.join(0.1)
        stop.set()
        if writer.is_alive():
            writer.join()
        if errors:
            exc, tb = errors[0]
            if isinstance(exc, OutputError):  # the manifest, journal or log could not be written: an output error
                raise exc
            raise RuntimeError(f"rank 0 dispatcher failed:\n{tb}") from exc
        rec.write()
        finished = True
    finally:
        stop.set()
        rec.close(finished)
    rows = rec.rows.values()
    summary = Summary(subjects=len(rows), processed=rec.done - rec.reused - rec.failed, reused=rec.reused,
                      failed=sum(r.status == "failed" for r in rows), used=sum(r.group != "unused" for r in rows),
                      seconds=round(time.perf_counter() - rec.t0, 3), out=str(out),
                      bookkeeping_ms=round(rec.record_s / max(rec.done, 1) * 1e3, 4), manifest_writes=rec.writes,
                      manifest_write_ms=round(rec.write_s / max(rec.writes, 1) * 1e3, 3),
                      dispatch_ms=round(rec.serve_s / max(rec.served, 1) * 1e3, 4))
    failed = f"{summary.failed} failed (errors: {out / LOG})" if summary.failed else "0 failed"
    rec.console.print(f"preprocess: {summary.processed} processed, {summary.reused} reused, "
                      f"{failed} of {summary.subjects} subjects -> {manifest_path(out)}", highlight=False)
    _log_run(out, summary, comm.size)
    return summary


def _log_run(out: Path, summary: Summary, ranks: int) -> None:
    """One line per run in logs/preprocess_runs.jsonl: what it did and what rank 0's bookkeeping cost."""
    path = out / RUNS_LOG
    line = {"time": time.time(), "ranks": ranks, **{k: v for k, v in asdict(summary).items() if k not in ("out", "redone")}}
    try:
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    except OSError as exc:
        raise OutputError(path, exc) from exc


def _work(comm: Any, cfg: DataConfig, out: Path) -> None:
    res = None
    while True:
        comm.send(res, dest=0, tag=TAG_RESULT)
        t = time.perf_counter()
        task = _recv_polling(comm, 0, TAG_TASK)
        if task is None:
            return
        waited = time.perf_counter() - t
        res = run_task(task, cfg, out)
        res.timings["wait_for_task"] = round(waited, 6)  # in the log: how long rank 0 kept this rank waiting


def preprocess(cfg: DataConfig, comm: Any = None, only: set[str] | None = None, progress: bool = True,
               overwrite: bool = False) -> Summary:
    """Run (or resume) preprocessing of `cfg` (the `data:` section) on every rank of `comm`
    (default: the MPI world, or one rank without a launcher); returns rank 0's summary on all
    ranks. `only`: redo exactly these subject ids (regenerate), keeping the other rows.
    `overwrite`: replace a data set of another config in `cfg.out` (else ValueError).
    Raises ValueError for a user error before any work, OutputError when a write fails (one
    rank: here; several: that rank prints it and aborts the job with EXIT_OUTPUT)."""
    comm = comm if comm is not None else mpi.world()
    out = Path(cfg.out)
    err = payload = None
    with contextlib.ExitStack() as held:
        if comm.rank == 0:
            try:
                subjects = plan(cfg)  # the data root is checked before anything is created
                cfg, grid = resolve_grid(cfg, subjects)  # own data: the grid from the scans
                from rich.console import Console

                Console(stderr=True).print(*tables(grid))
                held.enter_context(folder_lock(out, "udean preprocess"))
                _clean_temps(out)
                payload = prepare(cfg, out, subjects, only, overwrite)
            except (ValueError, OSError, OutputError) as exc:
                err = str(exc)
        err, cfg = comm.bcast((err, cfg), root=0)  # every rank works on the planned grid
        if err:
            raise ValueError(err)
        try:
            if comm.rank == 0:
                m, tasks = payload
                summary = _serve(comm, cfg, out, m, tasks, progress and sys.stderr.isatty())
                for r in range(1, comm.size):
                    comm.send(summary, dest=r, tag=TAG_FINAL)
            else:
                _work(comm, cfg, out)
                summary = _recv_polling(comm, 0, TAG_FINAL)
        except BaseException as exc:
            if comm.size > 1:
                if isinstance(exc, OutputError):  # one line: the disk, not a bug
                    print(f"preprocess: error: rank {comm.rank}: {exc}; stopping the job (finished subjects are "
                          f"kept in {manifest_path(out)}; rerun to resume)", file=sys.stderr, flush=True)
                else:
                    traceback.print_exc()
                    print(f"preprocess: rank {comm.rank} failed; aborting the job", file=sys.stderr, flush=True)
                comm.Abort(EXIT_OUTPUT if isinstance(exc, OutputError) else 1)
            raise
    return summary
