"""Degradation-shift benchmark (issues 19 and 30): does UDEAN adapt to a target degradation that
k-space truncation misses, where interpolation, denoising + interpolation and a model trained on
truncated LR do not, on real anatomy, and when the HR scans show another anatomy than the LR?

    python benchmarks/shift.py --protocol tiny --jobs 2           # CI smoke test, minutes
    python benchmarks/shift.py --jobs 2                           # the CPU protocol: hours
    python benchmarks/shift.py --levels pf_noise --seeds 1 --methods udean_unp oracle tricubic
    python benchmarks/shift.py --anatomy phantom                  # the procedural phantom (issue 19's runs)
    python benchmarks/shift.py --mismatch --levels pf_noise mixed # HR of one anatomy, LR of the other
    python benchmarks/shift.py --udean-config recommended model.features=16   # another recipe

One harness, one evaluator: a cohort of one anatomy (`--anatomy`, preprocessing/cohort.py:
`mni`, the default, real T1 brains made from the ICBM152 2009 template, the template's brain box
at the protocol's voxel (`cpu` 1 mm, `tiny` 3 mm); `phantom`, the procedural full heads at
0.7 mm), preprocessed once per level of shift (`data.degradation.level`: truncation, pf,
pf_noise, psf, mixed; preprocessing/config.py LEVELS) and mode (unpaired, misaligned), with the
noise-free truth of every source patch stored (`data.degradation.truth`, for the fidelity logs
of UDEAN's runs). Every method of `udean.baselines.methods` (the registry: what trains on what)
with the same SR network, the same budget (optimiser steps x batch, Adam, cosine LR: `--steps`,
`--batch`, `--width`) and the same `udean.evaluate.Evaluator` on the level's test volumes: whole
volume, head mask and brain mask (the cohort's T1w/brainmask_fs.nii.gz; volumes without one get
no brain rows):

    tricubic      Tricubic interpolation
    denoise       DIPY's Rician non-local means + tricubic, strength chosen on val
                  (udean/baselines/denoise.py)
    sup_trunc     supervised TS-RCAN on truncated LR of the source HR (the paper's benchmark 3:
                  the shift); one model per seed, the same for every level
    oracle        supervised on the level's true degradation of the source HR (an upper bound)
    udean_unp     UDEAN on unpaired source HR / target LR (`udean train`, DeepSpeed)
    udean_mis     UDEAN on misaligned source HR (the target subjects moved) / target LR
    udean_fixed   udean_unp with every target-matching weight 0 (lambda da, fa, spectrum, noise):
                  the SR learns on the degradation network's start, which nothing moves; the
                  control of the fidelity logs (seed 0 only)
    cyclegan_unp, dasr_unp   CycleGAN and DASR on the unpaired pools

The mismatch case (`--mismatch [hr_mni] [hr_phantom]`, issue 30): HR scans of one anatomy, LR
scans of the other, both at the protocol's mni voxel (`cpu` 1 mm), made through the own-data
path (`data.own.hr / lr / test_hr / test_lr`) as a user with such scans would run it. hr_mni: the
template cohort's brains (skull-stripped) as HR, the phantom's full heads as LR and test;
hr_phantom: the other way round. The phantom is made on its design field of view
(PHANTOM_FOV_MM, HCP's 320x320x256 at 0.7 mm), where its head has adult size (it fits its head to
the field of view: a smaller one makes a smaller head). Per direction: the HR anatomy's first
`source` subjects as a flat folder of HR scans; the LR anatomy's next `target` subjects degraded
at the level (preprocessing.kspace.degrade, each subject's own draws as preprocessing makes
them; LR affine = HR affine @ diag(2, 2, 2, 1)) as the LR scans; its last `test` subjects as the
paired test folders (HR and its degraded LR). No paired val exists (that is the point): UDEAN is
scored at its last step (its one validation, on an LR-only val volume, is at the last step), the
denoiser takes DIPY's noise estimate as it is. The test volumes' brain masks are the cohort's,
put on their HR grid in world coordinates (`attach_brain`). Methods: tricubic, denoise,
sup_trunc, oracle, udean_unp (MISMATCH_METHODS; any but udean_mis may be named).

Real anatomy held out (`--real DIR`): a flat folder of HR scans (NIfTI, isotropic; voxel size
from the first file's header or `--real-voxel`), preprocessed as test volumes at every level
(each scan gets the level's degradation; `mixed`: its own draw) and scored with every model
trained on the cohort: the same rows, in tables of their own (results_real/).

Seeds (`--seeds N`): UDEAN, the supervised rows and the oracle train with seeds 0..N-1 (default
3), CycleGAN and DASR with seed 0; mean ± std over test subjects x seeds. The UDEAN recipe is
`--udean-config PATH|name` plus trailing overrides (they apply to the one config every method
and data set is built from); by default the protocol's config with the recommended recipe (`recipe()`).

A work folder (default shift_out/<protocol>_<anatomy>, or _mismatch) holds one anatomy and one
recipe (`claim`). It resumes: every run (case, level, method, seed) writes
<work>/results[_<case>]/<level>/<method>/s<seed>.json when it is done (weights are cached under
<work>/weights/<hash of config + budget>/), and a rerun skips what exists; killing it loses at
most the runs in flight. `--jobs N` runs N of them at once, each in its own process with one
thread (plan the full run with the wall times in the results). Outputs (`--results`, default
benchmarks/results; `--tag`, default <protocol>_<anatomy>): shift_<tag>.json (`rows`: method,
level, region (volume, head, brain), data (synthetic, real, or the mismatch direction),
psnr_mean, ssim_mean, psnr_std, ssim_std, seeds, n; per-run details; meta with "anatomy" and
provenance), shift_<tag>.md, a bar chart and a slice figure per case and level.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, bar_chart, provenance, relative, write_json  # noqa: E402

LEVELS = ("truncation", "pf", "pf_noise", "psf", "mixed")
ANATOMIES = ("mni", "phantom")  # preprocessing.cohort.ANATOMIES
# the mismatch case: direction -> (HR anatomy, LR anatomy)
DIRECTIONS = {"hr_mni": ("mni", "phantom"), "hr_phantom": ("phantom", "mni")}
DESCRIBE = {"mni": "template brains (skull-stripped)", "phantom": "phantom full heads"}
MISMATCH_METHODS = ("tricubic", "denoise", "sup_trunc", "oracle", "udean_unp")
# the phantom's design field of view (HCP's 320 x 320 x 256 at 0.7 mm): at 1 mm its brain is about
# 138 x 172 mm, the template's 150 x 185 (the phantom fits its head to the field of view)
PHANTOM_FOV_MM = (224.0, 224.0, 180.0)
REGIONS = ("volume", "head", "brain")  # rows per region; brain where the test volumes have a brain mask
# key -> (row label, trained with every seed?)
METHODS = {
    "tricubic": ("Tricubic interpolation", False),
    "denoise": ("Denoise (DIPY NLM, Rician) + tricubic", False),
    "sup_trunc": ("Supervised on truncated LR (the shift)", True),
    "oracle": ("Supervised on the true degradation (oracle)", True),
    "udean_unp": ("UDEAN, unpaired", True),
    "udean_mis": ("UDEAN, misaligned", True),
    "udean_fixed": ("UDEAN, degradation not adapted", False),
    "cyclegan_unp": ("CycleGAN, unpaired", False),
    "dasr_unp": ("DASR, unpaired", False),
}


def adaptation_off(cfg):
    """`cfg` with the degradation's adaptation off (`udean.losses.adaptation_off`): method
    udean_fixed."""
    from udean.config import from_dict
    from udean.losses import adaptation_off as overrides

    return from_dict(cfg.to_dict(), overrides(cfg.loss))


def recipe() -> list[str]:
    """The recommended recipe as overrides: every key where udean/configs/recommended.yaml differs
    from paper.yaml (one home for it: the `tiny` protocol's config gets it this way; `demo` is
    based on recommended already)."""
    from preprocessing.config import diff_keys, flatten
    from udean.config import load

    paper, rec = load("paper").to_dict(), load("recommended").to_dict()
    values = flatten(rec)
    return [f"{k}={json.dumps(values[k])}" for k in diff_keys(paper, rec)]


@dataclass
class Protocol:
    udean_config: str  # the default --udean-config (`recipe()` is added to it)
    shape: tuple[int, int, int]  # the phantom cohort (0.7 mm)
    counts: tuple[int, int, int, int]  # source / target / val / test subjects (mismatch: no val)
    data: list[str] = field(default_factory=list)  # data: overrides (patches)
    steps: int = 1000
    batch: int = 8
    width: int = 16
    seeds: int = 3
    mni_voxel_mm: float = 1.0  # the mni cohort's voxel (the template's brain box at it); the mismatch case's


PROTOCOLS = {
    # CI: every level, method and table on tiny data, one seed, a few steps; mni at 3 mm (52 x 64 x 56,
    # as `udean demo --quick`)
    "tiny": Protocol("tiny", (64, 64, 48), (2, 2, 1, 2), ["data.patches.max_per_subject=12"], steps=6, batch=2,
                     width=8, seeds=1, mni_voxel_mm=3.0),
    # the CPU protocol: mni 156 x 192 x 166 at 1 mm (phantom 96x96x80 heads), the minimum budget
    # (1000 steps x 8, the demo's width, 32)
    "cpu": Protocol("demo", (96, 96, 80), (6, 6, 1, 3), [
        "data.patches.lr_size=[32,32]", "data.patches.stride=[16,16]", "data.patches.slab_stride=1",
        "data.patches.max_per_subject=96", "data.patches.min_foreground=0.3"], width=32),
}


# --------------------------------------------------------------------------- cohorts
def cohort_spec(anatomy: str, proto: Protocol, mismatch: bool = False) -> tuple[tuple[int, int, int], float]:
    """(shape, voxel mm) of the protocol's `anatomy` cohort: mni the template's brain box at
    `proto.mni_voxel_mm`; the phantom `proto.shape` at 0.7 mm, or for the mismatch case at the
    mni voxel on PHANTOM_FOV_MM (same voxel size: the case isolates anatomy, not scale)."""
    from preprocessing.cohort import cohort_shape, default_voxel_mm

    if anatomy == "mni":
        return cohort_shape("mni", None, proto.mni_voxel_mm), proto.mni_voxel_mm
    if not mismatch:
        return tuple(proto.shape), default_voxel_mm("phantom")
    v = proto.mni_voxel_mm
    return tuple(2 * int(round(f / v / 2)) for f in PHANTOM_FOV_MM), v  # type: ignore[return-value]


def ensure_cohort(root: Path, anatomy: str, n: int, shape, voxel: float) -> None:
    """`n` subjects of `anatomy` (HCP layout, brain masks beside) at `root`, kept when they are there."""
    from preprocessing.cohort import cohort_ready, write_cohort

    if root.is_dir() and cohort_ready(root, n, shape, voxel_mm=voxel):
        return
    print(f"cohort: {n} {anatomy} subjects {tuple(shape)} at {voxel:g} mm -> {root}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    write_cohort(root, n, shape if anatomy == "phantom" else None, seed=0, progress=False, anatomy=anatomy,
                 voxel_mm=voxel)


def case_folder(work: Path, case: str) -> Path:
    """Where a mismatch direction's own-data folders go."""
    return work / "mismatch" / case


