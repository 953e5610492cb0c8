"""The evaluator and `udean evaluate`: baseline alignment, scores equal udean.metrics, the score
grid, regions, ranks, tables, the CLI on disk. (Validation during training and `udean evaluate`
giving the same numbers on the same volume and checkpoint: tests/udean/test_train.py.)"""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from preprocessing import kspace
from preprocessing.config import DegradationConfig, StorageConfig
from preprocessing.shards import VolumePair
from preprocessing.subject import head_mask as head_mask_stored
from udean import evaluate
from udean.infer import Inferer
from udean.config import load
from udean.metrics import psnr, ssim


def nearest_x2(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)


def phantom(seed: int, shape=(16, 48, 40), border: bool = True) -> np.ndarray:
    """A smooth random HR volume in [0, 1], optionally with a dark border (a 'head' in background)."""
    rng = np.random.default_rng(seed)
    v = ndimage.gaussian_filter(rng.random(shape), 2.0)
    v = (v - v.min()) / np.ptp(v)
    if border:
        v[:, :4] = 0
        v[:, -4:] = 0
    return v.astype(np.float32)


def paired(seed: int, shape=(16, 48, 40), border: bool = True) -> VolumePair:
    hr = phantom(seed, shape, border)
    lr = kspace.degrade(hr, DegradationConfig(), np.random.default_rng(seed), 0)
    return VolumePair(hr, lr, (hr > 0.05).astype(np.uint8), np.diag([0.7, 0.7, 0.7, 1.0]),
                      np.diag([1.4, 1.4, 1.4, 1.0]), f"s{seed:02d}", "test", 0)


def test_tricubic_samples_lr_index_i_over_2():
    # a quadratic is reproduced exactly by cubic B-spline interpolation away from the borders,
    # so the interior matches HR iff HR voxel i samples LR continuous index i / 2
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in (20, 24, 28)], indexing="ij")
    hr = (0.2 + 0.01 * i + 0.0004 * j**2 + 0.005 * k) / 2.0
    lr = hr[::2, ::2, ::2]
    up = evaluate.tricubic(lr.astype(np.float32), hr.shape)
    np.testing.assert_allclose(up[6:-6, 6:-6, 6:-6], hr[6:-6, 6:-6, 6:-6], atol=2e-4)


def test_tricubic_matches_the_kspace_geometry_better_than_a_shifted_grid():
    v = paired(3, border=False)
    aligned = evaluate.score(evaluate.tricubic(v.lr, v.hr.shape), v.hr)
    shifted = np.clip(ndimage.affine_transform(v.lr.astype(np.float64), [0.5] * 3, offset=[-0.25] * 3,
                                               output_shape=v.hr.shape, order=3, mode="nearest"), 0, 1)
    assert aligned["psnr"] > evaluate.score(shifted, v.hr)["psnr"] + 3.0


def test_scores_tables_and_files(tmp_path):
    vols = [paired(s) for s in (1, 2, 5)]
    inferer = Inferer.from_config(load("tiny").infer, SimpleNamespace(slab=3, lr_size=(8, 8)), "cpu")
    methods = {
        evaluate.TRICUBIC: lambda v: evaluate.tricubic(v.lr, v.hr.shape),
        "nearest": lambda v: inferer(v.lr, nearest_x2),
    }
    seen = []
    results = evaluate.Evaluator(methods).run(vols, on_volume=lambda v, p, s: seen.append(sorted(p)))
    assert [r.name for r in results] == [evaluate.TRICUBIC, "nearest"]
    assert seen == [sorted(methods)] * 3
    near = np.stack([v.lr.repeat(2, 0).repeat(2, 1).repeat(2, 2) for v in vols])
    for r, preds in zip(results, ([evaluate.tricubic(v.lr, v.hr.shape) for v in vols], near)):
        for row, v, pred in zip(r.subjects, vols, preds):
            assert row["subject"] == v.subject
            assert row["psnr"] == pytest.approx(float(psnr(torch.as_tensor(pred), torch.as_tensor(v.hr), data_range=1.0)), abs=1e-4)
            assert row["ssim"] == pytest.approx(float(ssim(torch.as_tensor(pred), torch.as_tensor(v.hr), slice_axis=0)), abs=1e-5)
    # tricubic beats nearest on smooth data: a sanity check of the whole chain
    assert results[0].stats("psnr")[0] > results[1].stats("psnr")[0]

    meta = {"group": "test", "regions": ["volume", "head"], "ssim_window": 7, "checkpoint": "ckpt", "data": "data"}
    js, md = evaluate.write_results(results, meta, tmp_path / "eval")
    doc = json.loads(js.read_text())
    assert doc["regions"] == ["volume", "head"] and doc["methods"][0]["method"] == evaluate.TRICUBIC
    for m, r in zip(doc["methods"], results):
        vals = np.array([s["psnr"] for s in r.subjects])
        assert m["n"] == 3
        assert m["psnr_mean"] == pytest.approx(vals.mean()) and m["psnr_std"] == pytest.approx(vals.std(ddof=1))
        assert m["ssim_mean"] == pytest.approx(np.mean([s["ssim"] for s in r.subjects]))
    text = md.read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and "±" in ln]
    assert rows[0].startswith(f"| {evaluate.TRICUBIC} |") and rows[1].startswith("| nearest |")
    assert f"{doc['methods'][0]['ssim_mean']:.4f} ± {doc['methods'][0]['ssim_std']:.4f}" in rows[0]


