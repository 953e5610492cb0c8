"""The real thing: `udean preprocess` under mpirun -n 2 and as one rank on a tiny synthetic
cohort; byte identity, bad inputs, rank crash, SIGKILL at random points, verify / regenerate,
exit codes, output errors on a full disk (a real tmpfs), the output lock, changed inputs."""
import json
import os
import random
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


def test_rerun_reuses_and_a_config_change_needs_overwrite(cohort, tmp_path):
    preprocess(cohort, tmp_path)
    out = tmp_path / "out"
    before, manifest_before = files(out), (out / "manifest.json").read_bytes()
    r = preprocess(cohort, tmp_path)
    assert "0 processed, 6 reused" in r.stderr
    assert files(out) == before
    # another config into a finished data set: refused before any work, naming the key
    r = preprocess(cohort, tmp_path, extra=("data.patches.max_per_subject=4",), check=False)
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "another data config" in err and "patches.max_per_subject" in err
    assert files(out) == before and (out / "manifest.json").read_bytes() == manifest_before
    r = preprocess(cohort, tmp_path, extra=("--overwrite", "data.patches.max_per_subject=4"))
    assert "6 processed" in r.stderr and "another data config" in r.stderr


def test_a_changed_input_at_the_same_path_is_redone(tmp_path):
    """Reuse compares the input's size and mtime, not only its path."""
    root = tmp_path / "cohort"
    blob_cohort(root, 6)
    preprocess(root, tmp_path)
    out = tmp_path / "out"
    m = load_manifest(out)
    victim = next(r for r in m.subjects if r.group == "target")
    assert victim.input_stat == [os.stat(victim.input).st_size, os.stat(victim.input).st_mtime_ns]
    save(Path(victim.input), smooth_volume(SHAPE, 99))  # new content, same path
    r = preprocess(root, tmp_path)
    assert "1 processed, 5 reused" in r.stderr, r.stderr
    assert load_manifest(out).subject(victim.id).input_stat == [os.stat(victim.input).st_size,
                                                                os.stat(victim.input).st_mtime_ns]


def test_bad_inputs_fail_alone(tmp_path):
    root = tmp_path / "cohort"
    blob_cohort(root, 3, seed=1)
    from preprocessing.discover import HCP_T1W

    expected = write_bad_inputs(root, lambda k: HCP_T1W.format(subject=f"bad_{k}"))
    (root / "bad_missing").mkdir()
    split = ("data.split.preset=counts", "data.split.counts=[3,3,3,2]")
    r = preprocess(root, tmp_path / "run", 2, split, check=False)
    # failed subjects: exit 1, and the summary names the count and where the errors are
    err = " ".join(r.stderr.split())
    n_bad = sum(row.status == "failed" for row in load_manifest(tmp_path / "run" / "out").subjects)
    assert r.returncode == 1 and n_bad >= 8, err[-2000:]
    assert f"{n_bad} of {3 + n_bad} subjects failed" in err and "logs/preprocess.jsonl" in err and "--allow-failures" in err
    assert preprocess(root, tmp_path / "run", 2, ("--allow-failures", *split)).returncode == 0
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


def test_a_bad_subject_folder_name_or_symlink_loop_fails_alone(tmp_path):
    """Issue 18 item 8: one folder with a space refused the whole cohort (after creating an empty
    output folder); a symlink loop was reported as 'missing file'."""
    root = tmp_path / "cohort"
    blob_cohort(root, 6)
    good = sorted(p.name for p in root.iterdir())[0]
    (root / good).rename(root / "with space")
    (root / "looped").symlink_to(root / "looped")
    r = preprocess(root, tmp_path, extra=("data.split.preset=counts", "data.split.counts=[2,2,2,1]"), check=False)
    rows = {row.id: row for row in load_manifest(tmp_path / "out").subjects}
    assert r.returncode == 1
    assert rows["with space"].status == "failed" and "not usable as a file name" in rows["with space"].error
    assert rows["looped"].status == "failed" and "symlink loop" in rows["looped"].error
    assert sum(row.status == "ok" for row in rows.values()) == 5
    r = preprocess(tmp_path / "nowhere", tmp_path / "second", check=False)
    assert r.returncode == 2 and "is not a folder" in r.stderr and not (tmp_path / "second" / "out").exists()