def degraded_scan(path: Path, data, sid: str) -> bytes:
    """The LR scan of the HR scan at `path` under DataConfig `data`, as NIfTI bytes: scaled as the
    data set scales its HR (data.own.intensity), even-cropped, degraded at the level with subject
    `sid`'s draws (preprocessing.subject's streams, as a synthetic LR); float32, LR affine = HR
    affine @ diag(2, 2, 2, 1)."""
    from preprocessing import kspace, nifti
    from preprocessing.cohort import nifti_gz_bytes
    from preprocessing.subject import STREAM_NOISE, subject_degradation, subject_rng

    scan = nifti.load_scan(path, nifti.scan_spec(data, "HR"))
    scale = tuple(data.degradation.scale)
    lr = kspace.degrade(kspace.even_crop(scan.data, scale), subject_degradation(data, sid),
                        subject_rng(data.seed, sid, STREAM_NOISE), data.patches.slice_axis)
    return nifti_gz_bytes(lr, scan.affine @ np.diag([*scale, 1.0]))


def mismatch_scans(work: str, case: str, counts: list[int], cfgs: dict) -> dict[str, str]:
    """Write mismatch direction `case`'s own-data folders (module docstring) from the two cohorts
    under <work>/cohort/; files kept when there (each is written whole or not at all). Returns
    {test subject: its brain mask (the cohort's)}."""
    import torch

    from hpc.atomic import atomic_write_bytes
    from preprocessing.cohort import subject_ids, subject_path
    from preprocessing.discover import HCP_BRAINMASK

    torch.set_num_threads(1)
    work = Path(work)
    (hr_anatomy, lr_anatomy), (s, t, _, n_test) = DIRECTIONS[case], counts
    ids = subject_ids(s + t + n_test)  # write_cohort's, seed 0

    def scans(anatomy: str, lo: int, hi: int) -> list[tuple[str, Path, Path]]:
        root = work / "cohort" / anatomy  # names carry the anatomy: both cohorts have the same ids
        return [(f"{anatomy}-{sid}", subject_path(root, sid), root / HCP_BRAINMASK.format(subject=sid))
                for sid in ids[lo:hi]]

    def put(dst: Path, make) -> None:
        if not dst.is_file():
            atomic_write_bytes(dst, make())

    folder = case_folder(work, case)
    tests = scans(lr_anatomy, s + t, s + t + n_test)
    for sub, subjects in (("hr", scans(hr_anatomy, 0, s)), ("test_hr", tests)):
        for name, path, _ in subjects:
            put(folder / sub / f"{name}.nii.gz", path.read_bytes)
    for level, modes in cfgs.items():
        data = _cfg(modes["unpaired"]).data
        for sub, subjects in (("lr", scans(lr_anatomy, s, s + t)), ("test_lr", tests)):
            for name, path, _ in subjects:
                put(folder / level / sub / f"{name}.nii.gz", lambda: degraded_scan(path, data, name))
    return {name: str(mask) for name, _, mask in tests}


