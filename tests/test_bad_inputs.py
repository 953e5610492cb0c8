"""The bad-input table (issue 18): for each command, inputs made here that a demanding user or a
hostile one could hand it, and what must come back: the documented exit code (README
"Command line", udean.cli.EXIT_CODES) and one clear line naming the problem, never a traceback.

Rows that fail before any process group (config values, preprocess, shards, infer) run
`udean.cli.main` in this process; the training rows that need `hpc.dist.init` run `udean train`
as a child. Per-subject problems of `udean preprocess` fail that subject alone (exit 1) and the
error is in its manifest row."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from preprocessing.discover import HCP_T1W
from preprocessing.manifest import load_manifest
from tests.preprocessing.test_nifti import save, smooth_volume, write_bad_inputs

BIN = Path(sys.executable).parent
SHAPE = (40, 36, 32)
SPLIT = ["data.split.preset=counts", "data.split.counts=[0,2,0,0]"]  # two target subjects: one good, one bad


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def _one_line(err: str, text: str) -> None:
    """Exactly one error line, holding `text`; no traceback anywhere."""
    assert "Traceback" not in err, err[-3000:]
    lines = _error_lines(err)
    assert len(lines) == 1 and text in lines[0], err[-3000:]


def _main(args: list[str], capsys) -> tuple[int, str]:
    from udean.cli import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


# --------------------------------------------------------------------------- preprocess
def _cohort(root: Path) -> Path:
    save(root / HCP_T1W.format(subject="good"), smooth_volume(SHAPE, 1))
    return root


def _nifti(kind: str) -> Callable[[Path], str]:
    def make(root: Path) -> str:
        write_bad_inputs(root / "_bad", lambda k: f"{k}.nii.gz")
        target = root / HCP_T1W.format(subject="bad")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(root / "_bad" / f"{kind}.nii.gz", target)
        shutil.rmtree(root / "_bad")
        return "bad"
    return make


def _spaced(root: Path) -> str:
    save(root / HCP_T1W.format(subject="a b"), smooth_volume(SHAPE, 2))
    return "a b"


def _loop(root: Path) -> str:
    (root / "loop").symlink_to(root / "loop")
    return "loop"


def _loop_file(root: Path) -> str:
    target = root / HCP_T1W.format(subject="linked")
    target.parent.mkdir(parents=True)
    target.symlink_to(target)
    return "linked"


SUBJECT_ROWS = {  # one bad subject beside a good one: that subject fails, the job exits 1
    "truncated gzip": (_nifti("truncgz"), "truncated or corrupt gzip"),
    "not NIfTI": (_nifti("notnifti"), "not a NIfTI"),
    "4D": (_nifti("fourd"), "expected a 3D image, got 4D"),
    "NaN voxels": (_nifti("nan"), "NaN/Inf"),
    "wrong voxel size": (_nifti("voxel"), "voxel size (1 x 1 x 1) mm, expected 0.7"),
    "folder name with a space": (_spaced, "not usable as a file name"),
    "subject folder is a symlink loop": (_loop, "symlink loop"),
    "T1w file is a symlink loop": (_loop_file, "symlink loop"),
}


@pytest.mark.parametrize("row", SUBJECT_ROWS, ids=list(SUBJECT_ROWS))
def test_preprocess_a_bad_subject_fails_alone(tmp_path, capsys, row):
    make, text = SUBJECT_ROWS[row]
    root = _cohort(tmp_path / "cohort")
    bad = make(root)
    rc, err = _main(["preprocess", "--config", "tiny", "--data-root", root, "--out", tmp_path / "out",
                     "--no-progress", *SPLIT], capsys)
    rows = {r.id: r for r in load_manifest(tmp_path / "out").subjects}
    assert rc == 1 and rows[bad].status == "failed" and text in rows[bad].error, (rc, rows[bad], err[-2000:])
    assert rows["good"].status == "ok" and "Traceback" not in err
    assert "1 of 2 subjects failed" in " ".join(err.split())


PREPROCESS_USER_ERRORS = {
    "data root missing": (lambda t: ["--data-root", t / "nowhere"], "is not a folder"),
    "lr_size too small": (lambda t: ["data.patches.lr_size=[2,2]"], "lr_size entries must be >= 4"),
    "voxel size nan": (lambda t: ["data.voxel_size_mm=.nan"], "finite number"),
    "scale not x2": (lambda t: ["data.degradation.scale=[2,2,1]"], "scale must be [2, 2, 2]"),
    "split larger than the cohort": (lambda t: ["data.split.counts=[5,5,5,5]"], "asks for 20 subjects"),
}


@pytest.mark.parametrize("row", PREPROCESS_USER_ERRORS, ids=list(PREPROCESS_USER_ERRORS))
def test_preprocess_user_errors_are_one_line_exit_2_and_create_nothing(tmp_path, capsys, row):
    extra, text = PREPROCESS_USER_ERRORS[row]
    root = _cohort(tmp_path / "cohort")
    rc, err = _main(["preprocess", "--config", "tiny", "--data-root", root, "--out", tmp_path / "out", "--no-progress",
                     "data.split.preset=counts", *extra(tmp_path)], capsys)
    assert rc == 2
    _one_line(err, text)
    assert not (tmp_path / "out").exists()  # checked before any folder is made


# --------------------------------------------------------------------------- manifests
@pytest.fixture(scope="module")
def data_set(tmp_path_factory) -> Path:
    """A small preprocessed data set (read-only: tests copy it)."""
    from udean.cli import main

    tmp = tmp_path_factory.mktemp("bad_inputs")
    root = tmp / "cohort"
    for k in range(6):
        save(root / HCP_T1W.format(subject=f"s{k}"), smooth_volume((48, 48, 40), k))
    assert main(["preprocess", "--config", "tiny", "--data-root", str(root), "--out", str(tmp / "data"),
                 "--no-progress"]) == 0
    return tmp / "data"


def _edit_manifest(data: Path, edit: Callable[[dict, Path], None]) -> None:
    d = json.loads((data / "manifest.json").read_text())
    edit(d, data)
    (data / "manifest.json").write_text(json.dumps(d))


def _escape_by_symlink(d: dict, data: Path) -> None:
    (data / "shards" / "out").symlink_to("/etc")
    d["shards"][0]["path"] = "shards/out/hostname"


def _no_source(d: dict, data: Path) -> None:
    d["shards"] = [s for s in d["shards"] if s["group"] != "source"]
    for s in d["subjects"]:
        if s["group"] == "source":
            s.update(status="failed", error="made up", shards={})


def _flip_a_byte(d: dict, data: Path) -> None:
    victim = data / next(s["path"] for s in d["shards"] if s["group"] == "target")
    b = bytearray(victim.read_bytes())
    b[len(b) // 2] ^= 1
    victim.write_bytes(bytes(b))


MANIFEST_ROWS = {  # -> (edit, verify's exit code and text, train's exit code and text)
    "absolute shard path": (lambda d, _: d["shards"][0].update(path="/etc/hostname"),
                            (2, "must be relative"), (2, "must be relative")),
    "../ shard path": (lambda d, _: d["shards"][0].update(path="../../x.h5"),
                       (2, "without '..'"), (2, "without '..'")),
    "../ in a subject's shards": (lambda d, _: d["subjects"][0]["shards"].update(target="../x.h5"),
                                  (2, "without '..'"), (2, "without '..'")),
    "symlink out of the folder": (_escape_by_symlink, (2, "leads outside the data folder"),
                                  (2, "leads outside the data folder")),
    "no source shards": (_no_source, (1, "failed in preprocessing"), (2, "no source shards to train on")),
    "a shard changed": (_flip_a_byte, (1, "sha256 differs"), (2, "do not match the manifest")),
}


@pytest.mark.parametrize("row", MANIFEST_ROWS, ids=list(MANIFEST_ROWS))
def test_shards_verify_and_train_refuse_a_bad_manifest(data_set, tmp_path, capsys, row):
    edit, (v_rc, v_text), (t_rc, t_text) = MANIFEST_ROWS[row]
    data = tmp_path / "data"
    shutil.copytree(data_set, data, symlinks=True)
    _edit_manifest(data, edit)
    rc, err = _main(["shards", "verify", data], capsys)
    assert rc == v_rc and v_text in " ".join(err.split()) and "Traceback" not in err, err[-2000:]
    if v_rc == 2:
        _one_line(err, v_text)
    r = subprocess.run([BIN / "udean", "train", "--config", "tiny", f"data.out={data}", f"train.out={tmp_path / 'run'}"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"})
    assert r.returncode == t_rc, r.stderr[-3000:]
    _one_line(r.stderr, t_text)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- train
TRAIN_CONFIG_ROWS = {
    "lr inf": ("train.lr=inf", "train.lr"), "lr nan": ("train.lr=.nan", "train.lr"),
    "lr_min inf": ("train.lr_min=.inf", "train.lr_min"), "batch size 0": ("train.batch_size=0", "train.batch_size"),
    "betas out of range": ("train.betas=[0.9,1.5]", "betas must be in [0, 1)"),
    "unknown key": ("train.lrr=1", "allowed keys here"), "not YAML": ("train.lr=[1,", "not valid YAML"),
}


@pytest.mark.parametrize("row", TRAIN_CONFIG_ROWS, ids=list(TRAIN_CONFIG_ROWS))
def test_train_bad_config_values_are_one_line_exit_2(tmp_path, capsys, row):
    override, text = TRAIN_CONFIG_ROWS[row]
    rc, err = _main(["train", "--config", "tiny", f"train.out={tmp_path / 'run'}", override], capsys)
    assert rc == 2
    _one_line(err, text)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- infer
def _run_dir(tmp_path: Path) -> Path:
    import torch

    from udean.checkpoint import save_best
    from udean.config import load, save as save_config
    from udean.models.udean import build, inference_state_dict

    cfg = load("tiny")
    torch.manual_seed(0)
    gen, _ = build(cfg.model, cfg.data.patches.slab)
    run = tmp_path / "run"
    save_best(run, inference_state_dict(gen), {"psnr": 0.0})
    save_config(cfg, run / "best" / "config.yaml")
    return run


class Planted:
    """A pickle that runs code when unpickled (the attack weights_only=True refuses)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile(run: Path, tmp_path: Path) -> None:
    import torch

    torch.save({"weights": Planted(tmp_path / "pwned")}, run / "best" / "generator.pt")


