"""Discovery (HCP, HCP acpc, flat) and the seeded split."""
from pathlib import Path

import pytest

from preprocessing.config import DataConfig, SplitConfig
from preprocessing.discover import HCP_T1W, HCP_T1W_ACPC, discover, plan


def make_hcp(root: Path, ids, template=HCP_T1W):
    for sid in ids:
        p = root / template.format(subject=sid)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def ids(n):
    return [str(100000 + 7 * i) for i in range(n)]


def test_hcp_layouts_and_missing_file(tmp_path):
    make_hcp(tmp_path, ids(3))
    (tmp_path / "999999").mkdir()  # subject folder without its T1w: discovered, fails later
    subs = discover(tmp_path, "hcp")
    assert [s.id for s in subs] == sorted(ids(3) + ["999999"])
    assert subs[0].input == str(tmp_path / HCP_T1W.format(subject=subs[0].id))
    make_hcp(tmp_path, ids(2), HCP_T1W_ACPC)
    assert discover(tmp_path, "hcp_acpc")[0].input.endswith("T1w/T1w_acpc_dc_restore.nii.gz")


def test_flat(tmp_path):
    for name in ["b.nii.gz", "a.nii", "notes.txt", ".hidden.nii"]:
        (tmp_path / name).write_bytes(b"x")
    assert [s.id for s in discover(tmp_path, "flat")] == ["a", "b"]
    with pytest.raises(ValueError, match="no subjects"):
        discover(tmp_path / "x", "flat") if False else discover(tmp_path, "hcp")
    with pytest.raises(ValueError, match="not a folder"):
        discover(tmp_path / "missing", "flat")


def test_paper_split_all_hcp_subjects(tmp_path):
    make_hcp(tmp_path, ids(1113))
    cfg = DataConfig(root=str(tmp_path))
    subs = plan(cfg)
    groups = [s.group for s in subs]
    assert len(subs) == 1113
    assert (groups.count("source"), groups.count("target"), groups.count("val"), groups.count("test")) == (120, 120, 30, 30)
    assert groups.count("unused") == 1113 - 300
    assert [s.group for s in plan(cfg)] == groups  # reproducible
    other = [s.group for s in plan(DataConfig(root=str(tmp_path), split=SplitConfig(seed=1)))]
    assert other != groups
    # misaligned: same target / val / test subjects, no separate source
    mis = [s.group for s in plan(DataConfig(root=str(tmp_path), mode="misaligned"))]
    assert mis.count("source") == 0
    assert all(m == g for m, g in zip(mis, groups) if g in ("target", "val", "test"))


def test_ratios_and_too_few(tmp_path):
    make_hcp(tmp_path, ids(20))
    cfg = DataConfig(root=str(tmp_path), split=SplitConfig(preset="ratios", ratios=(0.5, 0.25, 0.1, 0.1)))
    groups = [s.group for s in plan(cfg)]
    assert (groups.count("source"), groups.count("target"), groups.count("val"), groups.count("test")) == (10, 5, 2, 2)
    with pytest.raises(ValueError, match="asks for 300 subjects"):
        plan(DataConfig(root=str(tmp_path)))