def test_exception_in_a_rank_aborts_the_job(cohort, tmp_path):
    t = time.perf_counter()
    victim = sorted(p.name for p in cohort.iterdir())[1]
    r = preprocess(cohort, tmp_path, 2, env={"UDEAN_PREPROCESS_CRASH": victim}, timeout=60, check=False)
    assert r.returncode != 0
    assert "injected internal error" in r.stdout + r.stderr
    assert time.perf_counter() - t < 60


def test_sigkill_a_rank_then_rerun_matches_clean_run(tmp_path):
    """3 of the kill trials of benchmarks/kill_trials.py (which runs 20, results committed)."""
    from benchmarks.kill_trials import passed, preprocess_trials

    trials = preprocess_trials(3, tmp_path, seed=random.randrange(2**31))
    assert passed(trials), trials
    assert all(t["manifest_whole_after_kill"] for t in trials) and sum(t["killed"] for t in trials) >= 2


def test_a_second_job_into_the_same_folder_is_refused_and_nothing_is_lost(tmp_path, capsys):
    """Issue 18 item 4: one job's start-up cleanup deleted the other's temp files and the manifest
    ended up naming files that were not there. Now the second job is refused at once. (The
    second job runs in this process, so it starts within milliseconds, while the first works.)"""
    import preprocessing.driver  # noqa: F401  imported now: the second job starts at once
    from preprocessing.discover import HCP_T1W
    from udean.cli import main

    root = tmp_path / "cohort"
    for i in range(12):  # big enough that the first job runs for seconds
        save(root / HCP_T1W.format(subject=f"s{i:02d}"), smooth_volume((96, 96, 80), i))
    split = ("data.split.preset=counts", "data.split.counts=[4,4,2,2]")
    preprocess(root, tmp_path / "clean", 1, split)
    first = preprocess(root, tmp_path, 2, split, background=True)
    log = tmp_path / "out" / "logs" / "preprocess.jsonl"
    t0 = time.time()
    while first.poll() is None and not log.exists() and time.time() - t0 < 60:
        time.sleep(0.002)
    rc = main(["preprocess", "--config", "tiny", "--data-root", str(root), "--out", str(tmp_path / "out"),
               "--no-progress", *split])
    still_running = first.poll() is None
    err = " ".join(capsys.readouterr().err.split())
    assert still_running, "the first job ended before the second started"
    assert rc == 2 and "is being written by udean preprocess (pid" in err and "Traceback" not in err, err
    assert first.wait(timeout=120) == 0
    assert files(tmp_path / "out") == files(tmp_path / "clean" / "out")
    assert manifest(tmp_path / "out") == manifest(tmp_path / "clean" / "out")


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"needs root to mount a small tmpfs (CI runs as root): {r.stderr.strip()}")


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_full_disk_stops_the_job_cleanly_and_loses_nothing(cohort, tmp_path, ranks):
    """Issue 18 item 3: disk full was recorded against the input and the job went on with rc 0;
    with 8 KB free, HDF5 crashed the process (rc 139). Now: exit 74 with one line naming the
    file, no temp file left, every finished subject kept; after freeing space the rerun
    completes to the clean run's bytes."""
    preprocess(cohort, tmp_path / "clean")
    disk = tmp_path / "disk"
    _tmpfs(disk, "160k")  # room for the manifest and a few shards, not all of them
    try:
        r = preprocess(cohort, disk, ranks, check=False)
        err = " ".join((r.stdout + r.stderr).split())
        assert r.returncode == 74, err[-3000:]
        assert "No space left on device" in err and "Traceback" not in err and "Segmentation" not in err
        out = disk / "out"
        assert not [p for p in out.rglob("*.tmp")]
        m = load_manifest(out)
        assert not any(row.status == "failed" for row in m.subjects)  # no input is blamed
        for row in m.shards:  # what the manifest lists is whole
            assert files(out)[row.path] == files(tmp_path / "clean/out")[row.path]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        r = preprocess(cohort, disk, ranks)
        assert f"{len([s for s in m.subjects if s.status == 'ok' and s.group != 'unused'])} reused" in r.stderr
        assert files(out) == files(tmp_path / "clean/out") and manifest(out) == manifest(tmp_path / "clean/out")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_verify_and_regenerate_fail_on_a_set_whose_subjects_all_failed(tmp_path):
    from preprocessing.discover import HCP_T1W

    root = tmp_path / "cohort"
    for k in range(6):
        (root / HCP_T1W.format(subject=f"s{k}")).parent.mkdir(parents=True)
        (root / HCP_T1W.format(subject=f"s{k}")).write_bytes(b"not a nifti")
    r = preprocess(root, tmp_path, extra=("--allow-failures",), check=False)
    assert r.returncode == 1 and "6 of 6 subjects failed" in " ".join(r.stderr.split())  # all failed: always 1
    r = udean(["shards", "verify", "out"], tmp_path, check=False)
    err = " ".join(r.stderr.split())
    assert r.returncode == 1 and "0 shards, 6 problems" in err and "failed in preprocessing" in err
    r = udean(["shards", "regenerate", "out", "--no-progress"], tmp_path, check=False)
    assert r.returncode == 1 and "redid 6 subjects" in r.stderr


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


