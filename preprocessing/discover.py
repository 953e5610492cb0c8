"""Subject discovery and the split into source / target / val / test: HCP layouts and flat
folders by a seeded split (paper, II-C: 120 / 120 / 30 / 30), or your own scans by role
(`plan_own`: data.own, README "Your own data")."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from preprocessing.config import DataConfig

# The HCP unprocessed T1w path of one subject, relative to the HCP root (paper, II-C).
HCP_T1W = "{subject}/unprocessed/3T/T1w_MPR1/{subject}_3T_T1w_MPR1.nii.gz"
# The minimally preprocessed alternative (`data.layout: hcp_acpc`).
HCP_T1W_ACPC = "{subject}/T1w/T1w_acpc_dc_restore.nii.gz"

TEMPLATES = {"hcp": HCP_T1W, "hcp_acpc": HCP_T1W_ACPC}
# HCP's brain mask (FreeSurfer's, on the T1w_acpc_dc_restore grid); the synthetic cohorts write one
# on their scan's grid. Preprocessing uses it where its grid is the scan's (`brain_mask_file`).
HCP_BRAINMASK = "{subject}/T1w/brainmask_fs.nii.gz"


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
    # own data (plan_own): the acquired LR of a paired val/test subject
    lr_input: str | None = None
    lr_val: bool = False  # a target LR scan also written as an LR-only val volume
    # HCP layouts: the subject's T1w/brainmask_fs.nii.gz where it exists (val / test volumes store
    # it as their brain mask when it lies on the scan's grid: preprocessing.subject.brain_mask)
    brain: str | None = None
    # found unusable at discovery or while planning (unusable id, symlink loop, a name in two
    # roles, ...): the subject fails alone with this
    error: str | None = None


def _path_problem(path: str) -> str | None:
    """A symlink loop on the way to `path`, said as such (is_file() would call it missing)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path}: symlink loop (too many levels of symbolic links)"
    return None


def _id_problem(sid: str, path: str) -> str | None:
    """A subject id that cannot name the output files, said as such."""
    if _SAFE_ID.match(sid):
        return None
    return (f"{path}: subject id {sid!r} is not usable as a file name (allowed: letters, digits, '.', '_', '-'); "
            "rename it")


def _checked(sid: str, path: str) -> Subject:
    return Subject(sid, path, error=_id_problem(sid, path) or _path_problem(path))


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
    kept with an `error`: it fails alone, the others go on."""
    root = Path(root)
    if not str(root) or not root.is_dir():
        raise ValueError(f"data root {str(root)!r} is not a folder (set data.root or --data-root)")
    subjects: list[Subject] = []
    if layout in TEMPLATES:
        for d in sorted(root.iterdir()):
            if not d.name.startswith(".") and (d.is_dir() or _path_problem(str(d))):
                sub = _checked(d.name, str(root / TEMPLATES[layout].format(subject=d.name)))
                mask = root / HCP_BRAINMASK.format(subject=d.name)
                subjects.append(dataclasses.replace(sub, brain=str(mask)) if mask.is_file() else sub)
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
    return [dataclasses.replace(s, group=g) for s, g in zip(subjects, groups)]


def plan(cfg: DataConfig) -> list[Subject]:
    """discover -> subjects_limit -> split (own data: `plan_own`)."""
    if cfg.own.enabled:
        return plan_own(cfg)
    subjects = discover(cfg.root, cfg.layout)
    if cfg.subjects_limit:
        subjects = subjects[: cfg.subjects_limit]
    return split(subjects, cfg)


# --------------------------------------------------------------------------- own data by role
def nifti_files(folder: str | Path, key: str) -> list[Path]:
    """The `*.nii` / `*.nii.gz` files directly in `folder` (role `key`), sorted; ValueError
    naming the folder when it is missing or holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data.own.{key} {str(folder)!r} is not a folder")
    found = sorted(f for f in folder.iterdir()
                   if not f.name.startswith(".") and f.name.endswith(NIFTI_SUFFIXES) and not f.is_dir())
    if not found:
        raise ValueError(f"data.own.{key} {folder}: no NIfTI files (*.nii, *.nii.gz) in it")
    return found


