"""Stop at step k, resume: the run continues from k with exactly the state of an uninterrupted run.

Deterministic CPU mode, 2 ranks under torchrun, several random k in one launch: the worker below
(this file run as a script) trains once without stopping, then for every k trains with a
preemption request arriving during step k (the loop checkpoints and returns the requeue code)
and trains again (resuming). The test compares every tensor of the DeepSpeed checkpoints (model,
Adam state, LR schedule) and our state (step, sampler, RNG) at step k and at the end.
A second test sends real SIGTERM / SIGUSR1 to a `udean train` process.
"""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":  # run by torchrun as a script: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.udean.test_train import BIN, rows, run_cmd, train_cmd
from udean.config import load as load_config

N_EPOCHS, SPE = 2, 4  # 8 steps; k in 1..7 covers mid-epoch and the epoch boundary
COMMON = [f"train.epochs={N_EPOCHS}", f"train.steps_per_epoch={SPE}", "train.val_every=0",
          "train.deterministic=true", "train.keep_last=100", "train.log_every=1",
          # the stateful switches of udean/configs/demo.yaml: augmentation draws, the adaptation
          # warm-up (step-dependent) and spectral norm's power-iteration buffers must all resume
          "train.augment=true", "loss.adapt_start=0.2", "loss.adapt_ramp=0.4", "model.spectral_norm=true",
          "loss.f_cyc_stop_gradient=true"]


class StopAt:
    """A Preemption stand-in: the request 'arrives' during step k (the loop polls once per step)."""

    def __init__(self, k: int):
        self.k, self.polls, self.signal_name = k, 0, "SIGTERM (simulated)"

    @property
    def requested(self) -> bool:
        self.polls += 1
        return self.polls >= self.k


class Never:
    requested, signal_name = False, None


def worker(data: str, root: str, precision: str, ks: list[int]) -> None:
    from hpc.dist import init
    from hpc.signals import REQUEUE_EXIT_CODE
    from udean.config import load
    from udean.data.sampler import UnpairedSampler
    from udean.train import train

    dist = init("gloo")
    common = COMMON + [f"train.precision={precision}"]  # zero_stage null: 0 for fp32, 1 for bf16 (ZeRO's flat buffers)
    full = load("tiny", common + [f"data.out={data}", f"train.out={root}/full", "train.checkpoint_every=1"])
    assert train(full, dist, Never()) == 0
    for k in ks:
        cfg = load("tiny", common + [f"data.out={data}", f"train.out={root}/k{k}", "train.checkpoint_every=1000"])
        assert train(cfg, dist, StopAt(k)) == REQUEUE_EXIT_CODE
        assert train(cfg, dist, Never()) == 0
    # the samples each rank trained on, per epoch: disjoint across ranks
    seen = [UnpairedSampler(32, 32, full.train.batch_size, SPE, full.train.seed, dist.rank, dist.world_size).pairs(e)
            for e in range(N_EPOCHS)]
    everyone = dist.gather_object([s.tolist() for s in seen])
    if dist.is_main:
        for e in range(N_EPOCHS):
            a, b = ({tuple(p)[1] for p in everyone[r][e]} for r in range(2))
            assert not a & b, f"epoch {e}: ranks share target patches {a & b}"
        Path(root, "worker_ok").write_text("ok")
    dist.shutdown()


def _load(path: Path) -> dict:
    from udean.engines import _allow_deepspeed_checkpoint_types

    _allow_deepspeed_checkpoint_types()
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_checkpoint(x: Path, y: Path) -> None:
    for engine in ("G", "D"):
        sx, sy = (_load(p / engine / "ds" / "mp_rank_00_model_states.pt") for p in (x, y))
        for key in ("module", "optimizer", "lr_scheduler", "global_steps", "skipped_steps"):
            assert_same(sx[key], sy[key], f"{x.name}/{engine}.{key}")
    for rank in (0, 1):
        sx, sy = (_load(p / f"state_rank{rank}.pt") for p in (x, y))
        for key in ("step", "epoch", "sampler", "rng", "nonfinite_run", "best"):
            assert_same(sx[key], sy[key], f"{x.name}/state_rank{rank}.{key}")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # ZeRO 0 and the recipe's bf16 + ZeRO 1