def attach_brain(vol, mask_path: str):
    """`vol` (a VolumePair) with the brain mask at `mask_path` (a NIfTI of the scan its HR came
    from) on its HR grid, in world coordinates, nearest neighbour: own-data test volumes store
    none (their HR is resampled onto the LR's x2 grid)."""
    import dataclasses

    import nibabel as nib

    from preprocessing import geometry, nifti, patches

    img = nib.as_closest_canonical(nifti.read_canonical(mask_path))
    shape = vol.to_canonical(vol.hr).shape
    mask = geometry.to_grid(nifti.voxel_data(img, mask_path), img.affine, shape,
                            patches.canonical_affine(vol.hr_affine, vol.slice_axis), mode="constant", order=0)
    return dataclasses.replace(vol, brain=patches.to_stored((mask > 0.5).astype(np.uint8), vol.slice_axis))


# --------------------------------------------------------------------------- configs
def configs(args, proto: Protocol, work: Path, case: str) -> dict[str, dict[str, dict]]:
    """{level: {"unpaired" | "misaligned": config as a dict}}: the one config, per data set, of
    `case`: "synthetic" (the `--anatomy` cohort) or a mismatch direction (own data, unpaired)."""
    from udean.config import load

    base = ([] if args.udean_config else recipe()) + [
        "data.split.preset=counts", f"data.split.counts={list(proto.counts)}", *proto.data,
        f"train.batch_size={args.batch or proto.batch}", f"model.features={args.width or proto.width}",
        "train.precision=fp32", "train.num_workers=0", "train.fidelity_every=100", "train.log_every=50",
        *args.overrides]
    synthetic = case == "synthetic"
    shape, voxel = cohort_spec(args.anatomy if synthetic else "mni", proto, not synthetic)
    base += [f"data.voxel_size_mm={voxel}"] + ([f"data.root={work / 'cohort' / args.anatomy}"] if synthetic else [])
    name = args.udean_config or proto.udean_config
    margin = list(load(name, base).model.source_margin)
    folder = case_folder(work, case)
    out = {}
    for level in sorted(set(args.levels) | ({"truncation"} if "sup_trunc" in args.methods else set())):
        out[level] = {}
        own = [] if synthetic else [  # no paired val: every HR scan trains, one LR scan is an LR-only val volume
            f"data.own.hr={folder / 'hr'}", f"data.own.lr={folder / level / 'lr'}", f"data.own.test_hr={folder / 'test_hr'}",
            f"data.own.test_lr={folder / level / 'test_lr'}", "data.own.held_out=[0,0]"]
        for mode in ("unpaired", "misaligned") if synthetic and "udean_mis" in args.methods else ("unpaired",):
            data_out = work / "data" / level / mode if synthetic else work / "data" / case / level / mode
            cfg = load(name, base + own + [f"data.mode={mode}", f"data.degradation.level={level}",
                                           "data.degradation.truth=true", f"data.patches.source_margin={margin}",
                                           f"data.out={data_out}"])
            out[level][mode] = cfg.to_dict()
    return out


