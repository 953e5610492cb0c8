"""Subject discovery (HCP layouts and flat folders of NIfTI files) and the seeded split into
source / target / val / test (paper, II-C: 120 / 120 / 30 / 30)."""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocessing.config import DataConfig

# The HCP unprocessed T1w path of one subject, relative to the HCP root (paper, II-C).
HCP_T1W = "{subject}/unprocessed/3T/T1w_MPR1/{subject}_3T_T1w_MPR1.nii.gz"
# The minimally preprocessed alternative (`data.layout: hcp_acpc`).
HCP_T1W_ACPC = "{subject}/T1w/T1w_acpc_dc_restore.nii.gz"

TEMPLATES = {"hcp": HCP_T1W, "hcp_acpc": HCP_T1W_ACPC}


def hcp_files(root: str | Path, layout: str = "hcp") -> list[Path]:
    """The T1w files present under an HCP-layout `root` (one per subject), sorted."""
    return sorted(Path(root).glob(TEMPLATES[layout].format(subject="*")))
NIFTI_SUFFIXES = (".nii.gz", ".nii")
GROUPS = ("source", "target", "val", "test")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class Subject:
    id: str
    input: str  # path of the T1w NIfTI (may not exist: the subject then fails, "missing file")
    group: str = "unused"  # source | target | val | test | unused
    problem: str | None = None  # found at discovery (unusable id, symlink loop): the subject fails alone


def _path_problem(path: str) -> str | None:
    """A symlink loop on the way to `path`, said as such (is_file() would call it missing)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: symlink loop (too many levels of symbolic links)"
    return None


def _checked(sid: str, path: str) -> Subject:
    if not _SAFE_ID.match(sid):
        return Subject(sid, path, problem=f"{path}: subject id {sid!r} is not usable as a file name "
                                          "(allowed: letters, digits, '.', '_', '-'); rename it")
    return Subject(sid, path, problem=_path_problem(path))


def subject_id_of(path: Path) -> str:
    name = path.name
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return path.stem


def discover(root: str | Path, layout: str) -> list[Subject]:
    """Subjects under `root`, sorted by id.

    hcp / hcp_acpc: every non-hidden folder of `root` is a subject; its T1w path comes from the
    template whether or not the file exists, so a missing file is reported per subject.
    flat: every `*.nii` / `*.nii.gz` file directly in `root`; the id is the file name without
    the suffix. A subject whose id is not a safe file name or whose path is a symlink loop is
    kept with a `problem`: it fails alone, the others go on."""
    root = Path(root)
    if not str(root) or not root.is_dir():
        raise ValueError(f"data root {str(root)!r} is not a folder (set data.root or --data-root)")
    subjects: list[Subject] = []
    if layout in TEMPLATES:
        for d in sorted(root.iterdir()):
            if not d.name.startswith(".") and (d.is_dir() or _path_problem(str(d))):
                subjects.append(_checked(d.name, str(root / TEMPLATES[layout].format(subject=d.name))))
    elif layout == "flat":
        for f in sorted(root.iterdir()):
            if not f.name.startswith(".") and f.name.endswith(NIFTI_SUFFIXES) and not f.is_dir():
                subjects.append(_checked(subject_id_of(f), str(f)))
    else:
        raise ValueError(f"data.layout {layout!r}: allowed values hcp, hcp_acpc, flat")
    subjects.sort(key=lambda s: s.id)
    ids = [s.id for s in subjects]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"data root {root}: duplicate subject ids {dup[:5]} (e.g. both .nii and .nii.gz)")
    if not subjects:
        raise ValueError(f"data root {root}: no subjects found for layout {layout!r}")
    return subjects


def split_counts(cfg: DataConfig, n: int) -> tuple[int, int, int, int]:
    """(source, target, val, test) sizes for `n` subjects; misaligned mode has no separate source."""
    s = cfg.split
    if s.preset == "ratios":
        counts = tuple(int(np.floor(r * n + 1e-9)) for r in s.ratios)
    else:
        counts = tuple(int(c) for c in s.counts)
    if cfg.mode == "misaligned":
        counts = (0,) + counts[1:]  # source = target subjects, moved (II-C)
    if sum(counts) > n:
        raise ValueError(f"data.split: {s.preset} asks for {sum(counts)} subjects "
                         f"(source, target, val, test = {counts}) but {n} were found under data.root")
    return counts  # type: ignore[return-value]


def split(subjects: list[Subject], cfg: DataConfig) -> list[Subject]:
    """Assign groups from a permutation seeded by `data.split.seed`, filled in the order
    target, val, test, source, so target/val/test are the same subjects in both modes and the
    unpaired source is disjoint from all three. The rest are `unused` (still listed)."""
    n = len(subjects)
    n_src, n_tgt, n_val, n_test = split_counts(cfg, n)
    perm = np.random.default_rng(cfg.split.seed).permutation(n)
    order = ["target"] * n_tgt + ["val"] * n_val + ["test"] * n_test + ["source"] * n_src
    groups = ["unused"] * n
    for g, idx in zip(order, perm):
        groups[idx] = g
    return [Subject(s.id, s.input, g, s.problem) for s, g in zip(subjects, groups)]


def plan(cfg: DataConfig) -> list[Subject]:
    """discover -> subjects_limit -> split."""
    subjects = discover(cfg.root, cfg.layout)
    if cfg.subjects_limit:
        subjects = subjects[: cfg.subjects_limit]
    return split(subjects, cfg)