def _truncated(run: Path, tmp_path: Path) -> None:
    p = run / "best" / "generator.pt"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


def _garbage(run: Path, tmp_path: Path) -> None:
    (run / "best" / "generator.pt").write_bytes(b"not a checkpoint at all" * 10)


def _width(run: Path, tmp_path: Path) -> None:
    from udean.config import load, save as save_config

    save_config(load("tiny", ["model.features=12"]), run / "best" / "config.yaml")


def _lr(kind: str) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        write_bad_inputs(tmp_path / "lr", lambda k: f"{k}.nii.gz", voxel=1.4)  # on the tiny config's LR grid
        return tmp_path / "lr" / f"{kind}.nii.gz"
    return make


def _good_lr(tmp_path: Path) -> Path:
    return save(tmp_path / "lr.nii.gz", smooth_volume((12, 40, 40), 3), voxel=1.4)


INFER_ROWS = {  # -> (break the checkpoint, make the LR input, text)
    "hostile pickle in generator.pt": (_hostile, _good_lr, "pickled objects other than tensors"),
    "truncated generator.pt": (_truncated, _good_lr, "truncated, or not a torch checkpoint"),
    "garbage generator.pt": (_garbage, _good_lr, "cannot be loaded as weights"),
    "weights narrower than the config": (_width, _good_lr, "do not fit the model its config describes"),
    "LR not NIfTI": (None, _lr("notnifti"), "not a NIfTI"),
    "LR truncated gzip": (None, _lr("truncgz"), "truncated or corrupt gzip"),
    "LR 4D": (None, _lr("fourd"), "expected a 3D image"),
    "LR NaN": (None, _lr("nan"), "NaN/Inf"),
    "LR missing": (None, lambda t: t / "missing.nii.gz", "missing"),
}


