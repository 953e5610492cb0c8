"""What training reads at start (udean/data/stage.py, udean.train.check_data): shard sizes from the
manifest, every file checked against its row (hashed once, then by its stamp), a shard changed
under a resumed run caught, node-local staging with a corrupted copy fetched again; readers that
keep few shards open. Real `udean train` processes on the tiny shards."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.udean.conftest import write_tiny_shards
from tests.udean.test_train import rows, run_cmd, train_cmd
from udean.data.shards import PatchShards

RUN = ["train.steps_per_epoch=2", "train.val_every=0"]


def data_event(out: Path) -> list[dict]:
    return [e for e in rows(out, "event") if e["event"] == "data"]


def test_patch_shards_sized_by_the_manifest_keep_at_most_max_open_files(tmp_path):
    data = write_tiny_shards(tmp_path / "data", n_per_shard=5)
    from preprocessing.manifest import load_manifest

    m = load_manifest(data)
    shard_rows = [r for r in m.shards if r.kind != "volume"]  # 2 source + 2 target shards
    paths, counts = [data / r.path for r in shard_rows], [r.patches for r in shard_rows]
    gone = PatchShards([tmp_path / "nowhere" / p.name for p in paths], counts)  # sizing opens nothing
    assert len(gone) == 20 and gone.open_files() == 0
    with pytest.raises(OSError):
        gone[0]
    with pytest.raises(ValueError, match="3 patch counts for 4 shards"):
        PatchShards(paths, counts[:3])
    # source and target patches differ in shape: one index space per shape
    for group in ("source", "target"):
        ps = [(p, c) for p, c, r in zip(paths, counts, shard_rows) if r.group == group]
        every = PatchShards([p for p, _ in ps], max_open=None)
        bounded = PatchShards([p for p, _ in ps], [c for _, c in ps], max_open=1)
        order = np.random.default_rng(0).permutation(len(every))
        for i in order:  # every read from the other shard closes the one open
            np.testing.assert_array_equal(bounded[int(i)], every[int(i)])
            assert bounded.open_files() == 1
        assert every.open_files() == 2


def test_a_resumed_start_reads_no_shard_and_a_changed_shard_is_still_caught(tmp_path):
    data = write_tiny_shards(tmp_path / "data")
    out = tmp_path / "run"
    r = run_cmd(train_cmd(data, out, *RUN))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(e["files"], e["hashed"]) for e in data_event(out)] == [(4, 4)]
    stamps = json.loads((out / "data_verified.json").read_text())
    assert stamps["root"] == str(data) and len(stamps["files"]) == 4
    # the same run again: every shard unchanged since it was hashed, none read
    r = run_cmd(train_cmd(data, out, *RUN))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [(e["files"], e["hashed"]) for e in data_event(out)][-1] == (4, 0)
    assert "0 hashed and 4 unchanged" in " ".join(r.stderr.split())
    # a shard rewritten in place, same size: its stamp no longer fits, it is hashed and refused
    victim = data / "shards" / "target" / "s2.h5"
    b = bytearray(victim.read_bytes())
    b[len(b) // 2] ^= 1
    victim.write_bytes(bytes(b))
    r = run_cmd(train_cmd(data, out, *RUN))
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "1 shard(s) do not match the manifest" in err and "s2.h5" in err, err[-3000:]


def test_staged_copies_are_read_and_a_corrupted_copy_is_fetched_again(tmp_path):
    data = write_tiny_shards(tmp_path / "data")
    stage = tmp_path / "local"
    r = run_cmd(train_cmd(data, tmp_path / "run1", *RUN, f"train.stage_dir={stage}"))
    assert r.returncode == 0, r.stderr[-3000:]
    [event] = data_event(tmp_path / "run1")
    root = Path(event["staged"])
    assert root.parent == stage and root.name.startswith("udean-data-")
    assert (event["fetched"], event["refetched"], event["nodes"]) == (4, {}, 1)
    for rel in ("shards/source/s0.h5", "shards/target/s3.h5"):
        assert (root / rel).read_bytes() == (data / rel).read_bytes()

    # one staged copy corrupted (same size), every other original gone from the data folder:
    # the copy is caught by its hash and fetched again, the rest is read from the staged copies
    victim = "shards/target/s2.h5"
    b = bytearray((root / victim).read_bytes())
    b[len(b) // 3] ^= 1
    (root / victim).write_bytes(bytes(b))
    aside = tmp_path / "aside"
    aside.mkdir()
    for rel in ("shards/source/s0.h5", "shards/source/s1.h5", "shards/target/s3.h5"):
        shutil.move(data / rel, aside / Path(rel).name)
    r = run_cmd(train_cmd(data, tmp_path / "run2", *RUN, f"train.stage_dir={stage}"))
    assert r.returncode == 0, r.stderr[-3000:]
    [event] = data_event(tmp_path / "run2")
    assert event["fetched"] == 1 and list(event["refetched"].values()) == [[victim]]
    assert "1 staged copies did not match the manifest and were fetched again" in " ".join(r.stderr.split())
    assert (root / victim).read_bytes() == (data / victim).read_bytes()
    assert rows(tmp_path / "run2", "train")[-1]["step"] == 2


def test_a_stage_dir_naming_an_unset_variable_is_one_clear_error(tmp_path):
    data = write_tiny_shards(tmp_path / "data")
    r = run_cmd(train_cmd(data, tmp_path / "run", *RUN, "train.stage_dir=$UDEAN_NO_SUCH_VARIABLE/x"))
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "still names an environment variable that is not set" in err, err[-3000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_a_staged_run_validates_and_chooses_best_from_the_staged_val_volumes(tiny_data, tmp_path):
    """The val volumes are read from the staged copy: best/'s criterion finds them there (it used
    to look them up under data.out and fail with a KeyError)."""
    r = run_cmd(train_cmd(tiny_data, tmp_path / "run", "train.epochs=1", "train.steps_per_epoch=2", "train.val_every=1",
                          f"train.stage_dir={tmp_path / 'local'}"))
    assert r.returncode == 0, r.stderr[-3000:]
    [event] = data_event(tmp_path / "run")
    assert Path(event["staged"]).parent == tmp_path / "local"
    assert [v["step"] for v in rows(tmp_path / "run", "val")] == [2]
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["by"] == "psnr"