def test_bbox_region_scores_only_the_head():
    v = paired(4)
    box = evaluate.bbox(v.mask, margin=0)
    assert v.mask[box].sum() == v.mask.sum()
    assert v.mask[box].size < v.mask.size
    with pytest.raises(ValueError, match="region 'skull'"):
        evaluate.Evaluator({}, regions=["skull"])
    hr = v.hr.copy()
    hr[:, :12] = hr[:, -12:] = 0  # a wide dark background beside the "head"
    v = dataclasses.replace(v, hr=hr, mask=(hr > 0.05).astype(np.uint8))
    row = evaluate.Evaluator({"dim": lambda v: v.hr * 0.9}, regions=["bbox"]).run([v])[0].subjects[0]
    assert row["psnr_bbox"] < row["psnr"] - 1.0  # the dark background no longer counts as perfect


def noisy_head(shape=(24, 64, 56), sigma=0.025, seed=0):
    """An ellipsoid 'head' (a bright shell around a dark ventricle) in a Rician-noise background
    whose noise crosses the 0.05 threshold often: (HR, true head)."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt((z / 0.8) ** 2 + (y / 0.6) ** 2 + (x / 0.55) ** 2)
    head = r <= 1.0
    rng = np.random.default_rng(seed)
    img = np.where(head, 0.6, 0.0) + np.where(r < 0.3, -0.5, 0.0) * head  # a dark hole inside
    noise = rng.standard_normal((2, *shape)) * sigma
    return np.abs(img + noise[0] + 1j * noise[1]).astype(np.float32), head


def test_head_mask_covers_the_head_and_not_its_noisy_background():
    hr, head = noisy_head()
    assert ((hr > 0.05) & ~head).mean() > 0.1  # the raw threshold would take much of the background
    m = evaluate.head_mask(hr)
    assert m[head].mean() == 1.0  # the whole head, its dark hole included
    far = ~ndimage.binary_dilation(head, iterations=6)  # beyond the smoothing's reach + the 3-voxel dilation
    assert not m[far].any()
    stored = head_mask_stored(hr, 0.05).astype(bool)  # preprocessing's mask: the background joins in
    assert stored[far].mean() > 0.3


def head_pair(seed: int) -> VolumePair:
    hr, _ = noisy_head(seed=seed)
    lr = kspace.degrade(hr, DegradationConfig(), None, 0)
    return VolumePair(hr, lr, np.ones_like(hr, np.uint8), np.eye(4), np.eye(4), f"h{seed}", "test", 0)


def test_head_region_scores_psnr_and_ssim_on_the_head_voxels_only():
    v = head_pair(1)
    hr = v.hr
    # wrong everywhere beyond the reach (3 voxels) of the 7x7 SSIM windows centred in the head
    reach = lambda v: ndimage.binary_dilation(evaluate.head_mask(v.hr), np.ones((1, 7, 7)))  # noqa: E731
    bad_background = lambda v: np.where(reach(v), v.hr, 1.0)  # noqa: E731
    row = evaluate.Evaluator({"m": bad_background}).run([v])[0].subjects[0]
    assert set(row) == {"subject", "lr_source", "psnr", "ssim", "psnr_head", "ssim_head", "lr_psnr"}
    assert row["psnr_head"] == float("inf") and row["ssim_head"] == pytest.approx(1.0, abs=1e-6)
    assert row["psnr"] < 10 and row["ssim"] < 0.9  # the whole volume sees the ruined background
    m = evaluate.head_mask(hr)
    noisy = hr + 0.1 * m
    got = evaluate.score(noisy, hr, voxels=m)
    assert got["psnr"] == pytest.approx(20.0, abs=1e-3)  # MSE 0.01 on the head voxels


def test_tables_report_both_regions(tmp_path):
    vols = [head_pair(s) for s in (1, 2)]
    results = evaluate.Evaluator({evaluate.TRICUBIC: lambda v: evaluate.tricubic(v.lr, v.hr.shape)}).run(vols)
    js, md = evaluate.write_results(results, {"regions": ["volume", "head"]}, tmp_path)
    m = json.loads(js.read_text())["methods"][0]
    assert {"psnr_mean", "ssim_mean", "psnr_head_mean", "ssim_head_mean", "psnr_head_std"} <= set(m)
    assert m["psnr_head_mean"] != m["psnr_mean"]
    header = next(ln for ln in md.read_text().splitlines() if ln.startswith("| Method"))
    assert header == "| Method | SSIM | PSNR (dB) | SSIM (head) | PSNR (head) (dB) | LR-consistency PSNR (dB) |"


def test_every_method_is_scored_on_the_hr_voxels_the_lr_covers():
    """An odd HR extent has no LR voxel for its last slice: a prediction of the HR grid and one of
    x2 the LR grid are both scored on the common grid; any other shape is an error naming it."""
    v = paired(6, (17, 48, 41))
    assert v.lr.shape == (8, 24, 20)
    grid = (slice(0, 16), slice(0, 48), slice(0, 40))
    ev = evaluate.Evaluator({"hr grid": lambda v: evaluate.tricubic(v.lr, v.hr.shape),
                             "x2 lr": lambda v: evaluate.tricubic(v.lr)})
    a, b = (r.subjects[0] for r in ev.run([v]))
    want = {"subject": v.subject, "lr_source": "synthetic", **evaluate.score(evaluate.tricubic(v.lr)[grid], v.hr[grid])}
    assert a == b and {k: a[k] for k in want} == want
    assert set(a) == set(want) | {"psnr_head", "ssim_head"} | set(evaluate.LR_SCORES)
    with pytest.raises(ValueError, match=r"prediction \(8, 24, 20\)"):
        evaluate.Evaluator({"lr": lambda v: v.lr}).run([v])


RANK_SCRIPT = """
import json, os, sys
from pathlib import Path
import torch.distributed as td
from hpc.dist import Dist
from udean.evaluate import Evaluator, tricubic
td.init_process_group("gloo")  # torchrun's environment; hpc.dist.init would also bring up DeepSpeed
dist = Dist(rank=td.get_rank(), world_size=td.get_world_size(), _torch_dist=td)
scored = []
def tri(v):
    scored.append(v.subject)
    return tricubic(v.lr, v.hr.shape)