def real_configs(args, cfgs: dict, work: Path) -> dict[str, dict]:
    """{level: the config of the `--real` scans' test data at that level} ({} without --real):
    the level's unpaired config with the scans as its only (test) subjects."""
    if not args.real:
        return {}
    import nibabel as nib

    root = Path(args.real).resolve()
    scans = sorted(f for f in root.iterdir() if f.name.endswith((".nii", ".nii.gz")) and not f.name.startswith("."))
    if not scans:
        raise SystemExit(f"shift.py: --real {root}: no .nii / .nii.gz files in it")
    voxel = args.real_voxel or float(np.mean(nib.load(scans[0]).header.get_zooms()[:3]))
    out = {}
    for level, modes in cfgs.items():
        d = json.loads(json.dumps(modes["unpaired"]))
        d["data"].update(root=str(root), layout="flat", out=str(work / "real" / level), voxel_size_mm=voxel)
        d["data"]["split"].update(preset="counts", counts=[0, 0, 0, len(scans)])
        out[level] = _cfg(d).to_dict()
    return out


def _cfg(d: dict):
    from udean.config import from_dict

    return from_dict(d)


# --------------------------------------------------------------------------- jobs (one process each)
def results_dir(work: Path, case: str) -> Path:
    """The result folder of a case: "synthetic" (the cohort's test volumes), "real" (the --real
    scans) or a mismatch direction."""
    return work / {"synthetic": "results", "real": "results_real"}.get(case, f"results_{case}")


def result_path(work: Path, level: str, method: str, seed: int, case: str = "synthetic") -> Path:
    return results_dir(work, case) / level / method / f"s{seed}.json"


def claim(work: Path, anatomy: str, cases: dict, steps: int) -> None:
    """A work folder belongs to one anatomy and one recipe: <work>/anatomy.json names the anatomy
    ("mni", "phantom" or "mismatch": its cohorts, data and weights are of it) and each case's level
    folder records the configs and budget its runs were made with (<results>/<level>/config.json).
    A later invocation with another anatomy or recipe is refused (naming it, or the keys) before
    anything is written, instead of mixing anatomies or reporting the old runs as its own."""
    from hpc.atomic import atomic_write_text
    from preprocessing.config import diff_keys

    marker = work / "anatomy.json"
    if marker.is_file() and (have := json.loads(marker.read_text())["anatomy"]) != anatomy:
        raise SystemExit(f"shift.py: {work} holds runs on the {have} anatomy, this one is on {anatomy}; "
                         "choose another --work")
    todo = [(marker, {"anatomy": anatomy})]
    for case, cfgs in cases.items():
        for level, modes in cfgs.items():
            want = json.loads(json.dumps({"configs": modes, "steps": steps}, default=str))
            path = results_dir(work, case) / level / "config.json"
            if not path.is_file():
                todo.append((path, want))
            elif (have := json.loads(path.read_text())) != want:
                keys = diff_keys(have, want)
                raise SystemExit(f"shift.py: {path} holds {level} runs of another recipe or budget (differs in: "
                                 f"{', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}); choose another --work")
    for path, doc in todo:
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def prepare(data_cfg: dict) -> str:
    """Preprocess one data set (resumes: finished subjects are kept)."""
    import torch

    from preprocessing.driver import preprocess
    from preprocessing.manifest import load_manifest

    torch.set_num_threads(1)
    cfg = _cfg(data_cfg)
    if preprocess(cfg.data, progress=False).failed:
        raise RuntimeError(f"preprocessing {cfg.data.out}: {load_manifest(cfg.data.out).failed()[0].error}")
    return cfg.data.out


def test_volumes(data_cfg: dict, brains: dict[str, str]) -> list:
    """The test VolumePairs of a data set, with their brain masks attached where `brains` names
    them (the mismatch case's)."""
    from preprocessing.manifest import load_manifest
    from preprocessing.shards import read_volume

    vols = [read_volume(p) for p in load_manifest(_cfg(data_cfg).data.out).volume_paths("test")]
    return [attach_brain(v, brains[v.subject]) if v.subject in brains else v for v in vols]


