"""`<out>/manifest.json`: the one index of a preprocessed data set (DESIGN, "Data on disk").

    {"schema_version": 1, "config": <DataConfig as JSON>, "config_hash": DataConfig.hash(),
     "subjects": [{"id", "group", "input", "status", "error", "shards", "patches", "motion",
                   "seconds"}, ...]   (sorted by id),
     "shards": [{"path", "group", "subject", "kind", "sha256", "patches", "bytes"}, ...]
                   (sorted by path)}

Only `seconds` differs between two runs of the same config. Written atomically by rank 0.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpc.atomic import atomic_write_text

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TIMING_FIELDS = ("seconds",)


def manifest_path(out: str | os.PathLike) -> Path:
    return Path(out) / MANIFEST


@dataclass
class Manifest:
    out: Path
    config: dict[str, Any]
    config_hash: str
    subjects: list[dict[str, Any]] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def shard_paths(self, group: str) -> list[Path]:
        """Patch shards of `group` ("source": HR patches, "target": LR patches), sorted."""
        if group not in ("source", "target"):
            raise ValueError(f"shard group {group!r}: allowed source, target (val/test: volume_paths)")
        return [self.out / s["path"] for s in self.shards if s["group"] == group and s["kind"] != "volume"]

    def volume_paths(self, group: str) -> list[Path]:
        """Whole-volume files of `group` ("val" / "test"), sorted."""
        if group not in ("val", "test"):
            raise ValueError(f"volume group {group!r}: allowed val, test")
        return [self.out / s["path"] for s in self.shards if s["group"] == group and s["kind"] == "volume"]

    def subject(self, sid: str) -> dict[str, Any]:
        for row in self.subjects:
            if row["id"] == sid:
                return row
        raise KeyError(sid)

    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.subjects if r["status"] == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, "config": self.config, "config_hash": self.config_hash,
                "subjects": self.subjects, "shards": self.shards}


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
    return Manifest(Path(out), d["config"], d["config_hash"], d["subjects"], d["shards"], d["schema_version"])


def write_manifest(m: Manifest) -> None:
    m.subjects = sorted(m.subjects, key=lambda r: r["id"])
    m.shards = sorted(m.shards, key=lambda r: r["path"])
    atomic_write_text(manifest_path(m.out), json.dumps(m.to_dict(), indent=1, sort_keys=False) + "\n")


def without_timing(d: dict[str, Any]) -> dict[str, Any]:
    """The manifest with timing fields removed: equal for equal config and inputs."""
    d = json.loads(json.dumps(d))
    for row in d.get("subjects", []):
        for k in TIMING_FIELDS:
            row.pop(k, None)
    return d