paths = sorted(Path(sys.argv[1]).glob("*.h5"))
rows = Evaluator({"tricubic": tri}).run(paths, dist)[0].subjects
Path(sys.argv[1], f"rank{dist.rank}.json").write_text(json.dumps({"scored": scored, "rows": rows}))
dist.shutdown()
"""


def test_ranks_score_disjoint_volumes_and_every_rank_gets_all_rows(tmp_path):
    """torchrun, 2 ranks (gloo): rank r scores volumes r, r + 2, ...; every rank returns every row,
    in volume order, equal to one process scoring them all."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from preprocessing.shards import write_volume

    vols = [paired(s, (8, 24, 20)) for s in (1, 2, 5)]
    for v in vols:
        write_volume(tmp_path / f"{v.subject}.h5", v, StorageConfig())
    (tmp_path / "ranks.py").write_text(RANK_SCRIPT)
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(tmp_path / "ranks.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    single = evaluate.Evaluator({"tricubic": lambda v: evaluate.tricubic(v.lr, v.hr.shape)}).run(vols)[0].subjects
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["scored"] == [v.subject for v in vols[rank::2]]
        assert got["rows"] == single


def _write_dataset(root, vols):
    from preprocessing.manifest import Manifest, ShardRow, SubjectRow, write_manifest
    from preprocessing.shards import relpath, write_volume
    from preprocessing.subject import shard_file

    rows = []
    for v in vols:
        path = shard_file(root, "test", v.subject)
        write_volume(path, v, StorageConfig())
        rows.append(ShardRow(relpath(root, path), "test", v.subject, "volume", "", 0, path.stat().st_size))
    write_manifest(Manifest(root, {}, "", [SubjectRow(v.subject, "test", "", "ok") for v in vols], rows))


def _write_checkpoint(run_dir, cfg):
    from udean.checkpoint import save_best
    from udean.config import save
    from udean.models.udean import build, inference_state_dict

    torch.manual_seed(0)
    gen, _ = build(cfg.model, cfg.data.patches.slab)
    save(cfg, run_dir / "config.yaml")
    save_best(run_dir, inference_state_dict(gen), {"config": cfg.to_dict(), "epoch": 0})


def test_evaluate_cli_writes_json_markdown_and_figure(tmp_path):
    from udean.cli import main

    cfg = load("tiny")
    _write_dataset(tmp_path / "data", [paired(s, (16, 40, 36)) for s in (7, 8)])
    _write_checkpoint(tmp_path / "run", cfg)
    rc = main(["evaluate", "--config", "tiny", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
               "--out", str(tmp_path / "eval"), "--device", "cpu", "--save-volumes"])
    assert rc == 0
    doc = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [m["method"] for m in doc["methods"]] == [evaluate.TRICUBIC, evaluate.SKIP, evaluate.UDEAN]
    assert all(m["n"] == 2 and np.isfinite(m["psnr_mean"]) and -1 <= m["ssim_mean"] <= 1 for m in doc["methods"])
    # an untrained network (zero-initialised residual) is exactly its image skip: same scores
    skip, ours = doc["methods"][1], doc["methods"][2]
    assert skip["subjects"] == ours["subjects"]
    assert (tmp_path / "eval" / "results.md").read_text().count("±") >= 4
    png = tmp_path / "eval" / "fig_s07.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import nibabel as nib

    sr = nib.load(tmp_path / "eval" / "volumes" / "s07_sr.nii.gz")
    assert sr.shape == (16, 40, 36)
    np.testing.assert_array_equal(sr.get_fdata(), nib.load(tmp_path / "eval" / "volumes" / "s07_skip.nii.gz").get_fdata())
    np.testing.assert_allclose(sr.header.get_zooms(), [0.7] * 3, atol=1e-6)


def test_evaluate_cli_missing_manifest_is_one_clear_error(tmp_path, capsys):
    from udean.cli import main

    _write_checkpoint(tmp_path / "run", load("tiny"))
    rc = main(["evaluate", "--config", "tiny", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "nodata"),
               "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert rc == 2
    err = "".join(capsys.readouterr().err.split())  # rich wraps long lines (also inside paths)
    assert "manifest.json:missing" in err and "Traceback" not in err


def test_evaluate_writes_into_the_checkpoints_own_run_and_holds_its_lock(tmp_path, capsys, monkeypatch):
    """`udean evaluate --checkpoint RUN` (any --config) scores the data RUN trained on and writes
    RUN/eval, not the config's train.out; a second writer of that folder is refused naming the first."""
    from hpc.lock import folder_lock
    from udean.cli import main

    run = tmp_path / "mine" / "run"
    cfg = load("tiny", [f"data.out={tmp_path / 'mine' / 'data'}", f"train.out={run}"])
    _write_dataset(tmp_path / "mine" / "data", [paired(s, (16, 40, 36)) for s in (7, 8)])
    _write_checkpoint(run, cfg)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where the tiny config's own train.out (tiny_out/run) would be
    for ckpt in (run, run / "best", run / "best" / "generator.pt"):
        rc = main(["evaluate", "--config", "tiny", "--checkpoint", str(ckpt), "--device", "cpu", "--figures", "0"])
        assert rc == 0, capsys.readouterr().err
        assert json.loads((run / "eval" / "results.json").read_text())["data"] == str(tmp_path / "mine" / "data")
        (run / "eval" / "results.json").unlink()
    assert not any((tmp_path / "elsewhere").iterdir())
    capsys.readouterr()
    with folder_lock(run / "eval", "udean evaluate"):
        rc = main(["evaluate", "--config", "tiny", "--checkpoint", str(run), "--device", "cpu", "--figures", "0"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "is being written by udean evaluate" in err and not (run / "eval" / "results.json").exists()


def test_a_warning_when_sr_scores_below_tricubic():
    def result(name, psnr, head, source="synthetic"):
        return evaluate.MethodResult(name, [{"subject": "a", "lr_source": source, "psnr": psnr, "psnr_head": head}])

    ok = [result(evaluate.TRICUBIC, 24.0, 20.0), result(evaluate.UDEAN, 23.0, 20.5)]
    assert evaluate.below_tricubic(ok) is None  # the head decides where it is scored
    worse = [result(evaluate.TRICUBIC, 24.0, 20.5), result(evaluate.UDEAN, 25.0, 20.3)]
    text = evaluate.below_tricubic(worse)
    assert "below tricubic interpolation in the head (20.30 vs 20.50 dB PSNR)" in text and "best.json" in text
    assert "this LR is synthetic" in evaluate.below_tricubic(worse, own=True)
