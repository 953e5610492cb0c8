"""udean.train / udean.engines with real processes on CPU (gloo): torchrun and mpirun, 2 ranks,
tiny model and data; non-finite losses; the DeepSpeed config derived from ours."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.udean.conftest import record_hashes, write_tiny_shards
from udean.config import load
from udean.engines import cosine_lr_factor, deepspeed_config

BIN = Path(sys.executable).parent


def run_cmd(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)


def train_cmd(data: Path, out: Path, *overrides: str, launcher: str = "single") -> list:
    args = ["train", "--config", "tiny", f"data.out={data}", f"train.out={out}", *overrides]
    if launcher == "torchrun":
        return [BIN / "torchrun", "--standalone", "--nproc_per_node=2", BIN / "udean", *args]
    if launcher == "mpirun":
        return [BIN / "mpirun", "--oversubscribe", "-n", "2", BIN / "udean", *args]
    return [BIN / "udean", *args]


def rows(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


# --------------------------------------------------------------------------- unit
def test_deepspeed_config_is_derived_from_ours():
    cfg = load("paper", ["train.precision=fp16", "train.zero_stage=1", "train.batch_size=3"])
    ds = deepspeed_config(cfg.train)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["zero_optimization"]["stage"] == 1
    opt = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "Adam" and not opt["adam_w_mode"]
    assert (opt["lr"], tuple(opt["betas"]), opt["eps"]) == (1e-4, (0.9, 0.99), 1e-8)  # paper, II-D
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and "bf16" not in ds  # dynamic scaling
    assert ds["gradient_clipping"] == 0.0
    bf = deepspeed_config(load("paper").train)
    assert bf["bf16"]["enabled"] and "fp16" not in bf
    fp = deepspeed_config(load("paper", ["train.precision=fp32", "train.grad_clip=1.5"]).train)
    assert "bf16" not in fp and "fp16" not in fp and fp["gradient_clipping"] == 1.5
    # per-tensor host work off (benchmarks/host_cost.py): bf16's overflow test, ZeRO's contiguous
    # gradient copies, its grad norm where nothing clips; Adam over all tensors at once
    assert bf["bf16"]["check_grad_overflow"] is False and opt["foreach"] is True
    assert bf["zero_optimization"] == {"stage": 1, "contiguous_gradients": False, "compute_grad_norm": False}
    clipped = deepspeed_config(load("paper", ["train.grad_clip=1.0"]).train)["zero_optimization"]
    assert "compute_grad_norm" not in clipped and fp["zero_optimization"] == {"stage": 0}


def test_cosine_lr_goes_from_lr_to_lr_min():
    lr, lr_min, total = 1e-4, 1e-8, 100
    assert cosine_lr_factor(0, total, lr, lr_min) * lr == pytest.approx(lr)
    assert cosine_lr_factor(total, total, lr, lr_min) * lr == pytest.approx(lr_min)
    assert cosine_lr_factor(total // 2, total, lr, lr_min) * lr == pytest.approx((lr + lr_min) / 2)
    assert cosine_lr_factor(10 * total, total, lr, lr_min) * lr == pytest.approx(lr_min)
    vals = [cosine_lr_factor(s, total, lr, lr_min) for s in range(total + 1)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


# --------------------------------------------------------------------------- real launches
@pytest.mark.parametrize("launcher,precision,zero", [("torchrun", "fp32", 0), ("mpirun", "bf16", 1)])
def test_two_ranks_train_and_the_g_loss_falls(tiny_data, tmp_path, launcher, precision, zero):
    out = tmp_path / "run"
    r = run_cmd(train_cmd(tiny_data, out, "train.epochs=3", "train.steps_per_epoch=4", "train.lr=2e-3",
                          f"train.precision={precision}", f"train.zero_stage={zero}", launcher=launcher))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # what the process set; on CPU nothing about cuDNN, and none of DeepSpeed's CPU start-up noise
    said = r.stdout + r.stderr
    assert f"precision {precision}, ZeRO {zero}\n" in said and "cudnn" not in said
    assert "Setting accelerator to CPU" not in said and "built successfully" not in said
    train = rows(out, "train")
    assert [t["step"] for t in train] == list(range(1, 13))
    assert all(math.isfinite(t["g.total"]) and math.isfinite(t["d.total"]) for t in train)
    g = [t["g.total"] for t in train]
    assert sum(g[-3:]) / 3 < sum(g[:3]) / 3, g
    assert len(rows(out, "val")) == 3 and (out / "best" / "generator.pt").exists()
    last = out / "checkpoints" / "step_00000012"
    assert {p.name for p in last.glob("state_rank*.pt")} == {"state_rank0.pt", "state_rank1.pt"}
    assert (out / "config.yaml").exists() and (out / "tb").is_dir()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000012"
    assert len(list((out / "checkpoints").glob("step_*"))) == 3  # keep_last
    # last/ (and best/, udean export) hold the SR network's float32 master weights; under bf16 the
    # engine's module holds their rounding
    fp32 = torch.load(last / "sr_fp32.pt", weights_only=True)
    weights = torch.load(out / "last" / "generator.pt", weights_only=True)
    module = torch.load(last / "G" / "ds" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert set(weights) == set(fp32) and all(v.dtype == torch.float32 and torch.equal(v, fp32[k]) for k, v in weights.items())
    assert all(torch.equal(module[k], v.to(module[k].dtype)) for k, v in weights.items())
    assert any(not torch.equal(module[k].float(), v) for k, v in weights.items()) == (precision == "bf16")
    r = run_cmd([BIN / "udean", "export", out, "--out", tmp_path / "export"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    exported = torch.load(tmp_path / "export" / "generator.pt", weights_only=True)
    assert all(torch.equal(v, weights[k]) for k, v in exported.items()) and set(exported) == set(weights)
    assert json.loads((tmp_path / "export" / "export.json").read_text())["weights"] == "float32 master weights"
    if precision == "fp32":
        # one evaluator: `udean evaluate` of the best checkpoint on the val volume gives exactly the
        # PSNR / SSIM validation logged for it during training (bf16 validation runs in bf16 instead)
        best = json.loads((out / "best" / "best.json").read_text())
        r = run_cmd([BIN / "udean", "evaluate", "--config", "tiny", "--checkpoint", out, "--data", tiny_data,
                     "--group", "val", "--out", tmp_path / "eval", "--figures", "0", "--device", "cpu"])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        ours = json.loads((tmp_path / "eval" / "results.json").read_text())["methods"][-1]
        assert ours["n"] == 1 and (ours["psnr_mean"], ours["ssim_mean"]) == (best["psnr"], best["ssim"])


def test_nan_batch_is_skipped_on_every_rank_and_the_run_goes_on(tmp_path):
    data = write_tiny_shards(tmp_path / "data", nan_target_patch=5)
    out = tmp_path / "run"
    r = run_cmd(train_cmd(data, out, "train.steps_per_epoch=8", "train.val_every=0", launcher="torchrun"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    skipped = [e for e in rows(out, "event") if e["event"] == "nonfinite_skipped"]
    assert len(skipped) == 1 and skipped[0]["total"] == 1  # patch 5 is in exactly one batch of the epoch
    assert "non-finite loss, step skipped" in r.stderr
    train = rows(out, "train")
    assert train[-1]["step"] == 8 and math.isfinite(train[-1]["g.total"])
    assert sum(t["skipped"] for t in train) == 1


def test_too_many_nonfinite_steps_stop_the_run_with_a_message(tmp_path):
    data = write_tiny_shards(tmp_path / "data")
    import h5py
    import numpy as np

    for shard in (data / "shards" / "target").glob("*.h5"):
        with h5py.File(shard, "r+") as f:
            f["patches"][...] = np.nan
    record_hashes(data)
    r = run_cmd(train_cmd(data, tmp_path / "run", "train.max_nonfinite=3", "train.val_every=0"))
    assert r.returncode == 3, r.stderr[-3000:]
    assert "3 consecutive steps had a non-finite loss" in r.stderr


# the model and patch sizes of udean/configs/tiny.yaml, by overrides over the default config
TINY_SIZES = ["model.features=8", "model.n_groups=1", "model.n_rcab=1", "model.reduction=2", "model.encoder_layers=2",
              "model.disc_features=8", "model.disc_blocks=1", "data.split.preset=counts", "data.split.counts=[2,2,1,1]",
              "data.patches.lr_size=[16,16]", "data.patches.stride=[8,8]", "data.patches.max_per_subject=8",
              "data.patches.min_foreground=0.1"]


def test_without_config_preprocess_and_train_run_the_recommended_recipe(tiny_cohort, tmp_path):
    """`udean preprocess` then `udean train`, neither given --config: both get `recommended`, so
    the source patches carry the margin its physics degradation needs and the run finishes
    (DeepSpeed in the recipe's own bf16 + ZeRO-1, whose spectral norm once failed on its first
    step, the adaptation terms ramping in within its 4 steps)."""
    from preprocessing.config import flatten
    from preprocessing.manifest import load_manifest
    from tests.udean.test_config import RECIPE

    data, out = tmp_path / "data", tmp_path / "run"
    r = run_cmd([BIN / "udean", "preprocess", "--data-root", tiny_cohort, "--out", data, "--no-progress", *TINY_SIZES])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert load_manifest(data).config["patches"]["source_margin"] == [2, 4]
    r = run_cmd([BIN / "udean", "train", f"data.out={data}", f"train.out={out}", *TINY_SIZES, "train.epochs=1",
                 "train.steps_per_epoch=4", "train.batch_size=2", "train.num_workers=0",
                 "train.log_every=1", "train.checkpoint_every=2"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [t["step"] for t in rows(out, "train")] == [1, 2, 3, 4] and len(rows(out, "val")) == 1
    assert (out / "best" / "generator.pt").exists() and json.loads((out / "last" / "last.json").read_text())["step"] == 4
    import yaml

    saved = flatten(yaml.safe_load((out / "config.yaml").read_text()))
    assert {k: saved[k] for k in RECIPE} == RECIPE and "base" not in saved
    assert saved["train.precision"] == "bf16" and saved["model.spectral_norm"] is True
