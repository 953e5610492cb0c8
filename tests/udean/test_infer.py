"""Sliding-window inference: known operators, coverage, geometry (nibabel), bad inputs."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from udean import infer
from udean.config import load

WINDOW = dict(overlap=0.25, slab_overlap=None, batch_size=8)


def nearest_x2(x: torch.Tensor) -> torch.Tensor:
    """Exact x2 nearest upsampling along every axis: (B, S, h, w) -> (B, 2S, 2h, 2w)."""
    return x.repeat_interleave(2, 1).repeat_interleave(2, 2).repeat_interleave(2, 3)


def whole_volume_nearest(lr: np.ndarray) -> np.ndarray:
    return lr.repeat(2, 0).repeat(2, 1).repeat(2, 2)


@pytest.mark.parametrize("shape,slab,patch,overlap,slab_overlap", [
    ((7, 19, 23), 3, (8, 8), 0.25, 1),   # odd sizes: last tile shifted inward on every axis
    ((3, 8, 8), 3, (8, 8), 0.5, 2),      # exactly one patch
    ((10, 33, 17), 1, (16, 5), 0.0, 0),  # no overlap, single-slice slabs
    ((9, 20, 20), 3, (7, 9), 0.6, 1),
])
def test_tiling_reproduces_whole_volume_operator(shape, slab, patch, overlap, slab_overlap):
    rng = np.random.default_rng(0)
    lr = rng.random(shape, dtype=np.float32)
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return nearest_x2(x)

    sr = infer.sliding_window(lr, model, slab=slab, patch=patch, overlap=overlap,
                              slab_overlap=slab_overlap, batch_size=5)
    assert sr.shape == tuple(2 * n for n in shape) and sr.dtype == np.float32
    np.testing.assert_allclose(sr, whole_volume_nearest(lr), rtol=0, atol=1e-6)  # no seams anywhere
    assert sum(calls) == infer.tile_count(shape, slab, patch, overlap, slab_overlap)
    assert max(calls) <= 5


def test_every_voxel_written_and_weights_normalised():
    # a model that outputs ones: the blended result must be exactly one everywhere
    # (a voxel no tile covers would be 0/0; a wrong normalisation would show as != 1)
    lr = np.zeros((8, 21, 30), np.float32)
    sr = infer.sliding_window(lr, lambda x: torch.ones(x.shape[0], 2 * x.shape[1], 2 * x.shape[2], 2 * x.shape[3]),
                              slab=3, patch=(10, 10), overlap=0.3, slab_overlap=1, batch_size=8)
    np.testing.assert_allclose(sr, 1.0, atol=1e-6)


def test_blending_is_smooth_across_tile_borders():
    # a model whose output depends on the tile (an offset per call): the blend must be a
    # weighted average, never a hard switch between neighbouring tiles
    lr = np.zeros((3, 8, 40), np.float32)
    offsets = iter(range(100))

    def model(x):
        return torch.stack([torch.full((6, 16, 16), float(next(offsets))) for _ in range(x.shape[0])])

    sr = infer.sliding_window(lr, model, slab=3, patch=(8, 8), overlap=0.5, slab_overlap=0, batch_size=1)
    profile = sr[0, 0]
    assert np.abs(np.diff(profile)).max() < 0.5  # tile values step by 1; blended steps are smaller


def test_inferer_is_configured_once_from_the_infer_section_and_clips_to_the_data_range():
    cfg = load("tiny", ["infer.overlap=0.5", "infer.batch_size=3"])
    inf = infer.Inferer.from_config(cfg.infer, cfg.data.patches, "cpu")
    assert inf.settings() == {"slab": 3, "patch": [16, 16], "overlap": 0.5, "slab_overlap": 2,  # null: slab - 1
                              "lr_consistency": 0.0}
    lr = np.random.default_rng(2).random((5, 20, 24), dtype=np.float32)
    calls = []

    def bright(x):  # nearest x2, then out of the [0, 1] range the network was trained on
        calls.append(x.shape[0])
        return 2 * nearest_x2(x) - 0.5

    sr = inf(lr, bright)
    np.testing.assert_allclose(sr, np.clip(2 * whole_volume_nearest(lr) - 0.5, 0, 1), atol=1e-6)
    assert sum(calls) == inf.tiles(lr.shape) and max(calls) == 3
    with pytest.raises(ValueError, match="slab_overlap must be in"):
        infer.Inferer.from_config(load("tiny", ["infer.slab_overlap=3"]).infer, cfg.data.patches, "cpu")


def test_lr_consistency_makes_the_tiled_sr_keep_the_lr_band_before_clipping():
    from preprocessing.kspace import lr_consistent

    cfg = load("tiny", ["infer.lr_consistency=0.5"])
    inf = infer.Inferer.from_config(cfg.infer, cfg.data.patches, "cpu")
    assert inf.settings()["lr_consistency"] == 0.5
    lr = np.random.default_rng(4).random((6, 20, 24), dtype=np.float32)

    def dim(x):  # nearest x2, 20 % too dark: its low band is not the LR's
        return 0.8 * nearest_x2(x)

    sr = inf(lr, dim)
    plain = 0.8 * whole_volume_nearest(lr)
    np.testing.assert_allclose(sr, np.clip(lr_consistent(plain, lr, 0.5), 0, 1), atol=1e-5)
    assert abs(sr.mean() - lr.mean()) < 0.01 < abs(plain.mean() - lr.mean())  # the LR's brightness, kept
    with pytest.raises(Exception, match="less than or equal to 0.8"):
        load("tiny", ["infer.lr_consistency=0.9"])


def test_batch_size_0_is_sized_to_the_device_and_cudnn_benchmark_is_set_while_tiling():
    cfg = load("tiny")  # infer.batch_size: 0, infer.cudnn_benchmark: null
    assert cfg.infer.batch_size == 0
    inf = infer.Inferer.from_config(cfg.infer, cfg.data.patches, "cpu")
    lr = np.random.default_rng(3).random((6, 40, 40), dtype=np.float32)
    calls, bench = [], []

    def model(x):
        calls.append(x.shape[0])
        bench.append(torch.backends.cudnn.benchmark)
        return nearest_x2(x)

    before = torch.backends.cudnn.benchmark
    np.testing.assert_allclose(inf(lr, model), whole_volume_nearest(lr), atol=1e-6)
    assert inf.tiles(lr.shape) > infer.CPU_TILE_BATCH and max(calls) == infer.CPU_TILE_BATCH == 8  # CPU: 8
    assert all(bench) and torch.backends.cudnn.benchmark == before  # on while tiling, restored after
    torch.use_deterministic_algorithms(True)
    try:
        bench.clear()
        inf(lr, model)
        assert not any(bench)  # null: off under torch's deterministic mode (train.deterministic)
    finally:
        torch.use_deterministic_algorithms(False)
    bench.clear()
    infer.Inferer.from_config(load("tiny", ["infer.cudnn_benchmark=false"]).infer, cfg.data.patches, "cpu")(lr, model)
    assert not any(bench)


def test_tiles_per_batch_fills_a_share_of_the_free_memory():
    gib, mib = 2**30, 2**20
    assert infer.tiles_per_batch(8 * gib, 64 * mib) == 64  # MEMORY_SHARE 0.5 of 8 GiB / 64 MiB
    assert infer.tiles_per_batch(80 * gib, 10 * mib) == infer.MAX_TILE_BATCH  # a big GPU: capped
    assert infer.tiles_per_batch(50 * mib, 64 * mib) == 1  # never 0
    assert infer.tiles_per_batch(gib, 0) == infer.MAX_TILE_BATCH


def test_tile_starts_cover_and_stay_inside():
    for n in range(4, 40):
        for size in range(1, n + 1):
            for stride in sorted({1, min(2, size), size}):  # stride <= size: overlap >= 0
                s = infer.tile_starts(n, size, stride)
                covered = np.zeros(n, bool)
                for a in s:
                    assert 0 <= a and a + size <= n
                    covered[a:a + size] = True
                assert covered.all()


@pytest.mark.parametrize("shape,msg", [((2, 16, 16), "smaller than one patch"), ((3, 16, 7), "axis 2: 7 < 8"),
                                       ((3, 16), "3D")])
def test_volume_too_small_or_not_3d(shape, msg):
    with pytest.raises(ValueError, match=msg):
        infer.sliding_window(np.zeros(shape, np.float32), nearest_x2, slab=3, patch=(8, 8), **WINDOW)


def test_nan_volume_rejected():
    lr = np.zeros((3, 8, 8), np.float32)
    lr[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        infer.sliding_window(lr, nearest_x2, slab=3, patch=(8, 8), **WINDOW)


def test_model_with_wrong_output_shape_rejected():
    with pytest.raises(ValueError, match="expected"):
        infer.sliding_window(np.zeros((3, 8, 8), np.float32), lambda x: x, slab=3, patch=(8, 8), **WINDOW)


# --------------------------------------------------------------------------- geometry
def test_sr_affine_inverts_the_degradation_geometry():
    # preprocessing/kspace.py: lr_affine = hr_affine @ diag(2, 2, 2, 1)
    rng = np.random.default_rng(1)
    hr_affine = np.eye(4)
    hr_affine[:3, :3] = rng.normal(size=(3, 3)) * 0.7
    hr_affine[:3, 3] = rng.normal(size=3) * 50
    lr_affine = hr_affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    np.testing.assert_allclose(infer.sr_affine(lr_affine), hr_affine, atol=1e-12)


def _lr_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    return img


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PIR", "SLA"])
def test_written_sr_overlays_the_input_in_world_space(tmp_path, axcodes):
    """The SR volume written from an LR NIfTI in any orientation keeps the input's voxel order,
    halves the voxel size, and puts SR voxel i (canonical order, where the network ran) at the
    world position of canonical LR continuous index i / 2."""
    rng = np.random.default_rng(2)
    shape = (6, 10, 12)
    # an oblique LR affine, voxel 1.4 mm, stored in the orientation `axcodes`
    ras = np.diag([1.4, 1.4, 1.4, 1.0])
    ras[:3, 3] = [-20.0, 35.0, 7.5]
    ras[:3, :3] = nib.eulerangles.euler2mat(0.05, -0.03, 0.02) @ ras[:3, :3]
    canon = rng.random(shape).astype(np.float32)
    to_axcodes = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                                 nib.orientations.axcodes2ornt(axcodes))
    data = nib.orientations.apply_orientation(canon, to_axcodes)
    affine = ras @ nib.orientations.inv_ornt_aff(to_axcodes, shape)
    src = tmp_path / f"lr_{axcodes}.nii.gz"
    nib.save(_lr_image(data, affine), src)

    lr, canon_affine, original, _, _ = infer.read_lr_nifti(src)
    np.testing.assert_allclose(canon_affine, ras, atol=1e-5)
    np.testing.assert_allclose(lr, (canon - canon.min()) / np.ptp(canon), atol=1e-6)  # [0, 1] scaling
    sr = lr.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    out = tmp_path / "sr.nii.gz"
    infer.write_sr_nifti(sr, canon_affine, original, out)

    img = nib.load(out)  # nibabel reads it back
    assert nib.aff2axcodes(img.affine) == tuple(axcodes)  # the input's voxel order
    assert img.shape == tuple(2 * n for n in data.shape)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.header.get_zooms(), [0.7, 0.7, 0.7], atol=1e-5)
    assert int(img.header["qform_code"]) > 0 and int(img.header["sform_code"]) > 0
    np.testing.assert_allclose(img.header.get_qform(), img.affine, atol=1e-4)
    np.testing.assert_allclose(img.header.get_sform(), img.affine, atol=1e-6)
    # world position of every SR voxel centre, looked up through the written file
    canon_out = nib.as_closest_canonical(img)
    np.testing.assert_allclose(canon_out.get_fdata(), sr, atol=1e-6)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in sr.shape], indexing="ij"), -1).reshape(-1, 3)
    world_sr = nib.affines.apply_affine(canon_out.affine, idx)
    world_lr = nib.affines.apply_affine(ras, idx / 2.0)
    np.testing.assert_allclose(world_sr, world_lr, atol=1e-4)



# --------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_one_clear_error(tmp_path):
    not_nifti = tmp_path / "notes.nii.gz"
    not_nifti.write_bytes(gzip.compress(b"hello, not an image" * 40))
    with pytest.raises(ValueError, match="not a NIfTI"):
        infer.read_lr_nifti(not_nifti)

    four_d = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 2), np.float32), np.eye(4)), four_d)
    with pytest.raises(ValueError, match="3D"):
        infer.read_lr_nifti(four_d)

    nan = tmp_path / "nan.nii.gz"
    d = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    d[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(d, np.eye(4)), nan)
    with pytest.raises(ValueError, match="NaN"):
        infer.read_lr_nifti(nan)

    with pytest.raises(FileNotFoundError):
        infer.read_lr_nifti(tmp_path / "missing.nii.gz")

    # a voxel size the checkpoint's LR grid does not allow (preprocessing.nifti.scan_spec)
    from preprocessing.nifti import ScanSpec

    coarse = tmp_path / "coarse.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((8, 8, 8)).astype(np.float32), np.diag([4.0, 4, 4, 1])),
             coarse)
    with pytest.raises(ValueError, match="2.86x off the LR grid of 1.4 mm"):
        infer.read_lr_nifti(coarse, ScanSpec("LR", 1.4, 0.1, 1.5))


# --------------------------------------------------------------------------- the CLI
def _checkpoint(run_dir):
    from udean.checkpoint import save_best
    from udean.config import load, save
    from udean.models.udean import build, inference_state_dict

    cfg = load("tiny")
    torch.manual_seed(0)
    gen, _ = build(cfg.model, cfg.data.patches.slab)
    save_best(run_dir, inference_state_dict(gen), {"psnr": 0.0})
    save(cfg, run_dir / "best" / "config.yaml")  # where udean.train puts the config of best/
    return gen.eval(), cfg


def test_infer_cli_matches_the_network_and_writes_the_sr_geometry(tmp_path):
    from udean.cli import main

    gen, cfg = _checkpoint(tmp_path / "run")
    rng = np.random.default_rng(3)
    lr = (200 + 800 * rng.random((5, 20, 18))).astype(np.float32)  # scanner units
    aff = np.diag([1.4, 1.4, 1.4, 1.0])
    aff[:3, 3] = [-10, 20, -30]
    nib.save(_lr_image(lr, aff), tmp_path / "lr.nii.gz")
    for flag, out in (([], "sr.nii.gz"), (["--keep-normalised"], "sr01.nii")):
        rc = main(["infer", "--checkpoint", str(tmp_path / "run"), str(tmp_path / "lr.nii.gz"), str(tmp_path / out),
                   "--device", "cpu", "--batch-size", "3", *flag])
        assert rc == 0
    img = nib.load(tmp_path / "sr.nii.gz")
    assert img.shape == (10, 40, 36)
    np.testing.assert_allclose(img.affine, infer.sr_affine(aff), atol=1e-5)
    # the sliding window of the CLI's config (default recommended: its LR consistency included)
    want = infer.Inferer.from_config(load("recommended").infer, cfg.data.patches, "cpu")(
        (lr - lr.min()) / np.ptp(lr), gen.sr)
    # the paper protocol's min-max scaling of the input, inverted: the input's units
    np.testing.assert_allclose(img.get_fdata(), want * np.ptp(lr) + lr.min(), rtol=1e-5, atol=2e-3)
    np.testing.assert_allclose(nib.load(tmp_path / "sr01.nii").get_fdata(), want, atol=1e-5)


def test_infer_folder_one_model_load_bad_file_skipped_exit_1(tmp_path, capsys, monkeypatch):
    from udean.cli import main

    _checkpoint(tmp_path / "run")
    rng = np.random.default_rng(4)
    (tmp_path / "in").mkdir()
    for name, shape, voxel in (("a.nii.gz", (5, 20, 18), 1.4), ("b.nii", (4, 18, 20), 1.4),
                               ("c_resampled.nii.gz", (5, 18, 18), 1.6), ("d_4x.nii.gz", (3, 8, 8), 2.8)):
        nib.save(_lr_image((100 * rng.random(shape)).astype(np.float32), np.diag([voxel] * 3 + [1.0])),
                 tmp_path / "in" / name)
    (tmp_path / "in" / "notes.txt").write_text("not a scan")
    (tmp_path / "in" / "e_text.nii.gz").write_text("not an image")
    loads = []
    real = infer.load_sr_model
    monkeypatch.setattr(infer, "load_sr_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    rc = main(["infer", "--checkpoint", str(tmp_path / "run" / "best"), str(tmp_path / "in"), str(tmp_path / "out"),
               "--device", "cpu"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 1 and len(loads) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "b.nii", "c_resampled.nii.gz"]
    assert "d_4x.nii.gz: voxel size (2.8 x 2.8 x 2.8) mm is 2.00x off the LR grid of 1.4 mm" in err
    assert "e_text.nii.gz: not a gzip" in err and "3 of 5 scans super-resolved, 2 failed" in err
    # the resampled input: onto the 1.4 mm training LR grid, then x2: 0.7 mm, the field of view kept
    c = nib.load(tmp_path / "out" / "c_resampled.nii.gz")
    np.testing.assert_allclose(c.header.get_zooms(), [0.7] * 3, atol=1e-6)
    assert c.shape == (2 * round(5 * 1.6 / 1.4), 2 * round(18 * 1.6 / 1.4), 2 * round(18 * 1.6 / 1.4))


def test_infer_refuses_an_output_that_is_its_input_before_loading_the_model(tmp_path, capsys):
    import os

    from udean.cli import main

    lr = tmp_path / "in" / "a.nii.gz"
    lr.parent.mkdir()
    nib.save(_lr_image(np.ones((5, 20, 18), np.float32) * np.arange(18), np.diag([1.4] * 3 + [1.0])), lr)
    before = lr.read_bytes()
    os.symlink(lr, tmp_path / "link.nii.gz")
    os.link(lr, tmp_path / "hard.nii.gz")
    os.symlink(tmp_path / "in", tmp_path / "in_link")
    (tmp_path / "afile").write_text("x")
    cases = [(lr, lr, "is the input"), (lr, tmp_path / "link.nii.gz", "is the input"),
             (lr, tmp_path / "hard.nii.gz", "is the input"), (lr, tmp_path / "in", "is the input"),  # in/a.nii.gz
             (tmp_path / "in", tmp_path / "in", "is the input folder"),
             (tmp_path / "in", tmp_path / "in_link", "is the input folder"),
             (tmp_path / "in", tmp_path / "afile", "is a file"),
             (lr, tmp_path / "sr.txt", "must be a .nii or .nii.gz"),
             (lr, tmp_path / "afile" / "sr.nii.gz", "cannot write"),
             (tmp_path / "missing", tmp_path / "o", "no such file")]
    for src, dst, text in cases:
        # the checkpoint does not exist: every refusal comes before the model is looked for
        rc = main(["infer", "--checkpoint", str(tmp_path / "nothing"), str(src), str(dst)])
        err = " ".join(capsys.readouterr().err.split())
        assert rc == 2 and text in err and "Traceback" not in err, (src, dst, err)
    assert lr.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.nii.gz"]
    # a file into an existing folder: OUT/<input name>
    _checkpoint(tmp_path / "run")
    (tmp_path / "o").mkdir()
    assert main(["infer", "--checkpoint", str(tmp_path / "run"), str(lr), str(tmp_path / "o"), "--device", "cpu"]) == 0
    assert nib.load(tmp_path / "o" / "a.nii.gz").shape == (10, 40, 36)


def test_infer_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    from udean.cli import main

    _checkpoint(tmp_path / "run")
    nib.save(_lr_image(np.ones((3, 8, 8), np.float32) * np.arange(8), np.eye(4)), tmp_path / "small.nii.gz")
    rc = main(["infer", "--checkpoint", str(tmp_path / "run"), str(tmp_path / "small.nii.gz"), str(tmp_path / "sr.nii.gz"),
               "--device", "cpu"])
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert rc == 2 and "smaller than one patch" in err and "Traceback" not in err
    assert not (tmp_path / "sr.nii.gz").exists()
    (tmp_path / "text.nii.gz").write_text("not an image")
    rc = main(["infer", "--checkpoint", str(tmp_path / "run"), str(tmp_path / "text.nii.gz"), str(tmp_path / "sr.nii.gz")])
    assert rc == 2 and "not a gzip" in " ".join(capsys.readouterr().err.split())
    rc = main(["infer", "--checkpoint", str(tmp_path / "nothing"), str(tmp_path / "small.nii.gz"), str(tmp_path / "sr.nii.gz")])
    assert rc == 2 and "no inference checkpoint" in " ".join(capsys.readouterr().err.split())


def test_extrapolated_last_voxel_of_a_tile_never_reaches_the_output_inside_the_volume():
    """The last HR voxel of a tile on each axis lies beyond the tile's last LR voxel; a model that
    gets it wrong (here: 100 instead of the nearest value) must not leak into the blended volume
    except on the volume's own last HR voxel of that axis, which no other tile covers."""
    rng = np.random.default_rng(1)
    lr = rng.random((7, 19, 23), dtype=np.float32)

    def model(x):
        y = nearest_x2(x).clone()
        y[:, -1], y[:, :, -1], y[:, :, :, -1] = 100.0, 100.0, 100.0
        return y

    sr = infer.sliding_window(lr, model, slab=3, patch=(8, 8), overlap=0.25, slab_overlap=1, batch_size=8)
    want = whole_volume_nearest(lr)
    np.testing.assert_allclose(sr[:-1, :-1, :-1], want[:-1, :-1, :-1], rtol=0, atol=1e-5)
    assert np.all(sr[-1] > 99.0)  # the volume's last slice: only one tile sees it
    wins = infer.tile_windows(infer.tile_starts(19, 8, 6), 8)
    assert [w[-1] == 0 for w in wins] == [True, True, False] and all((w[:-1] > 0).all() for w in wins)