def _journal_ids(out: Path) -> list[str]:
    from preprocessing.manifest import journal_path

    lines = journal_path(out).read_bytes().split(b"\n")[1:-1]  # the header; a torn last line
    return [json.loads(x)["subject"]["id"] for x in lines]


def test_a_killed_run_and_a_killed_resume_lose_only_the_subjects_in_flight(tmp_path):
    """Issue 28: rank 0 appends each finished subject to manifest.journal and rewrites
    manifest.json only every few seconds; SIGKILL then loses nothing recorded. Killed after k
    subjects, the rerun reuses every subject of the journal (manifest.json alone held fewer: it
    lags behind); a resume killed in turn keeps them too."""
    root = tmp_path / "cohort"
    blob_cohort(root, 40)
    split = ("data.split.preset=counts", "data.split.counts=[18,18,2,2]")
    preprocess(root, tmp_path / "clean", 1, split)
    out = tmp_path / "out"
    log = out / "logs" / "preprocess.jsonl"

    def run_until(k: int) -> None:
        proc = preprocess(root, tmp_path, 1, split, background=True)
        while proc.poll() is None and (not log.exists() or len(log.read_text().splitlines()) < k):
            time.sleep(0.002)
        proc.kill()
        assert proc.wait(timeout=60) == -9

    run_until(8)
    recorded = _journal_ids(out)
    assert len(recorded) >= 8
    on_disk = {r["id"] for r in json.loads((out / "manifest.json").read_text())["subjects"]
               if r["status"] == "ok" and r["group"] != "unused"}
    assert on_disk < set(recorded)  # the manifest's last rewrite (the plan, or a periodic one) lags
    folded = load_manifest(out)
    assert {r.id for r in folded.subjects if r.status == "ok"} == set(recorded)

    log.unlink()
    run_until(len(recorded) + 3)  # the resume, killed while it re-checks (reuses) the recorded subjects
    assert {r.id for r in load_manifest(out).subjects if r.status == "ok"} >= set(recorded)
    r = preprocess(root, tmp_path, 1, split)
    reused = int(r.stderr.split(" reused")[0].split()[-1])
    assert reused >= len(recorded), r.stderr
    assert files(out) == files(tmp_path / "clean" / "out") and manifest(out) == manifest(tmp_path / "clean" / "out")
    from preprocessing.manifest import journal_path

    assert not journal_path(out).exists()  # a finished run leaves the manifest alone


def test_rank0_dispatches_only_above_its_rank_count(cohort, tmp_path):
    """Beyond RANK0_WORKS_UP_TO ranks rank 0 only hands out and records subjects (here forced
    at 2 ranks): every subject is processed by rank 1, with the same bytes."""
    preprocess(cohort, tmp_path / "clean")
    code = ("import sys, preprocessing.driver as d; d.RANK0_WORKS_UP_TO = 1; from udean.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    cmd = [str(BIN / "mpirun"), "--oversubscribe", "-n", "2", "-x", "OMP_NUM_THREADS=1", sys.executable, "-c", code,
           "preprocess", "--config", "tiny", "--data-root", str(cohort), "--out", "out", "--no-progress"]
    (tmp_path / "d").mkdir()
    r = subprocess.run(cmd, cwd=tmp_path / "d", capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = tmp_path / "d" / "out"
    ranks = [json.loads(x)["rank"] for x in (out / "logs" / "preprocess.jsonl").read_text().splitlines()]
    assert ranks and set(ranks) == {1}
    assert files(out) == files(tmp_path / "clean" / "out") and manifest(out) == manifest(tmp_path / "clean" / "out")
    run = json.loads((out / "logs" / "preprocess_runs.jsonl").read_text())
    assert run["ranks"] == 2 and run["processed"] == 6 and run["dispatch_ms"] > 0 and run["bookkeeping_ms"] > 0
