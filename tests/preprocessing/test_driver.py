"""The real thing: `udean preprocess` under mpirun -n 2 and as one rank on a tiny synthetic
cohort; byte identity, bad inputs, rank crash, SIGKILL at random points, verify / regenerate."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from preprocessing.manifest import load_manifest, without_timing
from preprocessing.shards import patch_count, read_patches, read_volume
from preprocessing.cohort import write_cohort
from tests.preprocessing.test_nifti import save, smooth_volume, write_bad_inputs

BIN = Path(sys.executable).parent
SHAPE = (48, 48, 40)


def blob_cohort(root: Path, n: int, seed: int = 0) -> None:
    """HCP-layout cohort of smooth int16 heads at 0.7 mm (independent of preprocessing.synthetic,
    which has its own tests; `test_synthetic_cohort_end_to_end` runs that one through)."""
    from preprocessing.discover import HCP_T1W

    for i in range(n):
        sid = str(100000 + 101 * i)
        save(root / HCP_T1W.format(subject=sid), smooth_volume(SHAPE, seed * 1000 + i))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    blob_cohort(root, 6)
    return root


def test_synthetic_cohort_end_to_end(tmp_path):
    write_cohort(tmp_path / "cohort", 6, shape=SHAPE, seed=0, progress=False)
    preprocess(tmp_path / "cohort", tmp_path / "run", 2)
    m = load_manifest(tmp_path / "run/out")
    assert all(r.status == "ok" for r in m.subjects) and len(m.shard_paths("target")) == 2


def udean(args, cwd, ranks=1, env=None, timeout=120, check=True, background=False):
    cmd = [str(BIN / "udean"), *args]
    if ranks > 1:
        cmd = [str(BIN / "mpirun"), "--oversubscribe", "-n", str(ranks), "-x", "OMP_NUM_THREADS=1",
               *(["-x", k] for k in (env or {})), *cmd]
        cmd = [c for part in cmd for c in (part if isinstance(part, list) else [part])]
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    Path(cwd).mkdir(parents=True, exist_ok=True)
    if background:
        return subprocess.Popen(cmd, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    r = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def preprocess(cohort, cwd, ranks=1, extra=(), **kw):
    return udean(["preprocess", "--config", "tiny", "--data-root", str(cohort), "--out", "out", "--no-progress",
                  *extra], cwd, ranks, **kw)


def files(out: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under shards/ and volumes/ (temp files included)."""
    import hashlib

    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for sub in ("shards", "volumes") for p in sorted((out / sub).rglob("*")) if p.is_file()}


def manifest(out: Path) -> dict:
    return without_timing(json.loads((out / "manifest.json").read_text()))


@pytest.mark.parametrize("extra", [(), ("data.mode=misaligned", "data.storage.dtype=uint16",
                                        "data.storage.compression=zstd", "data.degradation.noise_sigma=0.01")])
