"""udean.checkpoint: one name for writer and reader, atomic writes, keep-last-K, weights_only
loads, the fall back from a corrupt newest checkpoint, and the resume rule: only a run of the
same config and data, never a silent start from 0 (real `udean train` processes)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.udean.test_train import rows, run_cmd, train_cmd
from udean import checkpoint
from udean.checkpoint import ResumeRefused, checkpoint_dir, list_checkpoints, verify
from udean.config import load as load_config


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
        self.updates = 0

    def g_updated(self):  # the float32 masters follow a load (udean.engines.Engines)
        self.updates += 1


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


def test_pruning_never_deletes_the_new_checkpoint_nor_one_of_a_later_step(tmp_path):
    """A run resumed from step 2 while steps 10 and 12 (corrupt) are on disk: every save keeps
    itself and `latest` names a folder that exists (it used to prune by step number: the new
    checkpoint was deleted right after it was written)."""
    for step in (10, 12):
        checkpoint.save(tmp_path, step, FakeEngines(step), {"step": step}, OneRank(), keep_last=2)
        (checkpoint_dir(tmp_path, step) / "state_rank0.pt").write_bytes(b"corrupt")
    for step in (3, 4, 5):
        checkpoint.save(tmp_path, step, FakeEngines(step), {"step": step}, OneRank(), keep_last=2)
        latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
        assert latest == f"step_{step:08d}" and (tmp_path / "checkpoints" / latest / "files.json").exists()
    assert [checkpoint.step_of(c) for c in list_checkpoints(tmp_path)] == [12, 10, 5, 4]
    state = checkpoint.load_latest(tmp_path, FakeEngines(0), OneRank(), warn=lambda _: None)
    assert state["step"] == 5


def test_when_no_checkpoint_loads_the_start_stops_and_deletes_nothing(tmp_path):
    for step in (1, 2):
        checkpoint.save(tmp_path, step, FakeEngines(step), {"step": step}, OneRank(), keep_last=3)
        (checkpoint_dir(tmp_path, step) / "state_rank0.pt").write_bytes(b"corrupt")
    with pytest.raises(ResumeRefused, match=r"2 checkpoint\(s\) and none loads .*step_00000002.*step_00000001"):
        checkpoint.load_latest(tmp_path, FakeEngines(0), OneRank(), warn=lambda _: None)
    assert len(list_checkpoints(tmp_path)) == 2
    assert checkpoint.load_latest(tmp_path / "empty", FakeEngines(0), OneRank(), warn=pytest.fail) is None


def _expect(*overrides: str, data: str = "d0") -> dict:
    from udean.config import load

    return {"config": load("tiny", list(overrides)).to_dict(), "data": data}


@pytest.mark.parametrize("saved,now,world,refused", [
    (("train.lr=1e-3",), ("train.lr=2e-3",), 1, "train.lr differ"),
    (("model.features=16",), ("model.features=8",), 1, "model.features differ"),
    # keys that cannot change the trained state may change on a resume
    ((), ("train.log_every=7", "train.out=elsewhere", "train.num_workers=3", "train.val_every=0",
          "infer.batch_size=2", "train.checkpoint_every=9"), 1, None),
    (("train.zero_stage=1",), ("train.zero_stage=1",), 1, "ZeRO stage 1 optimizer state sharded over 2 rank"),
    ((), (), 1, None),  # ZeRO 0: the module and optimizer are whole on every rank
])
def test_a_run_resumes_only_with_its_config_and_zero_layout(tmp_path, saved, now, world, refused):
    checkpoint.save(tmp_path, 4, FakeEngines(4), {"step": 4, "world_size": 2, **_expect(*saved)}, OneRank(), 3)
    engines = FakeEngines(0)
    if refused is None:
        assert checkpoint.load_latest(tmp_path, engines, OneRank(), pytest.fail, _expect(*now))["step"] == 4
        return
    with pytest.raises(ResumeRefused, match=refused) as err:
        checkpoint.load_latest(tmp_path, engines, OneRank(), pytest.fail, _expect(*now))
    assert "--restart" in str(err.value) and engines.g.value == 0.0  # refused before loading anything


def test_a_checkpoint_of_the_full_build_resumes_where_the_same_networks_are_built_and_is_refused_otherwise(tmp_path):
    """Checkpoints record the networks in the engines (`parts`); one written before networks no
    active loss term reads were left out has no record: it holds every network of the config."""
    from udean.losses import model_parts
    from udean.models.udean import build, built_parts

    full = _expect("model.degradation=physics", "loss.lambdas=[1,0,0,0,0.1,0]")
    cfg = load_config("tiny", ["model.degradation=physics", "loss.lambdas=[1,0,0,0,0.1,0]"])
    pruned = built_parts(*build(cfg.model, slab=3, **model_parts(cfg.loss)))
    assert pruned == {"g": ["blur", "lr_encoder", "sr_decoder"], "d": ["d_hr", "d_lr"]}
    old = tmp_path / "old"  # no "parts" in its state: written by the full build
    checkpoint.save(old, 4, FakeEngines(4), {"step": 4, "world_size": 1, **full}, OneRank(), 3)
    engines = FakeEngines(0)
    with pytest.raises(ResumeRefused, match="g.down_extractor, g.lr_decoder") as err:
        checkpoint.load_latest(old, engines, OneRank(), pytest.fail, {**full, "parts": pruned})
    assert "resume it with the version that wrote it" in str(err.value) and "--restart" in str(err.value)
    assert engines.g.value == 0.0 and engines.updates == 0  # refused before loading anything
    every = built_parts(*build(cfg.model, slab=3))  # the same config built whole: the old checkpoint fits
    state = checkpoint.load_latest(old, engines, OneRank(), pytest.fail, {**full, "parts": every})
    assert state["step"] == 4 and engines.g.value == 4.0 and engines.updates == 1
    new = tmp_path / "new"  # recorded: resumes where the same networks are built
    checkpoint.save(new, 4, FakeEngines(4), {"step": 4, "world_size": 1, **full, "parts": pruned}, OneRank(), 3)
    assert checkpoint.load_latest(new, FakeEngines(0), OneRank(), pytest.fail, {**full, "parts": pruned})["step"] == 4


def test_a_run_resumes_only_on_its_data(tmp_path):
    checkpoint.save(tmp_path, 4, FakeEngines(4), {"step": 4, "world_size": 1, **_expect()}, OneRank(), 3)
    with pytest.raises(ResumeRefused, match="trained on other data"):
        checkpoint.load_latest(tmp_path, FakeEngines(0), OneRank(), pytest.fail, _expect(data="d1"))


def test_only_the_own_device_rng_is_saved_and_an_older_all_gpu_list_still_restores():
    """Issue 17 item 9: saving every visible GPU's generator made a resume with fewer visible
    GPUs raise (and count as corruption). Now one tensor, the process's own device; a list from
    an older checkpoint gives this device's entry, or nothing when it has none."""
    assert "cuda" not in checkpoint.rng_state("cpu")
    a, b = torch.arange(4, dtype=torch.uint8), torch.arange(4, 8, dtype=torch.uint8)
    assert checkpoint.cuda_state_for(a, 3) is a
    assert checkpoint.cuda_state_for([a, b], 1) is b
    assert checkpoint.cuda_state_for([a, b], 5) is None and checkpoint.cuda_state_for(None, 0) is None
    state = checkpoint.rng_state("cpu")
    checkpoint.set_rng_state({**state, "cuda": [a, b]}, "cpu")  # a CPU resume of a GPU checkpoint


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
    but DeepSpeed cannot read the file: both fall back to the previous checkpoint and say so,
    and metrics.jsonl holds every step once (the rows of the steps redone are replaced)."""
    out = tmp_path / "run"
    args = ("train.val_every=0", "train.checkpoint_every=2", "train.epochs=2")
    first = run_cmd(train_cmd(tiny_data, out, *args))
    assert first.returncode == 0, first.stderr[-3000:]
    newest = checkpoint_dir(out, 8)
    victim = newest / "G" / "ds" / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    if damage == "unloadable":
        (newest / "files.json").write_text(json.dumps(checkpoint._inventory(newest)))
        assert verify(newest) is None
    again = run_cmd(train_cmd(tiny_data, out, *args))
    assert again.returncode == 0, again.stderr[-3000:]
    err = " ".join(again.stderr.split())  # rich wraps long lines
    assert "checkpoint step_00000008 is corrupt" in err and "falling back to step_00000006" in err
    assert "resumed from step 6" in err
    assert [t["step"] for t in rows(out, "train")] == list(range(1, 9))
    replaced = [json.loads(line)["step"] for line in (out / "metrics.replaced.jsonl").read_text().splitlines()]
    assert {7, 8} <= set(replaced)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def test_a_changed_config_never_overwrites_a_run_and_restart_keeps_it(tiny_data, tmp_path):
    """Issue 18 item 1: model.features=8 into a finished train.out was 'corrupt', trained from
    step 0 with rc 0 and overwrote the checkpoints, best/ and config.yaml; a changed train.lr
    resumed and rewrote config.yaml. Now both stop before any work, naming the key, and leave
    every file as it was; --restart moves the run aside and starts over."""
    out = tmp_path / "run"
    first = run_cmd(train_cmd(tiny_data, out, "train.val_every=1"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = _tree(out)
    assert (out / "best" / "generator.pt").exists() and (out / "config.yaml").exists()
    for change in ("model.features=4", "train.lr=2e-3"):
        r = run_cmd(train_cmd(tiny_data, out, "train.val_every=1", change))
        err = " ".join(r.stderr.split())
        assert r.returncode == 2 and f"{change.split('=')[0]} differ" in err and "Traceback" not in err, err[-2000:]
        assert _tree(out) == before, change
    r = run_cmd(train_cmd(tiny_data, out, "train.val_every=1", "train.log_every=2"))  # free key: resumes
    assert r.returncode == 0 and "resumed from step 4" in r.stderr, r.stderr[-2000:]
    assert (out / "config.yaml").read_bytes() == before["config.yaml"]
    r = run_cmd([*train_cmd(tiny_data, out, "train.val_every=0", "model.features=4"), "--restart"])
    assert r.returncode == 0, r.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and _tree(aside[0])["best/generator.pt"] == before["best/generator.pt"]
    assert "training from scratch" in r.stderr and [t["step"] for t in rows(out, "train")] == [1, 2, 3, 4]


def test_no_loadable_checkpoint_stops_the_start_with_the_reason(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert run_cmd(train_cmd(tiny_data, out, "train.val_every=0")).returncode == 0
    for ck in list_checkpoints(out):
        (ck / "state_rank0.pt").write_bytes(b"corrupt")
    before = _tree(out)
    r = run_cmd(train_cmd(tiny_data, out, "train.val_every=0"))
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "none loads" in err and "not starting over from step 0" in err, err[-2000:]
    assert _tree(out) == before


def test_an_unwritable_train_out_is_reported_before_the_engines(tiny_data, tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    r = run_cmd(train_cmd(tiny_data, tmp_path / "file" / "run"))
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "is not writable" in err and "Traceback" not in err, err[-2000:]
    assert "training from scratch" not in err and "threads:" not in err  # before setup


def test_a_key_added_since_the_run_was_saved_is_not_a_difference():
    """Upgrading the suite under a running job adds config keys (at defaults that keep the old
    behaviour); the requeued job must resume, not be refused for keys its checkpoint lacks."""
    from udean.config import load

    current = load("tiny").to_dict()
    saved = json.loads(json.dumps(current))
    del saved["train"]["augment"], saved["model"]["degradation"]
    assert checkpoint.resume_mismatch(saved, current) == []
    saved["train"]["lr"] = current["train"]["lr"] * 2
    assert checkpoint.resume_mismatch(saved, current) == ["train.lr"]
    saved["train"]["gone"] = 1  # a key this version does not know: a difference, not an error
    assert "train.gone" in checkpoint.resume_mismatch(saved, current)
