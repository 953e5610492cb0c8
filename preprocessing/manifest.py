"""`<out>/manifest.json`: the one index of a preprocessed data set (docs/data-format.md).

    {"schema_version": 1, "config": <DataConfig as JSON>, "config_hash": DataConfig.hash(),
     "subjects": [SubjectRow, ...]   (sorted by id),
     "shards": [ShardRow, ...]       (sorted by path)}

`SubjectRow` and `ShardRow` are the schema: their fields, in order, are the JSON keys of a row.
Loading checks every row against them (a missing or unknown key is an error naming the file and
the row). Between two runs of the same config and inputs only `seconds` differs, and
`input_stat` (the input's size and mtime) where the inputs were copied. Written atomically by rank 0.

`<out>/manifest.journal` (JSON lines): what a preprocessing run finished since it wrote its plan,
one line per subject (its row and shard rows), appended by rank 0 as each subject is recorded
(O(1): the manifest itself is rewritten only every few seconds and at the end, when the journal is
removed). Its first line names the data config (`config_hash`); a journal of another config is
ignored. `load_manifest` folds a journal into the manifest (rows replaced by subject, in order), so
a job killed between two manifest writes loses only the subjects in flight; a torn last line (the
kill came mid-write) is dropped.

Every file path in a manifest must stay inside its folder: relative, no `..`, no symlink out of
it. A manifest naming `/etc/hostname` or `../x.h5` is refused on load (ValueError naming the
row), so neither `udean shards` nor training ever opens a file outside the data set.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc.atomic import OutputError, atomic_write_text

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = "manifest.journal"
VOLATILE_FIELDS = ("seconds", "input_stat")  # what may differ between runs of the same config and inputs


def manifest_path(out: str | os.PathLike) -> Path:
    return Path(out) / MANIFEST


def journal_path(out: str | os.PathLike) -> Path:
    return Path(out) / JOURNAL


class _Row:
    """JSON <-> row dataclass, strict about keys. Fields added after schema 1 (`ADDED`) are
    written only when set, so a manifest written before them rewrites byte for byte."""

    ADDED: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not (f.name in self.ADDED and getattr(self, f.name) is None)}

    @classmethod
    def from_dict(cls, d: Any, where: str):
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        unknown = sorted(set(d) - set(names))
        missing = [k for k in required if k not in d]
        if unknown or missing:
            raise ValueError(f"{where}: " + "; ".join(
                ([f"unknown keys {unknown}"] if unknown else []) + ([f"missing keys {missing}"] if missing else []))
                + f" (a {cls.__name__} has {names})")
        return cls(**d)


@dataclass
class ShardRow(_Row):
    """One file of the data set: a patch shard (kind lr / hr) or a val/test volume (kind volume)."""

    path: str  # relative to the data folder (a moved folder still resolves)
    group: str  # source | target | val | test
    subject: str
    kind: str  # lr | hr | volume
    sha256: str
    patches: int  # 0 for a volume
    bytes: int


@dataclass
class SubjectRow(_Row):
    """One subject: its group, its input, and what preprocessing made of it."""

    id: str
    group: str  # source | target | val | test | unused
    input: str  # the NIfTI it was read from
    status: str = "pending"  # ok | failed | pending (a run was interrupted)
    error: str | None = None  # why it failed
    shards: dict[str, str] = field(default_factory=dict)  # source / target / volume -> shard path
    patches: dict[str, int] = field(default_factory=lambda: {"lr": 0, "hr": 0})
    motion: dict[str, float] | None = None  # misaligned mode: the drawn motion (preprocessing.motion)
    seconds: float = 0.0
    input_stat: list[int] | None = None  # [bytes, mtime_ns] of `input` (and `lr_input`) when read: reuse needs them unchanged
    # own data (data.own): the acquired LR of a paired val/test subject; where its LR came from
    # ("acquired": an authentic scan, "synthetic": made from the HR); per scan ("hr" / "lr"):
    # voxel sizes and shapes in and out, resampled, intensity scaling (docs/data-format.md)
    lr_input: str | None = None
    lr_source: str | None = None
    scans: dict[str, dict] | None = None

    ADDED = ("input_stat", "lr_input", "lr_source", "scans")


@dataclass
class Manifest:
    out: Path
    config: dict[str, Any]
    config_hash: str
    subjects: list[SubjectRow] = field(default_factory=list)
    shards: list[ShardRow] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def shard_paths(self, group: str) -> list[Path]:
        """Patch shards of `group` ("source": HR patches, "target": LR patches), sorted."""
        if group not in ("source", "target"):
            raise ValueError(f"shard group {group!r}: allowed source, target (val/test: volume_paths)")
        return [self.out / s.path for s in self.shards if s.group == group and s.kind != "volume"]

    def volume_paths(self, group: str) -> list[Path]:
        """Whole-volume files of `group` ("val" / "test"), sorted."""
        if group not in ("val", "test"):
            raise ValueError(f"volume group {group!r}: allowed val, test")
        return [self.out / s.path for s in self.shards if s.group == group and s.kind == "volume"]

    def patch_count(self, group: str) -> int:
        """Patches in the shards of `group`, from the manifest (no file is opened)."""
        return sum(s.patches for s in self.shards if s.group == group and s.kind != "volume")

    def subject(self, sid: str) -> SubjectRow:
        for row in self.subjects:
            if row.id == sid:
                return row
        raise KeyError(sid)

    def failed(self) -> list[SubjectRow]:
        return [r for r in self.subjects if r.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "config": self.config, "config_hash": self.config_hash,
                "subjects": [r.to_dict() for r in self.subjects], "shards": [r.to_dict() for r in self.shards]}


class Inside:
    """`inside(rel, where)`: `rel` if it names a file inside `out` (relative, no `..`, no symlink
    leading out), else ValueError naming `where`. Each folder is resolved once and each file
    only looked at (one lstat) unless it is a symlink: resolving every path of the cohort's
    manifest (an lstat per path component, thousands of paths) was most of a load."""

    def __init__(self, out: str | os.PathLike):
        self.root = Path(out).resolve()
        self._seen: dict[str, str | None] = {}  # folder or file -> why it is not inside (None: it is)

    def _leads_out(self, path: Path) -> str | None:
        try:
            path.resolve().relative_to(self.root)
        except ValueError:
            return f"leads outside the data folder {self.root} (a symlink)"
        except RuntimeError:  # a symlink loop (older Pythons raise it from resolve)
            return "is a symlink loop"
        return None

    def _check(self, rel: str, folder: bool) -> str | None:
        if rel not in self._seen:
            parent = os.path.dirname(rel)
            why = self._check(parent, True) if parent else None
            if why is None and (folder or os.path.islink(os.path.join(self.root, rel))):
                why = self._leads_out(self.root / rel)
            self._seen[rel] = why
        return self._seen[rel]

    def __call__(self, rel: str, where: str) -> str:
        if not rel or rel.startswith("/") or "\\" in rel or ".." in rel.split("/"):
            raise ValueError(f"{where}: path {rel!r} must be relative to the data folder, without '..'")
        why = self._check(os.path.normpath(rel), False)
        if why:
            raise ValueError(f"{where}: path {rel!r} {why}")
        return rel


def load_manifest(out: str | os.PathLike) -> Manifest:
    """Read `<out>/manifest.json`; ValueError naming the file if it is missing or malformed."""
    path = manifest_path(out)
    if not path.is_file():
        raise ValueError(f"{path}: missing (run `udean preprocess --out {out}` first)")
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(d, dict) or d.get("schema_version") != SCHEMA_VERSION:
        got = d.get("schema_version") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: schema_version {got!r}, this reader knows {SCHEMA_VERSION}")
    missing = [k for k in ("config", "config_hash", "subjects", "shards") if k not in d]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    subjects = [SubjectRow.from_dict(r, f"{path}: subjects[{i}]") for i, r in enumerate(d["subjects"])]
    shards = [ShardRow.from_dict(r, f"{path}: shards[{i}]") for i, r in enumerate(d["shards"])]
    inside = Inside(out)
    for i, r in enumerate(shards):
        inside(r.path, f"{path}: shards[{i}]")
    for i, r in enumerate(subjects):
        for rel in r.shards.values():
            inside(rel, f"{path}: subjects[{i}] ({r.id})")
    m = Manifest(Path(out), d["config"], d["config_hash"], subjects, shards, d["schema_version"])
    entries = read_journal(out, m.config_hash, inside)
    if entries:
        subjects = {r.id: r for r in m.subjects}
        by_subject: dict[str, list[ShardRow]] = {}
        for s in m.shards:
            by_subject.setdefault(s.subject, []).append(s)
        for row, rows in entries:
            subjects[row.id], by_subject[row.id] = row, rows
        m.subjects = sorted(subjects.values(), key=lambda r: r.id)
        m.shards = sorted((s for rows in by_subject.values() for s in rows), key=lambda r: r.path)
    return m


def read_journal(out: str | os.PathLike, config_hash: str,
                 inside: Inside | None = None) -> list[tuple[SubjectRow, list[ShardRow]]]:
    """The (row, shard rows) lines of `<out>/manifest.journal` written under `config_hash`, in
    order; [] when there is none or it belongs to another config. A last line without its
    newline is a write a kill cut short: dropped. Any other bad line: ValueError naming it."""
    path = journal_path(out)
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    entries = []
    inside = inside or Inside(out)
    for i, line in enumerate(lines[:-1]):  # lines[-1]: b"" after the last newline, or a torn write
        where = f"{path}: line {i + 1}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from None
        if i == 0:
            if not isinstance(d, dict) or "config_hash" not in d:
                raise ValueError(f"{where}: expected the header {{\"journal\": 1, \"config_hash\": ...}}")
            if d["config_hash"] != config_hash:
                return []  # a run of another config began here and was killed before its plan was written
            continue
        if not isinstance(d, dict) or set(d) != {"subject", "shards"} or not isinstance(d["shards"], list):
            raise ValueError(f"{where}: expected {{\"subject\": {{...}}, \"shards\": [...]}}")
        row = SubjectRow.from_dict(d["subject"], f"{where}: subject")
        shards = [ShardRow.from_dict(r, f"{where}: shards[{k}]") for k, r in enumerate(d["shards"])]
        for k, r in enumerate(shards):
            inside(r.path, f"{where}: shards[{k}]")
        for rel in row.shards.values():
            inside(rel, f"{where}: subject ({row.id})")
        entries.append((row, shards))
    return entries


class Journal:
    """Appends finished subjects to `<out>/manifest.journal` (started empty, with its header):
    one write(2) per line on an O_APPEND descriptor held open, no rename, no fsync (a killed
    process loses nothing the kernel has; a lost node loses the last lines, whose subjects are
    redone). A failed write is `OutputError`."""

    def __init__(self, out: str | os.PathLike, config_hash: str):
        self.path = journal_path(out)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
        except OSError as exc:
            raise OutputError(self.path, exc) from exc
        self._write({"journal": 1, "config_hash": config_hash})

    def _write(self, d: dict[str, Any]) -> None:
        data = (json.dumps(d) + "\n").encode()
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except OSError as exc:
            raise OutputError(self.path, exc) from exc

    def append(self, row: SubjectRow, shards: list[ShardRow]) -> None:
        self._write({"subject": row.to_dict(), "shards": [s.to_dict() for s in shards]})

    def close(self, remove: bool = False) -> None:
        """Close it; `remove`: delete it too (the manifest just written holds every line)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if remove:
            self.path.unlink(missing_ok=True)


def write_manifest(m: Manifest) -> None:
    m.subjects = sorted(m.subjects, key=lambda r: r.id)
    m.shards = sorted(m.shards, key=lambda r: r.path)
    atomic_write_text(manifest_path(m.out), json.dumps(m.to_dict(), indent=1, sort_keys=False) + "\n")


def without_timing(d: dict[str, Any]) -> dict[str, Any]:
    """The manifest (as JSON) without `VOLATILE_FIELDS`: equal for equal config and inputs."""
    d = json.loads(json.dumps(d))
    for row in d.get("subjects", []):
        for k in VOLATILE_FIELDS:
            row.pop(k, None)
    return d
