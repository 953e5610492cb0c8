"""The grid plan of own data (preprocessing/plan.py): the grid comes from the scans, not from
HCP's 0.7 mm; an LR folder that is not about 2x the HR is refused before any work; `--plan`
shows what every scan gets and writes nothing; `--voxel-size` still decides when given."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from preprocessing import geometry
from preprocessing.config import DataConfig, OwnDataConfig
from preprocessing.discover import plan as discover
from preprocessing.plan import planned_voxel, resolve
from tests.preprocessing.test_roles import write_scan
from tests.udean.test_own_data import cli


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """HR scans at 1 mm (one at 1.2 mm, one 1 x 1 x 1.5), LR at 2 mm, one LR with 6 mm slices."""
    root = tmp_path_factory.mktemp("plan")
    for i in range(3):
        write_scan(root / "hr" / f"h{i}.nii.gz", (40, 44, 36), 1.0, seed=i)
    write_scan(root / "hr" / "h_12.nii.gz", (34, 36, 30), 1.2)
    write_scan(root / "hr" / "h_aniso.nii.gz", (40, 44, 24), (1.0, 1.0, 1.5))
    for i in range(3):
        write_scan(root / "lr" / f"l{i}.nii.gz", (20, 22, 18), 2.0, lr=True, seed=i)
    write_scan(root / "lr" / "thick.nii.gz", (20, 22, 6), (2.0, 2.0, 6.0), lr=True)
    for i in range(2):
        write_scan(root / "lr3" / f"c{i}.nii.gz", (14, 15, 12), 3.0, lr=True, seed=i)
    return root


def own(root: Path, lr: str = "lr", **kw) -> DataConfig:
    return DataConfig(out=str(root / "out"), own=OwnDataConfig(hr=str(root / "hr"), lr=str(root / lr), **kw))


def test_the_hr_grid_is_the_median_finest_voxel_and_lr_twice_it():
    v = [np.array(x, float) for x in ([1, 1, 1], [1, 1, 1], [1.2, 1.2, 1.2], [1, 1, 1.5], [0.9, 0.9, 3.0])]
    assert planned_voxel(v, [np.array([2.0, 2, 2]), np.array([2.2, 2.2, 5])], "hr", "lr") == 1.0
    with pytest.raises(ValueError, match=r"median voxel 3 mm\) are 3.00x .*median 1 mm.*--voxel-size 1.5 .*"
                                         r"--voxel-size 1 \(HR kept, LR resampled to 2 mm\)"):
        planned_voxel(v, [np.array([3.0, 3, 3])], "hr", "lr")
    with pytest.raises(ValueError, match="0.50x"):  # HR and LR folders swapped
        planned_voxel([np.array([2.0, 2, 2])], [np.array([1.0, 1, 1])], "hr", "lr")


def test_own_data_takes_its_grid_from_the_scans(scans):
    cfg, plan = resolve(*(lambda c: (c, discover(c)))(own(scans)))
    assert cfg.voxel_size_mm == 1.0 and plan.lr_voxel == 2.0 and "planned from the 5 HR scans" in plan.how
    gets = {s.subject: s.gets for s in plan.scans}
    assert gets == {"h0": "kept", "h1": "kept", "h2": "kept", "h_12": "resampled", "h_aniso": "resampled",
                    "l0": "kept", "l1": "kept", "l2": "kept", "thick": "refused"}
    thick = next(s for s in plan.scans if s.subject == "thick")
    assert "raise data.own.max_resample to 3" in thick.why  # how to let it through
    # --voxel-size decides when given (data.own.grid=voxel_size): 0.7 mm, as HCP
    given = own(scans, grid="voxel_size").model_copy(update={"voxel_size_mm": 0.7})
    cfg, plan = resolve(given, discover(given))
    gets = {s.subject: s.gets for s in plan.scans}
    assert cfg.voxel_size_mm == 0.7 and gets["h0"] == "resampled" and gets["h_12"] == gets["h_aniso"] == "refused"


def test_plan_prints_what_every_scan_gets_and_writes_nothing(scans, capsys):
    rc, out = cli(["preprocess", "--config", "tiny", "--hr", "hr", "--lr", "lr", "--out", "data", "--plan"], scans,
                  capsys)
    assert rc == 0, out
    assert "HR grid 1 mm, LR grid 2 mm (planned from the 5 HR scans" in out
    assert "hr/h_12.nii.gz 1.2 x 1.2 x 1.2 resampled: 1.2 x 1.2 x 1.2 -> 1 mm" in out
    assert "lr/l0.nii.gz 2 x 2 x 2 kept" in out and "lr/thick.nii.gz 2 x 2 x 6 refused" in out
    assert "99.5th (head) -> 1" in out  # the intensity scaling
    assert not (scans / "data").exists()
    rc, out = cli(["preprocess", "--config", "tiny", "--hr", "hr", "--lr", "lr", "--out", "data", "--plan",
                   "--voxel-size", "0.7"], scans, capsys)
    assert rc == 0 and "HR grid 0.7 mm, LR grid 1.4 mm (--voxel-size" in out, out


def test_an_lr_folder_not_twice_the_hr_is_refused_before_any_work(scans, capsys):
    rc, out = cli(["preprocess", "--config", "tiny", "--hr", "hr", "--lr", "lr3", "--out", "data3", "--no-progress"],
                  scans, capsys)
    assert rc == 2 and "Traceback" not in out, out
    assert f"the LR scans in {scans / 'lr3'} (median voxel 3 mm) are 3.00x the HR scans" in out
    assert "pass --voxel-size 1.5" in out and not (scans / "data3").exists()


def test_a_refused_scan_is_told_how_to_be_allowed():
    with pytest.raises(ValueError, match=r"thick.nii: .*3.00x off the LR grid .*data.own.max_resample=3`"):
        geometry.check_voxels("thick.nii", [1.0, 1.0, 3.0], 1.0, 0.05, 1.5, "LR")


def test_tables_in_a_log_are_not_cut_at_80_columns(scans):
    """A batch log or pipe is no terminal: rich would cut every table at 80 columns there."""
    import subprocess

    from tests.conftest import BIN

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([str(BIN / "udean"), "preprocess", "--config", "tiny", "--hr", "hr", "--lr", "lr", "--out",
                          "data", "--plan"], cwd=scans, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if "h_aniso" in line)
    assert "hr/h_aniso.nii.gz" in row and "resampled: 1 x 1 x 1.5 -> 1 mm" in row and len(row) > 80
