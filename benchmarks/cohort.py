"""Seconds per full-size synthetic subject (320x320x256, 0.7 mm) on one core: synthesis vs write.

    OMP_NUM_THREADS=1 python benchmarks/cohort.py [--seeds 0 1 2] [--shape 320 320 256]

Writes benchmarks/results/cohort.json (per-seed wall and CPU seconds, machine, versions) and
benchmarks/results/cohort.png (stacked bars per seed).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, before numpy/scipy load

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, provenance, write_json  # noqa: E402
from hpc.atomic import atomic_write_bytes  # noqa: E402
from preprocessing.cohort import nifti_gz_bytes  # noqa: E402
from preprocessing.synthetic import synth_subject  # noqa: E402


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shape", type=int, nargs=3, default=[320, 320, 256])
    p.add_argument("--out", default=str(RESULTS / "cohort.json"))
    args = p.parse_args(argv)
    shape = tuple(args.shape)
    synth_subject(0, (64, 64, 64))  # imports and first-call overheads out of the timings
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            (vol, aff), s_wall, s_cpu = _timed(lambda: synth_subject(seed, shape))
            path = Path(tmp) / f"{seed}.nii.gz"
            _, w_wall, w_cpu = _timed(lambda: atomic_write_bytes(path, nifti_gz_bytes(vol, aff)))
            rows.append({"seed": seed, "synth_s": round(s_wall, 3), "write_s": round(w_wall, 3),
                         "synth_cpu_s": round(s_cpu, 3), "write_cpu_s": round(w_cpu, 3),
                         "file_mb": round(path.stat().st_size / 1e6, 2)})
            print(rows[-1], flush=True)
    mean = {k: round(float(np.mean([r[k] for r in rows])), 3)
            for k in ("synth_s", "write_s", "synth_cpu_s", "write_cpu_s")}
    mean["total_s"] = round(mean["synth_s"] + mean["write_s"], 3)
    result = {
        "benchmark": "synthetic cohort: seconds per subject",
        "shape": list(shape), "voxel_mm": 0.7, "per_seed": rows, "mean": mean,
        "provenance": provenance(argv),
        "note": "wall and process-CPU seconds; on a shared machine wall > CPU when cores are contended",
    }
    out = write_json(args.out, result)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = np.arange(len(rows))
    synth = [r["synth_s"] for r in rows]
    ax.bar(x, synth, label="synth_subject")
    ax.bar(x, [r["write_s"] for r in rows], bottom=synth, label="write .nii.gz")
    ax.set_xticks(x, [f"seed {r['seed']}" for r in rows])
    ax.set_ylabel("seconds (wall, 1 thread)")
    ax.set_title(f"synthetic subject {'x'.join(map(str, shape))}: {mean['total_s']:.2f} s mean", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