def test_one_and_two_ranks_byte_identical(cohort, tmp_path, extra):
    t = time.perf_counter()
    preprocess(cohort, tmp_path / "r1", 1, extra)
    preprocess(cohort, tmp_path / "r2", 2, extra)
    a, b = tmp_path / "r1" / "out", tmp_path / "r2" / "out"
    assert files(a) == files(b) and len(files(a)) >= 6
    assert manifest(a) == manifest(b)
    m = load_manifest(a)
    assert all(r.status == "ok" for r in m.subjects)
    src, tgt = m.shard_paths("source"), m.shard_paths("target")
    assert len(src) == 2 and len(tgt) == 2 and len(m.volume_paths("val")) == 1 and len(m.volume_paths("test")) == 1
    for p in tgt:
        x = read_patches(p, [0, 1])
        assert x.shape == (2, 3, 16, 16) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    for p in src:
        assert read_patches(p, [0]).shape == (1, 6, 32, 32) and patch_count(p) > 0
    v = read_volume(m.volume_paths("test")[0])
    assert v.lr.shape == tuple(n // 2 for n in v.hr.shape) and v.mask.shape == v.hr.shape
    np.testing.assert_allclose(v.lr_affine, v.hr_affine @ np.diag([2, 2, 2, 1]))
    if "data.mode=misaligned" in extra:
        tgt_rows = [r for r in m.subjects if r.group == "target"]
        assert all(set(r.shards) == {"source", "target"} and r.motion for r in tgt_rows)
        assert all(abs(v) <= 2 for r in tgt_rows for v in r.motion.values())
        # paired patches: HR patch k covers LR patch k
        import h5py

        with h5py.File(tmp_path / "r1/out" / tgt_rows[0].shards["source"]) as fs, \
                h5py.File(tmp_path / "r1/out" / tgt_rows[0].shards["target"]) as ft:
            np.testing.assert_array_equal(fs["origins"][()], 2 * ft["origins"][()])
    print(f"1 vs 2 ranks {extra}: {time.perf_counter() - t:.1f}s")


def test_rerun_reuses_and_config_change_redoes(cohort, tmp_path):
    preprocess(cohort, tmp_path)
    out = tmp_path / "out"
    before = files(out)
    r = preprocess(cohort, tmp_path)
    assert "0 processed, 6 reused" in r.stderr
    assert files(out) == before
    r = preprocess(cohort, tmp_path, extra=("data.patches.max_per_subject=4",))
    assert "6 processed" in r.stderr and "another data config" in r.stderr


def test_bad_inputs_fail_alone(tmp_path):
    root = tmp_path / "cohort"
    blob_cohort(root, 3, seed=1)
    from preprocessing.discover import HCP_T1W

    expected = write_bad_inputs(root, lambda k: HCP_T1W.format(subject=f"bad_{k}"))
    (root / "bad_missing").mkdir()
    r = preprocess(root, tmp_path / "run", 2, ("data.split.preset=counts", "data.split.counts=[3,3,3,2]"))
    m = load_manifest(tmp_path / "run" / "out")
    rows = {r.id: r for r in m.subjects}
    assert len(rows) == 3 + len(expected)
    log = (tmp_path / "run/out/logs/preprocess.jsonl").read_text()
    for kind, text in expected.items():
        row = rows[f"bad_{kind}"]
        assert row.status == "failed" and text in row.error and row.group != "unused", (kind, row)
        assert row.input in row.error and row.error in r.stderr.replace("\n", "") or text in r.stderr
        assert text in log
        assert not row.shards
    assert all(rows[s].status == "ok" for s in rows if not s.startswith("bad_"))
    assert {s.subject for s in m.shards} == {s for s in rows if not s.startswith("bad_") and rows[s].group != "unused"}


def test_exception_in_a_rank_aborts_the_job(cohort, tmp_path):
    t = time.perf_counter()
    victim = sorted(p.name for p in cohort.iterdir())[1]
    r = preprocess(cohort, tmp_path, 2, env={"UDEAN_PREPROCESS_CRASH": victim}, timeout=60, check=False)
    assert r.returncode != 0
    assert "injected internal error" in r.stdout + r.stderr
    assert time.perf_counter() - t < 60


def _rank_pids(mpirun_pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{mpirun_pid}/task/{mpirun_pid}/children").read_text().split()]
    except OSError:
        return []


def test_sigkill_a_rank_then_rerun_matches_clean_run(cohort, tmp_path):
    preprocess(cohort, tmp_path / "clean")
    clean_files, clean_manifest = files(tmp_path / "clean/out"), manifest(tmp_path / "clean/out")
    rng = random.Random(1234)
    killed = 0
    for trial in range(10):
        cwd = tmp_path / f"trial{trial}"
        if trial % 3 == 2:  # some trials start from a partly done output of an earlier trial
            subprocess.run(["cp", "-a", str(tmp_path / f"trial{trial - 1}/out"), str(cwd / "out")], check=True) \
                if (cwd.mkdir() or True) else None
        p = preprocess(cohort, cwd, 2, background=True)
        if trial % 2:  # kill after k subjects were recorded: lands inside the work phase
            k, log, t0 = rng.randint(0, 5), cwd / "out/logs/preprocess.jsonl", time.time()
            while p.poll() is None and time.time() - t0 < 30 and (
                    not log.exists() or len(log.read_text().splitlines()) < k):
                time.sleep(0.002)
        else:  # anywhere from start-up to the end
            time.sleep(rng.uniform(0.2, 2.0))
        pids = _rank_pids(p.pid)
        if pids and p.poll() is None:
            os.kill(rng.choice(pids), signal.SIGKILL)
            killed += 1
        try:
            p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"trial {trial}: job hung after a rank was killed")
        out = cwd / "out"
        if out.exists() and (out / "manifest.json").exists():
            load_manifest(out)  # the manifest on disk is always whole
        preprocess(cohort, cwd, 2 if trial % 2 else 1)
        assert files(out) == clean_files, f"trial {trial}"
        assert manifest(out) == clean_manifest, f"trial {trial}"
        assert udean(["shards", "verify", "out"], cwd).returncode == 0
    assert killed >= 5


def test_verify_finds_and_regenerate_rebuilds(cohort, tmp_path):
    preprocess(cohort, tmp_path)
    out = tmp_path / "out"
    clean = files(out)
    m = load_manifest(out)
    flip, trunc, gone = (out / m.shard_paths("target")[0], out / m.volume_paths("val")[0], out / m.shard_paths("source")[1])
    b = bytearray(flip.read_bytes())
    b[len(b) // 2] ^= 0x01
    flip.write_bytes(bytes(b))
    trunc.write_bytes(trunc.read_bytes()[:-100])
    gone.unlink()
    r = udean(["shards", "verify", "out", "--json"], tmp_path, check=False)
    assert r.returncode == 1
    bad = json.loads(r.stdout)
    assert {Path(p["path"]).name for p in bad} == {flip.name, trunc.name, gone.name}
    # one group at a time (the array form of slurm/regenerate_shards.sh): only that group's subject
    r = udean(["shards", "verify", "out", "--json", "--group", "val"], tmp_path, check=False)
    assert r.returncode == 1 and [Path(p["path"]).name for p in json.loads(r.stdout)] == [trunc.name]
    r = udean(["shards", "regenerate", "out", "--no-progress", "--group", "val"], tmp_path)
    assert "redid 1 subjects" in r.stderr
    assert udean(["shards", "verify", "out", "--group", "val"], tmp_path).returncode == 0
    r = udean(["shards", "regenerate", "out", "--no-progress"], tmp_path, ranks=2)
    assert "redid 2 subjects" in r.stderr
    assert files(out) == clean
    assert udean(["shards", "verify", "out"], tmp_path).returncode == 0