@pytest.mark.parametrize("row", INFER_ROWS, ids=list(INFER_ROWS))
def test_infer_bad_checkpoints_and_inputs_are_one_line_exit_2(tmp_path, capsys, row):
    damage, make_lr, text = INFER_ROWS[row]
    run = _run_dir(tmp_path)
    if damage:
        damage(run, tmp_path)
    lr = make_lr(tmp_path)
    rc, err = _main(["infer", "--checkpoint", run, lr, tmp_path / "sr.nii.gz", "--device", "cpu"], capsys)
    assert rc == 2
    _one_line(err, text)
    assert not (tmp_path / "sr.nii.gz").exists() and not (tmp_path / "pwned").exists()
    if damage in (_hostile, _truncated, _garbage):
        assert str(run / "best" / "generator.pt") in err


def test_the_good_checkpoint_and_input_of_the_table_work(tmp_path, capsys):
    """The table's baseline: without the damage the same command succeeds."""
    run = _run_dir(tmp_path)
    rc, err = _main(["infer", "--checkpoint", run, _good_lr(tmp_path), tmp_path / "sr.nii.gz", "--device", "cpu"], capsys)
    assert rc == 0, err[-2000:]
    assert np.isfinite(__import__("nibabel").load(tmp_path / "sr.nii.gz").get_fdata()).all()
