"""udean.checkpoint: one name for writer and reader, atomic writes, keep-last-K, weights_only
loads, and the fall back from a corrupt newest checkpoint (real `udean train` processes)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.udean.test_train import rows, run_cmd, train_cmd
from udean import checkpoint
from udean.checkpoint import checkpoint_dir, list_checkpoints, verify


class OneRank:
    rank, world_size, is_main = 0, 1, True

    def barrier(self):
        pass

    def broadcast_object(self, obj=None, src=0):
        return obj

    def all_reduce_flag(self, flag):
        return bool(flag)


class FakeEngine:
    """Writes one tensor file the way DeepSpeed lays out save_dir/tag/."""

    def __init__(self, value: float):
        self.value = value

    def save_checkpoint(self, save_dir, tag, save_latest=True):
        Path(save_dir, tag).mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.full((3,), self.value)}, Path(save_dir, tag, "mp_rank_00_model_states.pt"))

    def load_checkpoint(self, load_dir, tag):
        path = Path(load_dir, tag, "mp_rank_00_model_states.pt")
        self.value = float(torch.load(path, weights_only=True)["w"][0])
        return str(path), {}


class FakeEngines:
    def __init__(self, value: float):
        self.g, self.d = FakeEngine(value), FakeEngine(-value)


def test_save_is_atomic_keeps_last_k_and_names_one_path(tmp_path):
    stale = checkpoint_dir(tmp_path, 3).parent / ".tmp-step_00000003"
    stale.mkdir(parents=True)  # a crashed save
    for step in (1, 2, 3, 4):
        path = checkpoint.save(tmp_path, step, FakeEngines(step), {"step": step}, OneRank(), keep_last=2)
        assert path == checkpoint_dir(tmp_path, step)
    assert list_checkpoints(tmp_path) == [checkpoint_dir(tmp_path, 4), checkpoint_dir(tmp_path, 3)]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    listed = json.loads((checkpoint_dir(tmp_path, 4) / "files.json").read_text())
    assert set(listed) == {"G/ds/mp_rank_00_model_states.pt", "D/ds/mp_rank_00_model_states.pt", "state_rank0.pt"}
    engines = FakeEngines(0.0)
    state = checkpoint.load_latest(tmp_path, engines, OneRank(), warn=pytest.fail)
    assert state["step"] == 4 and engines.g.value == 4.0 and engines.d.value == -4.0


def test_incomplete_checkpoints_are_invisible(tmp_path):
    checkpoint.save(tmp_path, 5, FakeEngines(5), {"step": 5}, OneRank(), keep_last=3)
    checkpoint_dir(tmp_path, 9).mkdir()  # no files.json: the rename never happened
    assert list_checkpoints(tmp_path) == [checkpoint_dir(tmp_path, 5)]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_names_the_damaged_file(tmp_path, damage):
    folder = checkpoint.save(tmp_path, 1, FakeEngines(1), {"step": 1}, OneRank(), keep_last=3)
    victim = folder / "G" / "ds" / "mp_rank_00_model_states.pt"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:-10]))
    else:
        victim.unlink()
    assert "G/ds/mp_rank_00_model_states.pt" in verify(folder)


def test_fall_back_skips_every_corrupt_checkpoint_with_a_warning(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, FakeEngines(step), {"step": step}, OneRank(), keep_last=3)
    for step in (2, 3):
        (checkpoint_dir(tmp_path, step) / "state_rank0.pt").write_bytes(b"not a checkpoint")
    warnings: list[str] = []
    engines = FakeEngines(0.0)
    state = checkpoint.load_latest(tmp_path, engines, OneRank(), warn=warnings.append)
    assert state["step"] == 1 and engines.g.value == 1.0
    assert "step_00000003 is corrupt" in warnings[0] and "falling back to step_00000002" in warnings[0]
    assert "step_00000002 is corrupt" in warnings[1] and "falling back to step_00000001" in warnings[1]


def test_rng_state_round_trips_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = checkpoint.rng_state()
    torch.save(saved, tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(1))
    assert want[:2] == got[:2] and torch.equal(want[2], got[2])


@pytest.mark.parametrize("damage", ["bytes", "unloadable"])
def test_train_falls_back_from_a_corrupt_newest_checkpoint(tiny_data, tmp_path, damage):
    """Real runs: 'bytes' fails the sha256 check; 'unloadable' passes it (files.json rewritten)
    but DeepSpeed cannot read the file: both fall back to the previous checkpoint and say so."""
    out = tmp_path / "run"
    first = run_cmd(train_cmd(tiny_data, out, "train.val_every=0", "train.checkpoint_every=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    newest = checkpoint_dir(out, 4)
    victim = newest / "G" / "ds" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    if damage == "unloadable":
        (newest / "files.json").write_text(json.dumps(checkpoint._inventory(newest)))
        assert verify(newest) is None
    again = run_cmd(train_cmd(tiny_data, out, "train.val_every=0", "train.checkpoint_every=2", "train.epochs=2"))
    assert again.returncode == 0, again.stderr[-3000:]
    err = " ".join(again.stderr.split())  # rich wraps long lines
    assert "checkpoint step_00000004 is corrupt" in err and "falling back to step_00000002" in err
    assert "resumed from step 2" in err
    steps = [t["step"] for t in rows(out, "train")]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6, 7, 8]