def test_stop_at_random_steps_and_resume_equals_an_uninterrupted_run(tiny_data, tmp_path, precision):
    ks = sorted(random.Random().sample(range(1, N_EPOCHS * SPE), 5))
    print("k =", ks)
    r = run_cmd([BIN / "torchrun", "--standalone", "--nproc_per_node=2", __file__, str(tiny_data), str(tmp_path),
                 precision, *map(str, ks)], timeout=600)
    assert r.returncode == 0 and (tmp_path / "worker_ok").exists(), f"k={ks}\n" + r.stdout[-3000:] + r.stderr[-4000:]
    # train.cudnn_benchmark: null resolves to off under train.deterministic; on CPU nothing is said of cuDNN
    assert load_config(tmp_path / "full" / "config.yaml").train.cudnn_benchmark is False
    assert "cudnn" not in r.stdout + r.stderr
    full = tmp_path / "full" / "checkpoints"
    full_g = {t["step"]: t["g.total"] for t in rows(tmp_path / "full", "train")}
    for k in ks:
        ck = tmp_path / f"k{k}" / "checkpoints"
        assert_same_checkpoint(full / f"step_{k:08d}", ck / f"step_{k:08d}")
        assert_same_checkpoint(full / f"step_{N_EPOCHS * SPE:08d}", ck / f"step_{N_EPOCHS * SPE:08d}")
        train = rows(tmp_path / f"k{k}", "train")
        assert [t["step"] for t in train] == list(range(1, N_EPOCHS * SPE + 1)), f"k={k}"
        assert {t["step"]: t["g.total"] for t in train} == full_g, f"k={k}: losses differ after resume"
        events = rows(tmp_path / f"k{k}", "event")
        assert [e["step"] for e in events if e["event"] == "preempted"] == [k]
        assert [e["step"] for e in events if e["event"] == "resume"] == [k]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_real_signal_checkpoints_exits_for_requeue_and_resumes(tiny_data, tmp_path, sig):
    out = tmp_path / "run"
    cmd = train_cmd(tiny_data, out, "train.epochs=10", "train.steps_per_epoch=4", "train.val_every=0",
                    "train.checkpoint_every=1000", "train.log_every=1")
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(line.startswith('{"time"') and '"step": 2,' in line
                                    for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 75, stderr[-3000:]
    k = [e["step"] for e in rows(out, "event") if e["event"] == "preempted"][0]
    assert 2 <= k < 40 and (out / "checkpoints" / f"step_{k:08d}").is_dir()
    assert signal.Signals(sig).name in stderr
    r = run_cmd(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {k}" in r.stderr
    steps = [t["step"] for t in rows(out, "train")]
    assert steps == list(range(1, 41))


def test_sigkill_at_random_moments_then_rerun_is_bit_equal_to_an_uninterrupted_run(tmp_path):
    """3 of the kill trials of benchmarks/kill_trials.py (which runs 10, results committed):
    SIGKILL anywhere (start-up, a step, a checkpoint being written), rerun: the last checkpoint
    is bit-equal to an uninterrupted run's and metrics.jsonl holds every step once."""
    from benchmarks.kill_trials import passed, train_trials

    trials = train_trials(3, tmp_path, seed=random.randrange(2**31))
    assert passed(trials), trials
    assert sum(t["killed"] for t in trials) >= 2


def test_a_zero1_checkpoint_at_another_world_size_is_refused_not_treated_as_corrupt(tiny_data, tmp_path):
    """Issue 17 item 9: a ZeRO-1 checkpoint of 2 ranks resumed by 1 raised inside DeepSpeed, was
    taken for corruption, and the run restarted at step 0 (keep_last then deleted the good
    checkpoints). Now the start stops (exit 2) saying how to resume, and nothing changes."""
    from tests.udean.test_checkpoint import _tree

    out = tmp_path / "run"
    args = ("train.precision=bf16", "train.zero_stage=1", "train.val_every=0")
    r = run_cmd(train_cmd(tiny_data, out, *args, launcher="mpirun"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    before = _tree(out)
    r = run_cmd(train_cmd(tiny_data, out, *args))
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "ZeRO stage 1 optimizer state sharded over 2 rank(s)" in err, err[-3000:]
    assert "resume it with 2 rank(s)" in err and "Traceback" not in err and "corrupt" not in err
    assert _tree(out) == before


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2], sys.argv[3], [int(k) for k in sys.argv[4:]])