def role_folders(cfg: DataConfig) -> dict[str, str]:
    """Role -> folder: data.own.hr, .lr, ... or, with data.own.dataset, the dataset.json's
    `{"hr": "hr/", "lr": "lr/", "test_hr": ..., ...}` (paths relative to the file)."""
    from preprocessing.config import ROLE_KEYS, OwnDataConfig

    own = cfg.own
    if not own.dataset:
        return {k: getattr(own, k) for k in ROLE_KEYS if getattr(own, k)}
    path = Path(own.dataset)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable dataset.json ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected an object naming the roles {', '.join(ROLE_KEYS)}")
    roles = {k: v for k, v in d.items() if k in ROLE_KEYS}
    bad = [k for k, v in roles.items() if not isinstance(v, str) or not v]
    if bad:
        raise ValueError(f"{path}: role(s) {bad} must name a folder")
    try:  # the same rules as the config keys (hr with lr, val_hr with val_lr, ...)
        OwnDataConfig(**roles)
    except ValidationError as exc:
        raise ValueError(f"{path}: " + "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
    return {k: str((path.parent / v)) for k, v in roles.items()}


def plan_own(cfg: DataConfig) -> list[Subject]:
    """Own data by role: every file of `hr` -> source, of `lr` -> target (used as acquired),
    paired `val_*` / `test_*` folders -> val / test (HR and LR matched by file name); a group
    without paired folders gets `held_out` HR scans of `hr` (seeded by data.split.seed) with
    synthetic LR, and the first `lr_val` target scans are also LR-only val volumes.

    A folder that is missing or empty is an error for the whole job; a file is one subject,
    and a bad one fails alone: a name used in two roles, a pair without its partner, a name
    that cannot be a file name."""
    own = cfg.own
    folders = role_folders(cfg)
    files = {k: nifti_files(v, k) for k, v in folders.items()}
    seen: dict[Path, str] = {}
    for k, v in folders.items():
        real = Path(v).resolve()
        if real in seen:
            raise ValueError(f"data.own.{seen[real]} and data.own.{k} are the same folder {v}: HR and LR scans "
                             "go in separate folders")
        seen[real] = k
    by_name = {k: {subject_id_of(f): f for f in v} for k, v in files.items()}
    subjects: list[Subject] = []
    hr = sorted(by_name["hr"])
    held = {}
    n_val, n_test = (0 if "val_hr" in folders else own.held_out[0]), (0 if "test_hr" in folders else own.held_out[1])
    if n_val + n_test >= len(hr):
        raise ValueError(f"data.own.held_out: {n_val} val + {n_test} test HR scans held out of the {len(hr)} in "
                         f"{folders['hr']} leave none for training (lower data.own.held_out, or give paired folders)")
    perm = np.random.default_rng(cfg.split.seed).permutation(len(hr))
    for k, i in enumerate(perm[:n_val + n_test]):
        held[hr[i]] = "val" if k < n_val else "test"
    for sid in hr:
        subjects.append(Subject(sid, str(by_name["hr"][sid]), held.get(sid, "source")))
    lr = sorted(by_name["lr"])
    lr_val = set(lr[i] for i in np.random.default_rng(cfg.split.seed).permutation(len(lr))[:own.lr_val])
    for sid in lr:
        subjects.append(Subject(sid, str(by_name["lr"][sid]), "target", lr_val=sid in lr_val))
    for g in ("val", "test"):
        if f"{g}_hr" not in folders:
            continue
        his, los = by_name[f"{g}_hr"], by_name[f"{g}_lr"]
        for sid in sorted(set(his) | set(los)):
            if sid in his and sid in los:
                subjects.append(Subject(sid, str(his[sid]), g, lr_input=str(los[sid])))
            else:
                have, miss = (f"{g}_hr", f"{g}_lr") if sid in his else (f"{g}_lr", f"{g}_hr")
                path = (his if sid in his else los)[sid]
                subjects.append(Subject(sid, str(path), g, error=f"{path}: no file named {sid} in data.own.{miss} "
                                        f"{folders[miss]} (paired {g} scans are matched by file name)"))
    return _unique(subjects)


def _unique(subjects: list[Subject]) -> list[Subject]:
    """One subject per id, sorted: a name in two roles, or not usable as a file name, becomes
    one failed subject naming its files."""
    out: dict[str, Subject] = {}
    for s in subjects:
        if s.id in out:
            first = out[s.id]
            out[s.id] = Subject(s.id, first.input, first.group, error=(
                f"{first.input}: subject name {s.id!r} is also {s.input} ({s.group}); names must be unique across "
                "roles (rename one of the files)"))
        elif problem := _id_problem(s.id, s.input):
            out[s.id] = Subject(s.id, s.input, s.group, error=problem)
        else:
            out[s.id] = s
    return [out[k] for k in sorted(out)]
