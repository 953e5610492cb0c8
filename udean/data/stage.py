"""The files training reads, checked against the manifest before the first step, and optionally
staged to node-local disk (`train.stage_dir`).

Every start checks each source/target shard (and val volume, with validation) against its
manifest row, size and sha256, so a shard that changed under a resumed run is caught (the resume
rule, docs/architecture.md). Hashing the cohort at every start (a few GB, a requeue every few
hours) is what stamps save: a file hashed equal to its row is recorded with its (size, mtime,
ctime, inode) in `<where>/data_verified.json`, and a later start that finds the same four values
(for the same sha256) does not read it again; any rewrite, copy or `touch` changes ctime, so the
file is hashed again. (Bit rot under an unchanged inode is what `udean shards verify` reads for.)

Without staging the rows are split over the ranks (rank r checks rows r, r + world, ...; stamps in
train.out): no rank opens every shard. With `train.stage_dir` (e.g. `$SLURM_TMPDIR`,
`/local/scratch/$USER`; environment variables are expanded on each node) one rank per node
(local rank 0) copies the files into `<stage_dir>/udean-data-<digest>/` (the digest of the rows'
paths and hashes: two data sets never share a folder, two jobs of one data set share it safely),
hashing while it copies, and checks the copies already there by their stamps (kept in that
folder): a copy that does not match is fetched again. Every rank then reads from its node's copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from hpc.atomic import OutputError, atomic_path, atomic_write_text, check_free_space, file_mismatch

STAMPS = "data_verified.json"


def _stat(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def load_stamps(folder: Path, root: Path) -> dict[str, list]:
    """The stamps in `folder` of the files under `root` ({} when there are none, or they are of
    another root or unreadable: every file is hashed then)."""
    try:
        d = json.loads((folder / STAMPS).read_text())
        return d["files"] if d.get("root") == str(root) and isinstance(d.get("files"), dict) else {}
    except (OSError, ValueError, AttributeError, KeyError):
        return {}


def save_stamps(folder: Path, root: Path, stamps: dict[str, list]) -> None:
    atomic_write_text(folder / STAMPS, json.dumps({"root": str(root), "files": stamps}, sort_keys=True))


@dataclass
class Checked:
    """What one rank's check (or one node's staging) found."""

    problems: list[str] = field(default_factory=list)  # one line per file that does not match its row
    stamps: dict[str, list] = field(default_factory=dict)  # of the files that match
    hashed: int = 0  # files read and hashed (the others matched their stamps)
    fetched: list[str] = field(default_factory=list)  # staging: files copied from the data folder
    refetched: list[str] = field(default_factory=list)  # staging: copies there that did not match
    bytes_fetched: int = 0
    seconds: float = 0.0


def check(rows: Iterable, root: Path, stamps: dict[str, list]) -> Checked:
    """Each row's file under `root` against its size and sha256, skipping the files whose stamp
    is still right."""
    t0 = time.perf_counter()
    out = Checked()
    for r in rows:
        p = root / r.path
        try:
            key = _stat(p) + [r.sha256]
        except FileNotFoundError:
            out.problems.append(f"{p}: missing")
            continue
        if stamps.get(r.path) == key:
            out.stamps[r.path] = key
            continue
        out.hashed += 1
        why = file_mismatch(p, r.bytes, r.sha256)
        if why:
            out.problems.append(f"{p}: {why}")
        else:
            out.stamps[r.path] = key  # the stat from before the read: a change during it shows next time
    out.seconds = time.perf_counter() - t0
    return out


class _Differs(Exception):
    pass


def _fetch(src: Path, dst: Path, size: int, sha256: str) -> None:
    """Copy `src` to `dst` atomically, hashing the bytes as they pass; _Differs (and nothing at
    `dst`) when they are not the row's. OSError: `src` cannot be read; OutputError: `dst` cannot
    be written."""
    with open(src, "rb") as fi:
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(dst.parent, exc) from exc
        check_free_space(dst, size)
        h, n = hashlib.sha256(), 0
        with atomic_path(dst) as tmp:
            with open(tmp, "wb") as fo:
                while chunk := fi.read(1 << 22):
                    h.update(chunk)
                    fo.write(chunk)
                    n += len(chunk)
            if n != size or h.hexdigest() != sha256:
                raise _Differs(f"{n} bytes, expected {size}" if n != size else "sha256 differs from the manifest's")


def stage_root(stage_dir: str, rows: Iterable) -> Path:
    """`<stage_dir, variables expanded>/udean-data-<digest of the rows' paths and hashes>`;
    ValueError when a variable in it is not set here."""
    expanded = os.path.expandvars(os.path.expanduser(stage_dir))
    if "$" in expanded:
        raise ValueError(f"train.stage_dir={stage_dir!r}: {expanded!r} still names an environment variable "
                         f"that is not set on {socket.gethostname()}")
    digest = hashlib.sha256(json.dumps(sorted((r.path, r.sha256) for r in rows)).encode()).hexdigest()
    return Path(expanded).absolute() / f"udean-data-{digest[:16]}"


def stage(rows: list, data: Path, root: Path) -> Checked:
    """Make `root` hold every row's file as the manifest says: the copies there checked (by
    their stamps, else hashed), the missing and wrong ones fetched from `data`. Problems: files
    of `data` that cannot be read or do not match their row. OutputError when `root` cannot be
    written (a full local disk)."""
    t0 = time.perf_counter()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(root, exc) from exc
    out = check(rows, root, load_stamps(root, root))
    out.problems = []  # of the copies: those are fetched again below
    for r in rows:
        if r.path in out.stamps:
            continue
        dst = root / r.path
        if dst.exists():
            out.refetched.append(r.path)
        try:
            _fetch(data / r.path, dst, r.bytes, r.sha256)
        except _Differs as exc:
            out.problems.append(f"{data / r.path}: {exc}")
            continue
        except OSError as exc:
            out.problems.append(f"{data / r.path}: {exc.strerror or exc}")
            continue
        out.fetched.append(r.path)
        out.bytes_fetched += r.bytes
        out.stamps[r.path] = _stat(dst) + [r.sha256]
    save_stamps(root, root, out.stamps)
    out.seconds = time.perf_counter() - t0
    return out
