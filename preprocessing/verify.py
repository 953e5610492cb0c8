"""`udean shards verify OUT` and `udean shards regenerate OUT`.

verify: every shard row of the manifest -> file exists, byte size, sha256, opens with h5py and
every chunk reads, patch count; every ok subject's shards are listed; a subject that failed (or
is pending) is a problem too: the data set is not whole. Exit 1 when anything is off. (Paths
are checked on load: a manifest row pointing outside the folder is refused, exit 2.)
regenerate: redo exactly the subjects `verify` flags (with the manifest's own config: a failed
subject is retried, its input may have been fixed), under MPI or as one rank, and rewrite the
manifest; exit 1 when a subject still fails.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hpc import mpi
from hpc.atomic import file_mismatch
from preprocessing.config import DataConfig
from preprocessing.driver import Summary, preprocess
from preprocessing.manifest import Manifest, ShardRow, load_manifest
from preprocessing.shards import check_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("verify", "regenerate"),
                   help="verify: check every shard; regenerate: rebuild the subjects with bad shards")
    p.add_argument("out", metavar="OUT", help="preprocessing output folder (holds manifest.json)")
    p.add_argument("--group", choices=("source", "target", "val", "test"), default=None,
                   help="only this shard group (one array task per group in slurm/regenerate_shards.sh)")
    p.add_argument("--json", action="store_true", help="print the problems as JSON")
    p.add_argument("--no-progress", action="store_true")


def check_shard(out: Path, row: ShardRow) -> str | None:
    """None if the shard file matches its manifest row, else what is wrong."""
    p = out / row.path
    why = file_mismatch(p, row.bytes, row.sha256)
    if why:
        return f"{why} (manifest row)"
    try:
        check_file(p, row.kind, None if row.kind == "volume" else row.patches)
    except ValueError as exc:
        return str(exc)
    return None


def verify(out: str | Path, m: Manifest | None = None, group: str | None = None) -> list[dict[str, Any]]:
    """Problems as [{"subject", "path", "problem"}]; empty when the data set (or `group`) is whole."""
    out = Path(out)
    m = m or load_manifest(out)
    problems = []
    listed = {s.path for s in m.shards}
    for row in m.shards:
        if group and row.group != group:
            continue
        why = check_shard(out, row)
        if why:
            problems.append({"subject": row.subject, "path": row.path, "problem": why})
    for sub in m.subjects:
        if group and sub.group != group:
            continue
        if sub.status == "ok":
            for path in sub.shards.values():
                if path not in listed:
                    problems.append({"subject": sub.id, "path": path, "problem": "no shard row in the manifest"})
        elif sub.status == "pending":
            problems.append({"subject": sub.id, "path": None, "problem": "pending (run interrupted)"})
        elif sub.status == "failed":
            problems.append({"subject": sub.id, "path": None, "problem": f"failed in preprocessing: {sub.error}"})
    return problems


def regenerate(out: str | Path, comm: Any = None, progress: bool = True, group: str | None = None) -> Summary:
    """Redo the subjects `verify` flags; returns the preprocess summary with the `redone` ids."""
    comm = comm if comm is not None else mpi.world()
    out = Path(out)
    err = payload = None
    if comm.rank == 0:
        try:
            m = load_manifest(out)
            cfg = DataConfig.model_validate({**m.config, "out": str(out)})
            payload = (cfg, sorted({p["subject"] for p in verify(out, m, group)}))
        except ValueError as exc:
            err = str(exc)
    err, payload = comm.bcast((err, payload), root=0)
    if err:
        raise ValueError(err)
    cfg, bad = payload
    summary = preprocess(cfg, comm, only=set(bad), progress=progress) if bad else Summary()
    summary.redone = bad
    return summary


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    if args.action == "verify":
        m = load_manifest(args.out)
        problems = verify(args.out, m, args.group)
        if args.json:
            print(json.dumps(problems, indent=1))
        for p in problems:
            console.print(f"[red]bad[/] {p['subject']}: {p['path'] or '-'}: {p['problem']}", highlight=False)
        failed = sum(p["path"] is None for p in problems)
        console.print(f"shards verify: {len(m.shards)} shards, {len(problems)} problems "
                      f"({len({p['subject'] for p in problems})} subjects, {failed} of them failed or pending in "
                      f"preprocessing) in {args.out}", highlight=False)
        return 1 if problems else 0
    comm = mpi.world()
    summary = regenerate(args.out, comm, progress=not args.no_progress, group=args.group)
    if comm.rank == 0:
        console.print(f"shards regenerate: redid {len(summary.redone)} subjects {summary.redone}",
                      highlight=False)
    return summary.exit_code(what="udean shards regenerate", say=comm.rank == 0)
