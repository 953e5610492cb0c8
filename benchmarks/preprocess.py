"""Preprocessing benchmark: per-subject stage times at HCP size (320x320x256), subjects/min with
1 and 2 MPI ranks, and gzip decoding stdlib vs ISA-L vs indexed_gzip. Writes JSON + PNG to
benchmarks/results/preprocess.{json,png}.

    python benchmarks/preprocess.py [--shape 320 320 256] [--subjects 4] [--rate-shape 160 160 128]
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, provenance, write_json  # noqa: E402
from preprocessing.config import DataConfig  # noqa: E402
from preprocessing.discover import HCP_T1W, Subject  # noqa: E402
from preprocessing.subject import process  # noqa: E402
from udean.commands import environment, executable, mpirun  # noqa: E402


def head(shape, seed=0) -> np.ndarray:
    """int16 head-like volume: smooth ellipsoid with texture (cheap to make at HCP size)."""
    rng = np.random.default_rng(seed)
    g = np.ogrid[tuple(slice(0, n) for n in shape)]
    r2 = sum(((gi - (n - 1) / 2) / (0.42 * n)) ** 2 for gi, n in zip(g, shape))
    tex = rng.integers(0, 200, size=shape, dtype=np.int16)
    return (np.clip(1.0 - r2, 0, 1) * 900).astype(np.int16) + tex * (r2 < 1)


def write_subject(root: Path, sid: str, shape, seed: int) -> Path:
    p = root / HCP_T1W.format(subject=sid)
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(head(shape, seed), np.diag([0.7, 0.7, 0.7, 1.0])), str(p))
    return p


def bench_gzip(path: Path, repeats: int = 3) -> dict:
    raw = path.read_bytes()
    out = {"compressed_mb": len(raw) / 1e6}
    import indexed_gzip
    from isal import igzip

    def best(fn):
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            n = fn()
            ts.append(time.perf_counter() - t)
        return min(ts), n

    out["stdlib_s"], n = best(lambda: len(gzip.decompress(raw)))
    out["isal_s"], _ = best(lambda: len(igzip.decompress(raw)))

    def igz():
        with indexed_gzip.IndexedGzipFile(str(path)) as f:
            return len(f.read())

    out["indexed_gzip_s"], _ = best(igz)
    out["uncompressed_mb"] = n / 1e6
    return out


def bench_stages(root: Path, shape, out: Path) -> dict:
    res = {}
    for group, mode in (("target", "unpaired"), ("target", "misaligned"), ("source", "unpaired"), ("test", "unpaired")):
        cfg = DataConfig(root=str(root), out=str(out), mode=mode)
        sub = Subject("100000", str(root / HCP_T1W.format(subject="100000")), group)
        r = process(sub, cfg, out)
        assert r.row.status == "ok", r.row.error
        res[f"{group}/{mode}"] = {"total_s": r.row.seconds, **{k: round(v, 3) for k, v in r.timings.items()},
                                  "n_patches": r.row.patches}
    return res


def bench_rate(root: Path, work: Path, n: int) -> dict:
    res = {}
    for ranks in (1, 2):
        out = work / f"rate{ranks}"
        cmd = [executable("udean"), "preprocess", "--data-root", str(root), "--out", str(out), "--no-progress",
               "data.split.preset=counts", f"data.split.counts=[0,{n},0,0]"]
        if ranks > 1:
            cmd = [*mpirun(ranks), "-x", "OMP_NUM_THREADS=1", *cmd]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, env=environment(1, override=True), capture_output=True)
        dt = time.perf_counter() - t
        res[str(ranks)] = {"seconds": round(dt, 2), "subjects": n, "subjects_per_min": round(n / dt * 60, 2)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(320, 320, 256))
    ap.add_argument("--subjects", type=int, default=4, help="subjects for the rank rate runs")
    ap.add_argument("--rate-shape", type=int, nargs=3, default=None, help="volume shape for the rate runs (default --shape)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = tmp / "big"
        path = write_subject(big, "100000", tuple(args.shape), 0)
        result = {
            "provenance": provenance(),
            "shape": list(args.shape),
            "gzip": bench_gzip(path),
            "stages": bench_stages(big, tuple(args.shape), tmp / "stages"),
        }
        rate_shape = tuple(args.rate_shape or args.shape)
        small = tmp / "rate"
        for i in range(args.subjects):
            write_subject(small, str(100000 + i), rate_shape, i)
        result["rate_shape"] = list(rate_shape)
        result["rate"] = bench_rate(small, tmp, args.subjects)
    write_json(RESULTS / "preprocess.json", result)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        stages = ["load", "fft", "motion", "patches", "write"]
        names = list(result["stages"])
        bottom = np.zeros(len(names))
        for s in stages:
            v = np.array([result["stages"][n].get(s, 0.0) for n in names])
            ax[0].bar(names, v, bottom=bottom, label=s)
            bottom += v
        ax[0].set_ylabel("seconds per subject")
        ax[0].set_title(f"stages at {tuple(args.shape)}")
        ax[0].legend()
        ax[0].tick_params(axis="x", rotation=20)
        g = result["gzip"]
        ax[1].bar(["stdlib", "isal", "indexed_gzip"], [g["stdlib_s"], g["isal_s"], g["indexed_gzip_s"]])
        ax[1].set_ylabel("seconds to decode one subject")
        ax[1].set_title("gzip decode")
        fig.tight_layout()
        fig.savefig(RESULTS / "preprocess.png", dpi=100)
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
