"""The speed benchmarks in smoke mode: each script runs as a user runs it (a subprocess on CPU,
tiny model) and writes a JSON whose figures are present and consistent."""
import json
import math
import os
import subprocess
import sys

from types import SimpleNamespace

import pytest

from benchmarks import common
from benchmarks import train_step as ts


def _run(repo, script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    proc = subprocess.run([sys.executable, str(repo / "benchmarks" / script), *map(str, args)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _provenance_ok(d):
    p = d["provenance"]
    assert p["machine"]["cores"] >= 1 and p["machine"]["cpu"]
    assert p["versions"]["torch"] and p["date"] and " benchmarks/" in p["command"]
    assert str(common.REPO) not in p["command"]  # the script, the venv: relative to the repository


@pytest.fixture(scope="module")
def step_json(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "train_step.json"
    _run(repo, "train_step.py", "--smoke", "--batches", 1, 2, "--steps", 1, "--warmup", 0, "--out", out)
    return out, json.loads(out.read_text())


def test_train_step_smoke_figures(step_json):
    out, d = step_json
    _provenance_ok(d)
    assert out.with_suffix(".png").stat().st_size > 0
    assert d["matmul_peak"]["tflops"] > 0
    for variant in ("thin_slab", "3d"):
        check = d["bf16_check"][variant]
        assert check["passed"] and 0 < check["worst_rel_l2"] <= check["bound_rel_l2"] == ts.REL_L2_MAX
    ok = [r for r in d["runs"] if r["status"] == "ok"]
    # every (variant, batch) has its own eager bf16 baseline and the project's bf16 step
    for variant in ("thin_slab", "3d"):
        for batch in (1, 2):
            setups = {r["setup"] for r in ok if r["variant"] == variant and r["batch"] == batch}
            assert {"eager_bf16", "fp32", "bf16", "bf16+channels_last", "bf16+fused_adam"} <= setups
    for r in ok:
        assert r["step_s_median"] > 0 and r["skipped_steps"] == 0
        assert r["patches_per_s"] == pytest.approx(r["batch"] / r["step_s_median"])
        assert r["tflops"] == pytest.approx(r["flops_per_step"] / r["step_s_median"] / 1e12)
        assert r["pct_of_bf16_peak"] == pytest.approx(100 * r["tflops"] / d["matmul_peak"]["tflops"])
        assert r["speedup_vs_baseline"] > 0
        assert r["speedup_vs_baseline"] == 1.0 if r["baseline"] else True
        # the engines' ZeRO stage is the config's default for the precision; cudnn.benchmark as training's
        assert r.get("zero_stage") == (None if r["baseline"] else 0 if r["setup"] == "fp32" else 1), r
    assert (d["settings"]["zero_stage"], d["settings"]["cudnn_benchmark"]) == (None, True)
    for r in d["runs"]:
        if r["status"] != "ok":
            assert r["status"] == "skipped" and r["reason"], r  # nothing errored, nothing refused
    assert {r["setup"] for r in d["runs"] if r["status"] == "skipped"} >= {"tf32", "bf16+compile", "bf16+cuda_graphs"}


def test_train_step_flops_agree_and_scale_with_batch(step_json):
    _, d = step_json
    checks = {(c["variant"], c["batch"]): c for c in d["flop_checks"]}
    assert len(checks) == 4
    for c in checks.values():
        # the DeepSpeed step and the eager baseline do the same work: counted twice, equal
        assert c["equal"] and c["engine_bf16"] == c["eager_bf16"] > 0
    for variant in ("thin_slab", "3d"):
        assert checks[(variant, 2)]["engine_bf16"] == 2 * checks[(variant, 1)]["engine_bf16"]
    # the 3d variant does more work per patch than the thin slab
    assert checks[("3d", 1)]["engine_bf16"] > checks[("thin_slab", 1)]["engine_bf16"]


def test_bf16_check_refuses_beyond_the_bound(monkeypatch):
    import torch

    cfg = ts.config("thin_slab", 1, "fp32", smoke=True)
    good = ts.bf16_check(cfg, torch.device("cpu"), batch=1)
    assert good["passed"] and set(good["rel_l2"]) == {"autocast", "bf16_weights"}
    assert set(good["rel_l2"]["autocast"]) == {"f_s", "x_st", "f_sts", "y_sts", "y_hat_s", "f_t", "x_hat_t"}
    monkeypatch.setattr(ts, "REL_L2_MAX", 1e-9)
    bad = ts.bf16_check(cfg, torch.device("cpu"), batch=1)
    assert not bad["passed"]
    cpu = torch.device("cpu")
    for setup in ("eager_bf16", "bf16", "bf16+fused_adam"):
        assert ts.skip_reason(setup, cpu, False, False).startswith("REFUSED")
    assert ts.skip_reason("fp32", cpu, False, False) is None  # fp32 is still timed


def test_loader_smoke(repo, tmp_path):
    out = tmp_path / "loader.json"
    _run(repo, "loader.py", "--smoke", "--workers", 0, 1, "--batches", 4, "--consumption", 10.0, "--out", out)
    d = json.loads(out.read_text())
    _provenance_ok(d)
    assert [p["workers"] for p in d["points"]] == [0, 1]
    for p in d["points"]:
        assert p["pairs_per_s"] > 0 and p["batches"] == 4 and p["first_batch_s"] > 0
        assert p["hr_shape"] == [6, 32, 32] and p["lr_shape"] == [3, 16, 16]
    c = d["consumption"]
    assert c["step_patches_per_s"]["given"] == 10.0
    assert c["keeps_up"]["given"] == (c["best_loader_pairs_per_s"] >= 10.0)
    assert out.with_suffix(".png").stat().st_size > 0


def test_zero_precision_smoke_counts_the_optimizer_paths_host_syncs(repo, tmp_path):
    out = tmp_path / "zp.json"
    # one step first: the first step of a process also moves the resampling taps to the device, once
    _run(repo, "zero_precision.py", "--smoke", "--precisions", "fp32", "bf16", "--steps", 1, "--warmup", 1, "--out", out)
    d = json.loads(out.read_text())
    _provenance_ok(d)
    rows = {(r["precision"], r["zero_stage"]): r for r in d["rows"]}
    assert set(rows) == {("fp32", 0), ("fp32", 1), ("bf16", 0), ("bf16", 1)}
    assert [k for k, r in rows.items() if r["default"]] == [("fp32", 0), ("bf16", 1)]
    tensors = sum(rows["bf16", 0]["param_tensors"].values())
    # DeepSpeed's unfused bf16 optimizer (ZeRO 0) tests every gradient on the host; ZeRO 1 one flat buffer
    assert rows["bf16", 0]["optimizer"]["g"] == "FP16_UnfusedOptimizer" and rows["bf16", 0]["syncs_per_step"] > tensors
    assert rows["bf16", 1]["optimizer"]["g"] == "DeepSpeedZeroOptimizer" and rows["bf16", 1]["syncs_per_step"] < 10
    for r in rows.values():
        assert r["syncs_by_origin"]["udean"] == 1 and not r["skipped"] and r["step_s_median"] > 0  # the step's own
    assert out.with_suffix(".png").stat().st_size > 0


def test_infer_smoke(repo, tmp_path):
    from udean.config import load
    from udean.infer import Inferer

    out = tmp_path / "infer.json"
    _run(repo, "infer.py", "--smoke", "--lr-shape", 7, 20, 18, "--out", out)
    d = json.loads(out.read_text())
    _provenance_ok(d)
    ok = [r for r in d["runs"] if r["status"] == "ok"]
    assert {(r["variant"], r["setup"]) for r in ok} == {
        (v, s) for v in ("thin_slab", "3d") for s in ("fp32", "bf16_autocast", "bf16_weights")}
    for r in ok:
        assert r["sr_shape"] == [14, 40, 36] and r["sr_finite"]
        inferer = Inferer.from_config(load("paper").infer, SimpleNamespace(slab=3, lr_size=(16, 16)), "cpu")
        assert r["tiles"] == inferer.tiles((7, 20, 18)) and r["seconds_median"] > 0
        assert r["tflops"] == pytest.approx(r["flops_per_tile"] * r["tiles"] / r["seconds_median"] / 1e12)
    assert all(r["reason"] for r in d["runs"] if r["status"] == "skipped")


def test_relative_writes_repository_paths_relative_and_leaves_others():
    assert common.relative(common.REPO / "benchmarks" / "results" / "x.json") == "benchmarks/results/x.json"
    assert common.relative(f"--out={common.REPO}/runs") == "--out=runs"
    assert common.relative(f"train.out={common.REPO / 'a'}") == "train.out=a"
    assert common.relative("/tmp/scratch/data") == "/tmp/scratch/data"  # a scratch folder stays as given
    assert common.relative("--smoke") == "--smoke" and common.relative(None) is None


def test_write_json_is_strict_json(tmp_path):
    path = common.write_json(tmp_path / "a" / "r.json", {"x": math.nan, "y": [1.5, math.inf], "z": {1: "a"}})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "x": None, "y": [1.5, None], "z": {"1": "a"}}
    assert not list(path.parent.glob("*.tmp*"))


def test_train_step_resume_measures_only_missing_points(repo, tmp_path):
    out = tmp_path / "ts.json"
    common_args = ["--smoke", "--batches", 1, "--steps", 1, "--warmup", 0, "--setups", "bf16", "--out", out]
    _run(repo, "train_step.py", "--variants", "thin_slab", *common_args)
    first = json.loads(out.read_text())
    proc = _run(repo, "train_step.py", "--variants", "thin_slab", "3d", "--resume", *common_args)
    assert "already in" in proc.stdout
    d = json.loads(out.read_text())
    assert d["settings"]["variants"] == ["thin_slab", "3d"] and len(d["sessions"]) == 2
    sessions = {(r["variant"], r["setup"]): r["session"] for r in d["runs"]}
    assert sessions == {("thin_slab", "eager_bf16"): 0, ("thin_slab", "bf16"): 0,
                        ("3d", "eager_bf16"): 1, ("3d", "bf16"): 1}
    kept = [r for r in d["runs"] if r["variant"] == "thin_slab"]
    assert [r["step_s_median"] for r in kept] == [r["step_s_median"] for r in first["runs"]]
    assert all(c["equal"] for c in d["flop_checks"]) and len(d["flop_checks"]) == 2


def test_demo_ablation_variants_are_valid_configs_and_each_changes_the_demo():
    """Every variant of benchmarks/demo_ablation.py loads on the demo's config (a misspelt key or
    a combination the config refuses fails here, not an hour into the benchmark) and changes it."""
    from benchmarks.demo_ablation import VARIANTS
    from preprocessing.config import diff_keys
    from udean.config import load

    demo = load("demo").to_dict()
    assert VARIANTS["demo"][1] == []
    for name, (_, overrides) in VARIANTS.items():
        cfg = load("demo", overrides).to_dict()
        assert bool(diff_keys(demo, cfg)) == bool(overrides), name


def test_host_cost_smoke_counts_ops_by_phase_and_syncs_both_ways(repo, tmp_path):
    """benchmarks/host_cost.py: the recommended recipe's step, bf16 ZeRO-1 and fp32 ZeRO-0, ops by
    phase and host syncs both ways; a second label adds rows beside the first. And the counter
    itself: a CPU constant moved to the device and a Python scalar written into a device tensor
    are host-to-device writes on a CPU-only machine too; the pinned batch's copy is not."""
    from benchmarks.host_cost import PHASES, HostCost

    out = tmp_path / "hc.json"
    for label in ("one", "two"):
        _run(repo, "host_cost.py", "--smoke", "--warmup", 1, "--label", label, "--out", out)
    d = json.loads(out.read_text())
    _provenance_ok(d)
    assert out.with_suffix(".png").stat().st_size > 0 and set(d["sessions"]) == {"one", "two"}
    assert [(r["label"], r["precision"], r["zero_stage"]) for r in d["rows"]] == [
        ("one", "bf16", 1), ("one", "fp32", 0), ("two", "bf16", 1), ("two", "fp32", 0)]
    for r in d["rows"]:
        assert r["ops"] == sum(r["ops_by_phase"].values()) and list(r["ops_by_phase"]) == list(PHASES)
        assert all(r["ops_by_phase"][p] > 0 for p in PHASES if p != "inputs") and not r["skipped"]
        # the step's one flag read; no host-to-device write but torch.optim's host-side step counters
        # (the batch's copy is an input copy)
        assert r["syncs_ours"] == r["syncs"] == 1 and r["reads_by_origin"].get("udean") == 1
        assert set(r["writes_by_origin"]) <= {"torch.optim"}

    import torch

    constant = torch.arange(4.0, dtype=torch.float64)  # made before counting, like a module constant
    x = torch.rand(4)
    batch = torch.rand(4)
    with HostCost(inputs=(batch,)) as counted:
        counted.host[constant] = True  # what the scan of module globals marks
        y = x * constant.to(x)  # a CPU constant moved to the device: a write
        y[0] = 1.0  # a Python scalar into a device tensor: a write
        z = torch.tensor([2.0]).to(x.device)  # made from Python values, moved: a write
        w = batch.to(x.device, non_blocking=True)  # the planned input copy
        v = (x + 1).to(x.device)  # device to device: nothing
        float(y.sum())  # a device value read on the host
        float(torch.tensor(3.0))  # a host value read on the host: nothing
    assert sum(counted.writes.values()) == 3 and counted.input_copies == 1 and sum(counted.reads.values()) == 1
    assert z.device == w.device == v.device


def test_concurrency_smoke(repo, tmp_path):
    """benchmarks/concurrency.py: one training, then two at once, per wait policy; every figure
    present, the shares the ratios of the rates, CPU seconds per step measured."""
    out = tmp_path / "concurrency.json"
    _run(repo, "concurrency.py", "--steps", 4, "--warmup", 1, "--modes", "passive", "--shape", 72, 72, 64,
         "--timeout", 300, "--work", tmp_path / "work", "--out", out)
    d = json.loads(out.read_text())
    _provenance_ok(d)
    (row,) = d["rows"]
    assert row["mode"] == "passive" and row["solo"]["runs"] == 1 and row["pair"]["runs"] == 2
    assert row["solo_steps_per_s"] > 0 and len(row["pair_steps_per_s"]) == 2
    for rate, share in zip(row["pair_steps_per_s"], row["pair_share_of_solo"]):
        assert share == pytest.approx(rate / row["solo_steps_per_s"], rel=0.02)
    assert row["passes"] == all(s >= d["share_needed"] for s in row["pair_share_of_solo"])
    assert all(r["steps_done"] == [4] * r["runs"] for r in (row["solo"], row["pair"]))
    assert "2 intra-op" in row["solo"]["threads_line"] or "intra-op" in row["solo"]["threads_line"]
    assert out.with_suffix(".png").stat().st_size > 0