def run(spec: dict) -> dict:
    """Train (or load) one method at one seed and score it on the test volumes of every level in
    spec["levels"] (sup_trunc: every level; the others: their own) of its case, and on the
    `--real` scans at every level in spec["real_levels"]; writes the result files."""
    import torch

    from hpc.atomic import atomic_write_text
    from udean.baselines.methods import VOLUME_METHODS, budget_of, runs_dir, train_one
    from udean.evaluate import Evaluator, tricubic
    from udean.infer import Inferer

    torch.set_num_threads(1)
    work, method, seed, case = Path(spec["work"]), spec["method"], spec["seed"], spec["case"]
    train_level = spec["train_level"]
    data = {mode: _cfg(d).model_copy(update={"train": _cfg(d).train.model_copy(update={"seed": seed})})
            for mode, d in spec["configs"][train_level].items()}
    if method == "udean_fixed":
        data = {mode: adaptation_off(c) for mode, c in data.items()}
    unp = data["unpaired"]
    budget = budget_of(unp, spec["steps"], "cpu")
    t = time.perf_counter()
    info: dict = {}
    if method == "tricubic":
        fn = lambda v: tricubic(v.lr, v.hr.shape)  # noqa: E731
    else:
        runs = runs_dir(work / "weights", unp, budget, method=method)
        net, info = train_one("udean_unp" if method == "udean_fixed" else method, data, budget, runs, "cpu")
        if method in VOLUME_METHODS:
            fn = net
        else:
            inferer = Inferer.from_config(unp.infer, unp.data.patches, "cpu")
            fn = lambda v: inferer(v.lr, net)  # noqa: E731
        if method.startswith("udean_"):
            info["fidelity"] = fidelity_rows(Path(info["run"]) / "metrics.jsonl")
    train_s = time.perf_counter() - t
    out = {}
    for level, where in [(lv, case) for lv in spec["levels"]] + [(lv, "real") for lv in spec["real_levels"]]:
        t = time.perf_counter()
        volumes = test_volumes(spec["reals"][level] if where == "real" else spec["configs"][level]["unpaired"],
                               spec["brains"])
        keep = {}

        def first(vol, preds, scores):
            if not keep:
                keep.update(subject=vol.subject, pred=preds[method])

        (res,) = Evaluator({method: fn}, regions=("brain",), window=unp.loss.ssim_window).run(volumes, on_volume=first)
        path = result_path(work, level, method, seed, where)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".npy"), keep["pred"].astype(np.float16))  # the slice figure's panel
        doc = {"method": method, "level": level, "seed": seed, "data": where, "trained_at": train_level,
               "subjects": res.subjects, "train_seconds": round(float(info.get("train_seconds", train_s)), 1),
               "eval_seconds": round(time.perf_counter() - t, 1), "cached": bool(info.get("cached")),
               "info": {k: v for k, v in info.items() if k in ("strength", "val_psnr_head", "note", "pairs", "fidelity",
                                                              "first", "last", "steps")}}
        atomic_write_text(path, json.dumps(doc, indent=1, default=float) + "\n")
        out[f"{level}{' (real)' if where == 'real' else ''}"] = doc
    return out


def fidelity_rows(metrics: Path) -> list[dict]:
    """The fidelity rows of a UDEAN run's metrics.jsonl (udean/fidelity.py)."""
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in ("kind", "time", "epoch")} for r in rows if r.get("kind") == "fidelity"]


def jobs(args, work: Path, cases: dict, steps: int, seeds: int, reals: dict, brains: dict) -> list[dict]:
    """The runs not done yet (or not scored on the `--real` scans yet), longest first (UDEAN),
    so the pool stays full."""
    todo = []
    for case, cfgs in cases.items():
        for method in args.methods:
            for seed in range(seeds if METHODS[method][1] else 1):
                levels = list(args.levels) if method == "sup_trunc" else None
                for level in (["truncation"] if levels else args.levels):
                    want = levels or [level]
                    missing = [lv for lv in want if not result_path(work, lv, method, seed, case).is_file()]
                    real = [lv for lv in want if reals and case == "synthetic"
                            and not result_path(work, lv, method, seed, "real").is_file()]
                    if missing or real:
                        todo.append({"work": str(work), "case": case, "method": method, "seed": seed,
                                     "train_level": level, "levels": missing, "real_levels": real, "configs": cfgs,
                                     "reals": reals, "brains": brains.get(case, {}), "steps": steps})
    order = {m: i for i, m in enumerate(("udean_unp", "udean_mis", "udean_fixed", "sup_trunc", "oracle", "dasr_unp", "cyclegan_unp",
                                         "denoise", "tricubic"))}
    return sorted(todo, key=lambda j: order[j["method"]])


def pool(n: int) -> ProcessPoolExecutor:
    # a fresh process per job: one thread each, no state carried between runs
    return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1)


