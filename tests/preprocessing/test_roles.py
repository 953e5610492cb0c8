"""Own data by role (data.own): discovery and its errors, the role grids (resampling, refusal),
robust intensity scaling, paired val/test volumes; and the paper protocol's data config
unchanged. The scans are a smooth head defined in world millimetres, sampled on each scan's
own grid: HR and LR of one "subject" show the same object whatever their orientation or field
of view. The LR degradation (a Gaussian PSF, 2 mm sampling, Rician noise) is one the code does
not implement."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from preprocessing import geometry, intensity, nifti
from preprocessing.config import DataConfig, OwnDataConfig
from preprocessing.discover import plan
from preprocessing.manifest import SubjectRow
from preprocessing.shards import read_volume
from preprocessing.subject import process


# --------------------------------------------------------------------------- scans (also used by tests/udean)
def head(world: np.ndarray) -> np.ndarray:
    """(N, 3) world mm -> (N,) intensity in scanner units (about 0..900): a smooth skull-like
    shell around textured tissue, centred at the origin."""
    d = ((world / np.array([21.0, 24.0, 19.0])) ** 2).sum(1)
    envelope = 1 / (1 + np.exp((d - 1) * 12))
    inner = 1 / (1 + np.exp((d - 0.55) * 20))
    texture = (0.5 + 0.25 * np.sin(world[:, 0] / 3.1) * np.cos(world[:, 1] / 4.3)
               + 0.25 * np.sin(world[:, 2] / 2.7 + world[:, 0] / 5))
    return 900 * envelope * (0.45 + 0.55 * inner * texture)


def ras_affine(shape, voxel, rotation=(0.0, 0.0, 0.0), centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Voxel -> world of a grid of `shape` and `voxel` mm (scalar or per axis), rotated (Euler
    angles, radians: oblique), its middle at `centre`."""
    a = np.diag([*np.broadcast_to(np.asarray(voxel, float), (3,)), 1.0])
    a[:3, :3] = nib.eulerangles.euler2mat(*rotation) @ a[:3, :3]
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return a


def sample(shape, affine, psf_sigma_mm: float = 0.0) -> np.ndarray:
    """The head on a grid; `psf_sigma_mm` > 0: blurred by an isotropic Gaussian PSF (3^3-point
    quadrature in world space)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    if psf_sigma_mm <= 0:
        return head(world).reshape(shape)
    offsets = np.array([-1.2, 0.0, 1.2]) * psf_sigma_mm
    w = np.exp(-0.5 * (offsets / psf_sigma_mm) ** 2)
    w /= w.sum()
    out = np.zeros(len(world))
    for i, a in enumerate(offsets):
        for j, b in enumerate(offsets):
            for k, c in enumerate(offsets):
                out += w[i] * w[j] * w[k] * head(world + np.array([a, b, c]))
    return out.reshape(shape)


def write_scan(path: Path, shape, voxel, *, axcodes: str = "RAS", rotation=(0.0, 0.0, 0.0), centre=(0, 0, 0),
               lr: bool = False, seed: int = 0, dtype=np.int16) -> Path:
    """One scan as a scanner writes it: int16, stored in `axcodes` order (LPS, PIR, ...), with
    qform and sform. lr=True: Gaussian PSF (sigma 0.9 mm) + Rician noise (sigma 12), the
    authentic-LR stand-in."""
    ras = ras_affine(shape, voxel, rotation, centre)
    data = sample(shape, ras, 0.9 if lr else 0.0)
    if lr:
        rng = np.random.default_rng(seed)
        data = np.sqrt((data + rng.normal(0, 12, data.shape)) ** 2 + rng.normal(0, 12, data.shape) ** 2)
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(axcodes))
    data = nib.orientations.apply_orientation(data, ornt)
    affine = ras @ nib.orientations.inv_ornt_aff(ornt, shape)
    img = nib.Nifti1Image(np.round(data).astype(dtype), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def own_config(tmp_path: Path, **own) -> DataConfig:
    return DataConfig(out=str(tmp_path / "out"), voxel_size_mm=1.0,
                      patches={"lr_size": (16, 16), "stride": (8, 8), "max_per_subject": 8, "min_foreground": 0.1},
                      own=OwnDataConfig(**own))


# --------------------------------------------------------------------------- the paper protocol unchanged
def test_a_data_config_without_own_scans_dumps_and_hashes_as_before():
    # the hash every existing data set's manifest carries (computed before data.own existed)
    d = DataConfig()
    assert "own" not in d.model_dump(mode="json")
    assert d.hash() == "d3c8ce7498dd72c1462b70dab3e62f93fb5f232fa03e318ce218ef771ac090b8"
    assert SubjectRow("a", "val", "x").to_dict().keys() == {"id", "group", "input", "status", "error", "shards",
                                                             "patches", "motion", "seconds"}
    with_own = DataConfig(own={"hr": "a", "lr": "b"})
    assert with_own.model_dump(mode="json")["own"]["hr"] == "a" and with_own.hash() != d.hash()


@pytest.mark.parametrize("own,text", [({"hr": "a"}, "hr and lr go together"),
                                      ({"hr": "a", "lr": "b", "val_hr": "c"}, "val_hr and val_lr go together"),
                                      ({"hr": "a", "lr": "b", "percentiles": (99, 1)}, "percentiles"),
                                      ({"hr": "a", "lr": "b", "dataset": "d.json"}, "not both")])
def test_bad_own_keys_are_one_clear_error(own, text):
    with pytest.raises(ValueError, match=text):
        DataConfig(own=own)
    with pytest.raises(ValueError, match="unpaired"):
        DataConfig(mode="misaligned", own={"hr": "a", "lr": "b"})


# --------------------------------------------------------------------------- discovery by role
def _files(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"x")


def test_roles_become_groups_with_held_out_hr_and_lr_only_val(tmp_path):
    _files(tmp_path / "hr", [f"h{i}.nii.gz" for i in range(5)] + ["notes.txt"])
    _files(tmp_path / "lr", [f"l{i}.nii" for i in range(3)])
    subs = {s.id: s for s in plan(own_config(tmp_path, hr=str(tmp_path / "hr"), lr=str(tmp_path / "lr")))}
    groups = sorted(s.group for s in subs.values())
    assert groups == ["source"] * 3 + ["target"] * 3 + ["test", "val"]
    assert all(s.input.endswith(".nii.gz") for s in subs.values() if s.group != "target")
    assert sum(s.lr_val for s in subs.values()) == 1 and all(s.group == "target" for s in subs.values() if s.lr_val)
    assert not any(s.error for s in subs.values())
    again = {s.id: s for s in plan(own_config(tmp_path, hr=str(tmp_path / "hr"), lr=str(tmp_path / "lr")))}
    assert again == subs  # seeded
    none = plan(own_config(tmp_path, hr=str(tmp_path / "hr"), lr=str(tmp_path / "lr"), held_out=(0, 0), lr_val=0))
    assert sorted(s.group for s in none) == ["source"] * 5 + ["target"] * 3
    with pytest.raises(ValueError, match="leave none for training"):
        plan(own_config(tmp_path, hr=str(tmp_path / "hr"), lr=str(tmp_path / "lr"), held_out=(3, 2)))


def test_paired_folders_match_by_name_and_a_bad_name_fails_alone(tmp_path):
    _files(tmp_path / "hr", ["a.nii.gz", "b.nii.gz", "both.nii.gz"])
    _files(tmp_path / "lr", ["c.nii.gz", "both.nii.gz"])
    _files(tmp_path / "thr", ["p.nii.gz", "q.nii.gz", "has space.nii.gz"])
    _files(tmp_path / "tlr", ["p.nii.gz", "q.nii"])
    cfg = own_config(tmp_path, hr=str(tmp_path / "hr"), lr=str(tmp_path / "lr"), test_hr=str(tmp_path / "thr"),
                     test_lr=str(tmp_path / "tlr"), held_out=(0, 0))
    subs = {s.id: s for s in plan(cfg)}
    assert subs["p"].group == "test" and subs["p"].lr_input == str(tmp_path / "tlr" / "p.nii.gz") and not subs["p"].error
    assert subs["q"].lr_input.endswith("q.nii")
    # the same name in two roles: one subject, failed, naming both files
    both = subs["both"]
    assert str(tmp_path / "hr" / "both.nii.gz") in both.error and str(tmp_path / "lr" / "both.nii.gz") in both.error
    assert "unique across roles" in both.error
    assert "not usable as a file name" in subs["has space"].error and str(tmp_path / "thr" / "has space.nii.gz") in subs["has space"].error
    assert [s.id for s in subs.values() if s.error] == ["both", "has space"]
    # failed at once by `process`, naming the file; nothing written
    res = process(both, cfg, tmp_path / "out")
    assert res.row.status == "failed" and res.row.error == both.error and not res.shards
    # a missing partner
    (tmp_path / "tlr" / "q.nii").unlink()
    q = {s.id: s for s in plan(cfg)}["q"]
    assert "no file named q in data.own.test_lr" in q.error and str(tmp_path / "thr" / "q.nii.gz") in q.error


def test_folder_errors_stop_the_job_naming_the_folder(tmp_path):
    _files(tmp_path / "hr", ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"data.own.lr .*empty: no NIfTI files"):
        plan(own_config(tmp_path, hr=str(tmp_path / "hr"), lr=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="is not a folder"):
        plan(own_config(tmp_path, hr=str(tmp_path / "hr"), lr=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="data.own.hr and data.own.lr are the same folder"):
        plan(own_config(tmp_path, hr=str(tmp_path / "hr"), lr=str(tmp_path / "hr" / ".")))


def test_dataset_json_names_the_roles(tmp_path):
    _files(tmp_path / "d" / "images_hr", ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    _files(tmp_path / "d" / "images_lr", ["x.nii.gz"])
    (tmp_path / "d" / "dataset.json").write_text(json.dumps({"name": "mine", "hr": "images_hr", "lr": "images_lr"}))
    by_json = plan(own_config(tmp_path, dataset=str(tmp_path / "d" / "dataset.json")))
    by_keys = plan(own_config(tmp_path, hr=str(tmp_path / "d" / "images_hr"), lr=str(tmp_path / "d" / "images_lr")))
    assert by_json == by_keys
    (tmp_path / "d" / "dataset.json").write_text(json.dumps({"hr": "images_hr"}))
    with pytest.raises(ValueError, match="dataset.json: .*hr and lr go together"):
        plan(own_config(tmp_path, dataset=str(tmp_path / "d" / "dataset.json")))


# --------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("voxel,axcodes", [(1.2, "LPS"), ((1.0, 1.0, 1.5), "RAS"), (0.8, "PIR")])
def test_a_scan_off_its_grid_is_resampled_keeping_orientation_and_field_of_view(tmp_path, voxel, axcodes):
    shape = (40, 36, 30)
    path = write_scan(tmp_path / "s.nii.gz", shape, voxel, axcodes=axcodes, rotation=(0.1, 0.0, -0.05))
    spec = nifti.ScanSpec("HR", 1.0, 0.05, max_resample=1.5, intensity="minmax")
    scan = nifti.load_scan(path, spec)
    src = nib.as_closest_canonical(nib.load(path))
    assert scan.record["resampled"] and scan.record["input_voxel_mm"] == pytest.approx(list(src.header.get_zooms()))
    np.testing.assert_allclose(geometry.voxel_sizes(scan.affine), 1.0, atol=1e-9)
    # same directions (obliquity kept), same outer corner of voxel 0, extent kept to a voxel
    d_in = src.affine[:3, :3] / geometry.voxel_sizes(src.affine)
    np.testing.assert_allclose(scan.affine[:3, :3], d_in, atol=1e-9)
    corner = lambda a: a[:3, :3] @ np.full(3, -0.5) + a[:3, 3]
    np.testing.assert_allclose(corner(scan.affine), corner(src.affine), atol=1e-6)
    extent_in = np.asarray(src.shape) * geometry.voxel_sizes(src.affine)
    assert np.all(np.abs(np.asarray(scan.data.shape) - extent_in) <= 0.5 + 1e-9)
    # the content is the object at the new voxel positions (interpolation error only)
    want = sample(scan.data.shape, scan.affine)
    inside = want > 100
    got = scan.data * (scan.scaling.hi - scan.scaling.lo) + scan.scaling.lo
    assert np.corrcoef(got[inside], want[inside])[0, 1] > 0.97


def test_downsampling_is_anti_aliased():
    # a checkerboard at the 1 mm Nyquist frequency, resampled to 2 mm: averaged away (a plain
    # spline sampled every other voxel would give the board's extremes back)
    board = (np.indices((32, 32, 32)).sum(0) % 2).astype(np.float32)
    shape, target = geometry.grid(board.shape, np.eye(4), 2.0)
    out = geometry.to_grid(board, np.eye(4), shape, target)
    assert shape == (16, 16, 16) and abs(out[2:-2, 2:-2, 2:-2].mean() - 0.5) < 0.02
    assert out[2:-2, 2:-2, 2:-2].std() < 0.05


def test_a_scan_too_far_off_is_refused_with_a_hint(tmp_path):
    spec_lr = nifti.ScanSpec("LR", 2.0, 0.1, max_resample=1.5)
    four = write_scan(tmp_path / "four.nii.gz", (12, 12, 10), 4.0)
    with pytest.raises(ValueError, match=r"four.nii.gz: voxel size \(4 x 4 x 4\) mm is 2.00x off the LR grid of 2 mm"):
        nifti.load_scan(four, spec_lr)
    hr = write_scan(tmp_path / "hr.nii.gz", (24, 24, 20), 1.0)
    with pytest.raises(ValueError, match="an HR scan given as LR"):
        nifti.load_scan(hr, spec_lr)
    with pytest.raises(ValueError, match=r"expected 1 \+- 0.05 mm \(data.voxel_size_mm\)"):  # the paper protocol
        nifti.load(four, 1.0, 0.05)


# --------------------------------------------------------------------------- intensities
def test_percentile_scaling_ignores_a_hot_voxel_and_inverts():
    rng = np.random.default_rng(0)
    data = np.zeros((30, 30, 30), np.float32)
    data[5:25, 5:25, 5:25] = 500 + 100 * rng.random((20, 20, 20))
    data[10, 10, 10] = 30000  # one bright vessel / artefact
    mm = intensity.fit(data, "minmax")
    pc = intensity.fit(data, "percentile", (0.5, 99.5))
    assert mm.hi == 30000 and 590 < pc.hi < 600 and pc.lo == 0
    x = intensity.apply(data.copy(), pc)
    assert x.min() == 0 and x.max() == 1 and np.median(x[5:25, 5:25, 5:25]) > 0.8  # tissue keeps its range
    back = intensity.invert(x, pc)
    inside = data <= pc.hi
    np.testing.assert_allclose(back[inside], data[inside], rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="constant image"):
        intensity.fit(np.full((4, 4, 4), 7.0, np.float32), "percentile")


# --------------------------------------------------------------------------- paired val/test volumes
def test_a_paired_volume_puts_the_hr_on_the_lr_grid_in_world_coordinates(tmp_path):
    """HR (1 mm, RAS, a larger field of view) and its acquired LR (2 mm, LPS, oblique, shifted):
    the volume holds the LR as acquired and the HR resampled onto the LR's x2 grid, both cut to
    the LR voxels the HR covers; LR voxel j = HR voxel 2j, as in every volume file."""
    hr = write_scan(tmp_path / "thr" / "p.nii.gz", (46, 50, 42), 1.0)
    lr = write_scan(tmp_path / "tlr" / "p.nii.gz", (20, 22, 18), 2.0, axcodes="LPS", rotation=(0.08, 0.0, 0.05),
                    centre=(2.0, -3.0, 1.0), lr=True)
    _files(tmp_path / "hr", ["a.nii.gz", "b.nii.gz"])
    _files(tmp_path / "lr", ["c.nii.gz"])
    cfg = own_config(tmp_path, hr=str(tmp_path / "hr"), lr=str(tmp_path / "lr"), test_hr=str(tmp_path / "thr"),
                     test_lr=str(tmp_path / "tlr"), held_out=(0, 0))
    sub = {s.id: s for s in plan(cfg)}["p"]
    res = process(sub, cfg, tmp_path / "out")
    assert res.row.status == "ok", res.row.error
    row = res.row
    assert row.lr_source == "acquired" and row.lr_input == str(lr) and set(row.scans) == {"hr", "lr"}
    v = read_volume(tmp_path / "out" / row.shards["volume"])
    assert v.lr_source == "acquired" and v.hr.shape == tuple(2 * n for n in v.lr.shape)
    np.testing.assert_allclose(v.lr_affine, v.hr_affine @ np.diag([2.0, 2, 2, 1]), atol=1e-9)
    c = v.canonical
    # the LR is the acquired scan (scaled), cut to the shared field of view
    src = nib.as_closest_canonical(nib.load(lr))
    lo = np.round(np.linalg.inv(src.affine) @ c.lr_affine[:, 3])[:3].astype(int)
    raw = np.asarray(src.dataobj, dtype=np.float32)[lo[0]:lo[0] + c.lr.shape[0], lo[1]:lo[1] + c.lr.shape[1],
                                                     lo[2]:lo[2] + c.lr.shape[2]]
    s = row.scans["lr"]["intensity"]
    np.testing.assert_allclose(c.lr, np.clip((raw - s["lo"]) / (s["hi"] - s["lo"]), 0, 1), atol=1e-6)
    # the HR shows the object where the x2 grid lies in the world
    want = sample(c.hr.shape, c.hr_affine)
    inside = want > 100
    assert np.corrcoef(c.hr[inside], want[inside])[0, 1] > 0.99
    assert c.mask.any() and c.mask.shape == c.hr.shape


def test_rigid_registration_aligns_a_pair_whose_headers_disagree(tmp_path):
    """The LR was acquired after the head moved 3 mm and 2 degrees but its header does not say
    so (a misaligned pair): in world coordinates alone the HR lies off the LR; with
    data.own.registration=rigid it lies on it."""
    hr = write_scan(tmp_path / "thr" / "p.nii.gz", (46, 50, 42), 1.0)
    lr = tmp_path / "tlr" / "p.nii.gz"
    ras = ras_affine((22, 24, 20), 2.0)
    moved = ras_affine((22, 24, 20), 2.0, rotation=(0.035, 0.0, 0.0), centre=(3.0, -1.5, 0.0))
    img = nib.Nifti1Image(np.round(sample((22, 24, 20), moved, 0.9)).astype(np.int16), ras)
    lr.parent.mkdir(parents=True)
    nib.save(img, str(lr))
    _files(tmp_path / "hr", ["a.nii.gz", "b.nii.gz"])
    _files(tmp_path / "lr", ["c.nii.gz"])
    errors = {}
    for how in ("none", "rigid"):
        cfg = own_config(tmp_path / how, hr=str(tmp_path / "hr"), lr=str(tmp_path / "lr"),
                         test_hr=str(tmp_path / "thr"), test_lr=str(tmp_path / "tlr"), held_out=(0, 0), registration=how)
        res = process({s.id: s for s in plan(cfg)}["p"], cfg, tmp_path / how / "out")
        assert res.row.status == "ok", res.row.error
        v = read_volume(tmp_path / how / "out" / res.row.shards["volume"])
        d, h, w = v.lr.shape
        back = v.hr.reshape(d, 2, h, 2, w, 2).mean(axis=(1, 3, 5))  # the HR on the LR grid (box decimation)
        errors[how] = float(np.abs(back - v.lr)[2:-2, 2:-2, 2:-2].mean())
        assert ("registration" in res.row.scans["hr"]) == (how == "rigid")
    print(errors)
    assert errors["rigid"] < 0.5 * errors["none"], errors


def test_an_lr_scan_is_used_as_acquired_and_its_thick_axis_is_said(tmp_path):
    """Target LR patches are the acquired scan, scaled (no synthetic degradation); a scan whose
    thick slices do not run along data.patches.slice_axis gets one note."""
    lr = write_scan(tmp_path / "lr" / "t.nii.gz", (24, 26, 16), (2.0, 2.0, 2.6), lr=True)
    _files(tmp_path / "hr", ["a.nii.gz", "b.nii.gz", "c.nii.gz"])
    cfg = own_config(tmp_path, hr=str(tmp_path / "hr"), lr=str(tmp_path / "lr"), lr_val=0)
    res = process({s.id: s for s in plan(cfg)}["t"], cfg, tmp_path / "out")
    assert res.row.status == "ok" and res.row.lr_source == "acquired", res.row.error
    rec = res.row.scans["lr"]
    assert rec["resampled"] and rec["thick_axis"] == 2 and rec["shape"] == [24, 26, round(16 * 2.6 / 2)]
    assert [n for n in res.notes if "thick slices run along canonical axis 2" in n and "slice_axis=0" in n]
    from preprocessing.shards import read_patches

    import h5py

    with h5py.File(tmp_path / "out" / res.row.shards["target"]) as f:
        origins, patches = f["origins"][()], read_patches(f["patches"])
    scan = nifti.load_scan(lr, nifti.scan_spec(cfg, "LR"))
    z, y, x = origins[0]
    np.testing.assert_allclose(patches[0], scan.data[z:z + 3, y:y + 16, x:x + 16], atol=1e-3)  # float16 storage
    axial = cfg.model_copy(update={"patches": cfg.patches.model_copy(update={"slice_axis": 2})})
    assert not [n for n in process({s.id: s for s in plan(axial)}["t"], axial, tmp_path / "o2").notes if "thick" in n]


def test_nearest_neighbour_resampling_keeps_a_mask_a_mask():
    # order 0 (masks, labels): no low-pass, only the input's values, at the world position
    mask = np.zeros((20, 20, 20), np.float32)
    mask[5:12, 6:15, 4:9] = 1.0
    shifted = np.eye(4)
    shifted[:3, 3] = [2.0, -1.0, 3.0]  # the target grid's voxel 0 is input voxel (2, -1, 3)
    out = geometry.to_grid(mask, np.eye(4), (20, 20, 20), shifted, mode="constant", order=0)
    assert set(np.unique(out)) == {0.0, 1.0}
    np.testing.assert_array_equal(out[3:10, 7:16, 1:6], 1.0)
    assert out.sum() == mask.sum()
    coarse = geometry.to_grid(mask, np.eye(4), (10, 10, 10), np.diag([2.0, 2.0, 2.0, 1.0]), order=0)
    assert set(np.unique(coarse)) <= {0.0, 1.0}  # coarser: still no in-between values