# --------------------------------------------------------------------------- report
def collect(work: Path, levels, methods, case: str = "synthetic") -> tuple[list[dict], list[dict]]:
    """(rows: one per level x method x region the test volumes have, runs: one per result file) of
    `case` (rows and runs carry it as "data")."""
    rows, runs = [], []
    for level in levels:
        for method in methods:
            docs = [json.loads(p.read_text()) for p in sorted(result_path(work, level, method, 0, case).parent.glob("s*.json"))]
            if not docs:
                continue
            runs += [{**{k: d[k] for k in ("method", "level", "seed", "train_seconds", "eval_seconds", "info")},
                      "data": case} for d in docs]
            for region in REGIONS:
                suffix = "" if region == "volume" else f"_{region}"
                scores = {k: np.array([s[k + suffix] for d in docs for s in d["subjects"] if k + suffix in s],
                                      dtype=np.float64) for k in ("psnr", "ssim")}
                if not len(scores["psnr"]):
                    continue
                row = {"method": method, "label": METHODS[method][0], "level": level, "region": region, "data": case,
                       "seeds": [d["seed"] for d in docs], "n": len(scores["psnr"])}
                for k, v in scores.items():
                    row[f"{k}_mean"] = float(v.mean())
                    row[f"{k}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
                rows.append(row)
    return rows, runs


def _data_line(meta: dict) -> str:
    c, n = meta["cohorts"], "/".join(map(str, meta["counts"]))
    if meta["anatomy"] == "mismatch":
        s, t, _, test = meta["counts"]
        return (f"- data: the mismatch case, own-data path (`data.own`): HR scans of one anatomy, LR and paired test "
                f"scans of the other, both at {c['mni']['voxel_mm']:g} mm: template brains {c['mni']['shape']} "
                f"(ICBM152 2009, every subject a deformation of one averaged template), phantom heads "
                f"{c['phantom']['shape']}; {s} HR / {t} LR / {test} test scans; no paired val: UDEAN is scored at its "
                "last step, the denoiser takes DIPY's noise estimate as it is (k = 1); brain scores in the cohort's "
                "brain masks; levels: " + ", ".join(meta["levels"]))
    a = meta["anatomy"]
    what = ("real-anatomy cohort (ICBM152 2009 template, `--anatomy mni`: every subject a deformation of one "
            "averaged template)" if a == "mni" else "phantom cohort (`--anatomy phantom`)")
    return (f"- data: {what} {c[a]['shape']} at {c[a]['voxel_mm']:g} mm, source/target/val/test = {n}; levels: "
            f"{', '.join(meta['levels'])} (preprocessing/config.py LEVELS)")


def markdown(doc: dict) -> str:
    meta, prov = doc["meta"], doc["meta"]["provenance"]
    lines = [f"# Degradation shift (`--protocol {meta['protocol']}`, anatomy: {meta['anatomy']})", "",
             f"- date: {prov['date']}; machine: {prov['machine']['cpu']}, {prov['machine']['cores']} cores, "
             f"no GPU used; {meta['jobs']} run(s) at a time, one thread each",
             f"- command: `{prov['command']}`", f"- wall time of this invocation: {meta['seconds']:.0f} s",
             _data_line(meta),
             f"- budget, every learned method: {meta['budget']['steps']} optimiser steps x {meta['budget']['batch_size']} "
             f"patches, Adam lr {meta['budget']['lr']:g} -> {meta['budget']['lr_min']:g} (cosine), SR width "
             f"{meta['width']}; UDEAN recipe: `{meta['udean_config']}` {' '.join(meta['udean_overrides'])}"]
    if meta.get("real"):
        lines.append(f"- real anatomy: {meta['real']['scans']} held-out scan(s) in `{meta['real']['root']}` "
                     f"({meta['real']['voxel_mm']:g} mm), each degraded at every level and scored with the models "
                     "trained on the cohort (the \"real anatomy\" tables)")
    lines += ["", "PSNR (dB) / SSIM, mean ± sample std over test subjects x seeds; whole volume, the dilated head mask "
              "(udean.evaluate.head_mask) and, where the test volumes have one, the brain mask. Decisions are made on "
              "the head and the brain: a noisy background rewards any denoising in whole-volume scores. Denoise + "
              "tricubic: DIPY's non-local means with its Rician bias correction, strength on val "
              "(udean/baselines/denoise.py).", ""]
    for case in meta["cases"]:
        for level in meta["levels"]:
            for data in (case, "real") if case == "synthetic" else (case,):
                rows = [r for r in doc["rows"] if r["level"] == level and r["data"] == data]
                if not rows:
                    continue
                trained = data != "real"
                brain = any(r["region"] == "brain" for r in rows)
                if data == "synthetic":
                    title = f"## {level}"
                elif data == "real":
                    title = f"### {level}: real anatomy (held out)"
                else:
                    hr, lr = DIRECTIONS[data]
                    title = f"## {level}: HR {DESCRIBE[hr]}, LR {DESCRIBE[lr]} (`{data}`)"
                head = ["Method", "seeds", "SSIM", "PSNR", "SSIM (head)", "PSNR (head)", "head PSNR - tricubic"]
                head += ["SSIM (brain)", "PSNR (brain)", "brain PSNR - tricubic"] if brain else []
                head += ["train s"] if trained else []
                lines += [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                lines += _table(rows, doc["runs"], level, data, brain, trained) + [""]
                if trained:
                    lines += fidelity_table(doc["runs"], level, data)
            for f in doc["figures"].get(f"{case}/{level}", []):
                lines.append(f"![{Path(f).stem}]({Path(f).name})")
            lines.append("")
    return "\n".join(lines)


def _table(rows: list[dict], runs: list[dict], level: str, data: str, brain: bool, seconds: bool) -> list[str]:
    """The rows of one level and data set, a Markdown line per method."""
    from udean.evaluate import pm

    tri = {r["region"]: r for r in rows if r["method"] == "tricubic"}
    out = []
    for method in METHODS:
        got = {r["region"]: r for r in rows if r["method"] == method}
        if not got:
            continue
        cells = [got["volume"]["label"], str(len(got["volume"]["seeds"]))]
        for region in ("volume", "head", "brain") if brain else ("volume", "head"):
            r = got.get(region)
            cells += [pm(r["ssim_mean"], r["ssim_std"], 4), pm(r["psnr_mean"], r["psnr_std"], 2)] if r else ["-", "-"]
            if region != "volume":
                cells.append(f"{r['psnr_mean'] - tri[region]['psnr_mean']:+.2f}" if r and region in tri else "-")
        if seconds:
            secs = [x["train_seconds"] for x in runs if (x["method"], x["level"], x["data"]) == (method, level, data)]
            cells.append(f"{np.mean(secs):.0f}")
        out.append("| " + " | ".join(cells) + " |")
    return out


def fidelity_table(runs: list[dict], level: str, data: str = "synthetic") -> list[str]:
    """Markdown: the fidelity logs (udean/fidelity.py) of each UDEAN run at `level`, at its first
    and last measurement: is X_{s~t} becoming the target's degradation of Y_s?"""
    rows = [r for r in runs if r["level"] == level and r["data"] == data and r["method"].startswith("udean_")
            and r["info"].get("fidelity")]
    if not rows:
        return []
    out = ["Fidelity of the learned degradation (udean/fidelity.py, on fixed probe patches): PSNR of the noise-free "
           "X_{s~t} against the true noise-free degradation of the same Y_s, the noise level of X_{s~t} and X_t, the "
           "spread (std of log noise level over patches) of each, and the distance of their radial k-space profiles "
           "(decades).", "", "| run | step | PSNR to truth (dB) | noise X_{s~t} / X_t | spread X_{s~t} / X_t "
           "| profile distance |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (list(METHODS).index(r["method"]), r["seed"])):
        fid = r["info"]["fidelity"]
        for f in (fid[0], fid[-1]):
            spread = (f"{f['noise_spread_st']:.3f} / {f['noise_spread_t']:.3f}" if "noise_spread_st" in f else "-")
            out.append(f"| {METHODS[r['method']][0]}, seed {r['seed']} | {f['step']} | {f.get('psnr_truth', float('nan')):.2f} "
                       f"| {f['noise_st']:.4f} / {f['noise_t']:.4f} | {spread} | {f['profile_distance']:.3f} |")
    return out + [""]


def _relative_tree(tree):
    """A config tree with every path inside the repository written relative to it (`relative`)."""
    if isinstance(tree, dict):
        return {k: _relative_tree(v) for k, v in tree.items()}
    return relative(tree) if isinstance(tree, str) and Path(tree).is_absolute() else tree


def figures(doc: dict, work: Path, cases: dict, results: Path, tag: str) -> dict[str, list[str]]:
    """Per case and level ("<case>/<level>"): a bar chart (PSNR / SSIM minus tricubic's, per
    region) and the slices of the first test subject for every method (seed 0)."""
    from preprocessing.manifest import load_manifest
    from preprocessing.shards import read_volume
    from udean.figures import volume_figure

    out: dict[str, list[str]] = {}
    for case, cfgs in cases.items():
        for level in doc["meta"]["levels"]:
            rows = [r for r in doc["rows"] if r["level"] == level and r["data"] == case]
            tri = {r["region"]: r for r in rows if r["method"] == "tricubic"}
            if not rows or len(tri) < 2:
                continue
            name = level if case == "synthetic" else f"{case}_{level}"
            panels = []
            for region in [r for r in ("head", "brain", "volume") if r in tri]:
                for score in ("psnr", "ssim"):
                    rs = [r for r in rows if r["region"] == region and r["method"] != "tricubic"]
                    panels.append({"title": f"{name}: {score.upper()} - tricubic, {region}",
                                   "labels": [r["label"] for r in rs],
                                   "values": [r[f"{score}_mean"] - tri[region][f"{score}_mean"] for r in rs],
                                   "notes": [f"± {r[f'{score}_std']:.{2 if score == 'psnr' else 4}f}" for r in rs],
                                   "xlabel": "dB" if score == "psnr" else "SSIM", "ref": (0.0, "tricubic")})
            files = []
            png = bar_chart(results / f"shift_{tag}_{name}.png", panels, title=f"degradation shift: {name}")
            if png is not None:
                files.append(relative(png))
            vol = read_volume(load_manifest(_cfg(cfgs[level]["unpaired"]).data.out).volume_paths("test")[0])
            preds, scores = {}, {}
            for method in METHODS:
                res = result_path(work, level, method, 0, case)
                if res.with_suffix(".npy").is_file() and res.is_file():
                    label = METHODS[method][0].replace(", ", "\n").replace(" (", "\n(")
                    preds[label] = np.load(res.with_suffix(".npy")).astype(np.float32)
                    s = json.loads(res.read_text())["subjects"][0]
                    scores[label] = {"psnr": s["psnr_head"], "ssim": s["ssim_head"]}
            if preds:
                files.append(relative(volume_figure(vol, preds, results / f"shift_{tag}_{name}_slices.png", scores=scores,
                                                    title=f"{vol.subject} (test), {name}: head PSNR / SSIM, x2x2x2")))
            out[f"{case}/{level}"] = files
    return out


# --------------------------------------------------------------------------- main
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="trailing key.sub=value arguments override the UDEAN config (and so every "
                                "data set and the SR network of every method)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    p.add_argument("--anatomy", choices=ANATOMIES, default=None,
                   help="the cohort: mni (default), real T1 brains from the ICBM152 2009 template; phantom, the "
                        "procedural full heads")
    p.add_argument("--mismatch", nargs="*", choices=list(DIRECTIONS), default=None, metavar="DIRECTION",
                   help="instead: the mismatch case, HR scans of one anatomy and LR of the other, in these directions "
                        f"({', '.join(DIRECTIONS)}; none named: both)")
    p.add_argument("--levels", nargs="+", choices=LEVELS, default=list(LEVELS))
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                   help="default: every method (--mismatch: " + " ".join(MISMATCH_METHODS) + ")")
    p.add_argument("--seeds", type=int, default=None, help="training seeds of UDEAN, supervised, oracle (default 3)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per learned method (default 1000)")
    p.add_argument("--batch", type=int, default=None, help="patches per step (default 8)")
    p.add_argument("--width", type=int, default=None, help="model.features of every network (default the protocol's: cpu 32, the demo's; tiny 8)")
    p.add_argument("--udean-config", default=None,
                   help="the UDEAN recipe, a config PATH or shipped name (default: the protocol's + the recommended recipe)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each its own process with one thread")
    p.add_argument("--work", default=None, help="cohorts, data, weights, per-run results; default "
                   "shift_out/<protocol>_<anatomy> (or _mismatch)")
    p.add_argument("--results", default=str(RESULTS), help="where the tables and figures go")
    p.add_argument("--tag", default=None, help="file tag: shift_<tag>.*; default <protocol>_<anatomy> (or _mismatch)")
    p.add_argument("--real", default=None, metavar="DIR",
                   help="a folder of held-out real HR scans (NIfTI): every model is also scored on them at every level")
    p.add_argument("--real-voxel", type=float, default=None, metavar="MM",
                   help="their isotropic voxel size (default: the first file's header)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    if args.mismatch is not None:
        if args.anatomy or args.real:
            p.error("--mismatch uses both anatomies (HR of one, LR of the other): not with --anatomy or --real")
        if args.methods and "udean_mis" in args.methods:
            p.error("--mismatch: udean_mis needs moved copies of the LR subjects; HR and LR are different subjects here")
    args.anatomy = args.anatomy or "mni"
    args.methods = args.methods or list(MISMATCH_METHODS if args.mismatch is not None else METHODS)
    if "denoise" in args.methods:  # before hours of training, not after
        from udean.baselines.denoise import dipy_api

        try:
            dipy_api()
        except ImportError as exc:
            p.error(f"{exc} (or leave denoise out of --methods)")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    proto = PROTOCOLS[args.protocol]
    t0 = time.perf_counter()
    mismatch = args.mismatch is not None
    anatomy = "mismatch" if mismatch else args.anatomy
    work = Path(args.work or Path("shift_out") / f"{args.protocol}_{anatomy}").resolve()
    results = Path(args.results).resolve()
    results.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"{args.protocol}_{anatomy}"
    steps = args.steps or proto.steps
    seeds = args.seeds or proto.seeds
    cases = {c: configs(args, proto, work, c) for c in ((args.mismatch or list(DIRECTIONS)) if mismatch else ["synthetic"])}
    claim(work, anatomy, cases, steps)
    s, t, v, n_test = proto.counts
    cohorts = {a: cohort_spec(a, proto, mismatch) for a in (ANATOMIES if mismatch else [anatomy])}
    for a, (shape, voxel) in cohorts.items():
        ensure_cohort(work / "cohort" / a, a, s + t + n_test + (0 if mismatch else v), shape, voxel)
    brains: dict[str, dict[str, str]] = {}
    if mismatch:  # the own-data folders of every direction
        with pool(args.jobs) as ex:
            futures = {c: ex.submit(mismatch_scans, str(work), c, list(proto.counts), cfgs) for c, cfgs in cases.items()}
            brains = {c: f.result() for c, f in futures.items()}

    reals = real_configs(args, cases["synthetic"], work) if not mismatch else {}
    with pool(args.jobs) as ex:  # data: every case x level x mode (and the --real scans at every level)
        for f in as_completed([ex.submit(prepare, d) for cfgs in cases.values() for lv in cfgs.values() for d in lv.values()]
                              + [ex.submit(prepare, d) for d in reals.values()]):
            print(f"data: {relative(f.result())}", flush=True)
    todo = jobs(args, work, cases, steps, seeds, reals, brains)
    print(f"{len(todo)} run(s) to do, {args.jobs} at a time", flush=True)
    with pool(args.jobs) as ex:
        futures = {ex.submit(run, j): j for j in todo}
        for f in as_completed(futures):
            j = futures[f]
            for level, d in f.result().items():
                case = "" if j["case"] == "synthetic" else f"{j['case']} "
                print(f"{case}{level:10s} {j['method']:12s} seed {j['seed']}: head PSNR "
                      f"{np.mean([s['psnr_head'] for s in d['subjects']]):.2f} dB, train {d['train_seconds']:.0f} s"
                      f"{' (cached)' if d['cached'] else ''}", flush=True)

    from udean.baselines.methods import budget_of

    rows, runs = [], []
    for case in list(cases) + (["real"] if reals else []):
        r, u = collect(work, args.levels, args.methods, case)
        rows, runs = rows + r, runs + u
    first = _cfg(next(iter(next(iter(cases.values())).values()))["unpaired"])
    doc = {"rows": rows, "runs": runs, "meta": {
        "protocol": args.protocol, "anatomy": anatomy, "cases": list(cases),
        "cohorts": {a: {"shape": list(shape), "voxel_mm": voxel} for a, (shape, voxel) in cohorts.items()},
        "mismatch": {c: dict(zip(("hr", "lr"), DIRECTIONS[c])) for c in cases if c in DIRECTIONS},
        "levels": list(args.levels), "methods": list(args.methods), "seeds": seeds,
        "jobs": args.jobs, "counts": list(proto.counts),
        "budget": budget_of(first, steps, "cpu").to_dict(), "width": first.model.features,
        "udean_config": args.udean_config or proto.udean_config,
        "udean_overrides": ([] if args.udean_config else recipe()) + list(args.overrides),
        "config": _relative_tree(first.to_dict()), "provenance": provenance(argv),
        "real": reals and {"root": relative(Path(args.real).resolve()),
                           "scans": next(iter(reals.values()))["data"]["split"]["counts"][3],
                           "voxel_mm": next(iter(reals.values()))["data"]["voxel_size_mm"]}}}
    doc["figures"] = figures(doc, work, cases, results, tag)
    doc["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(results / f"shift_{tag}.json", doc)
    from hpc.atomic import atomic_write_text

    atomic_write_text(results / f"shift_{tag}.md", markdown(doc))
    print(f"results: {relative(results / f'shift_{tag}.md')}\n         {relative(results / f'shift_{tag}.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
