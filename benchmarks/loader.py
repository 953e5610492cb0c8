"""Data-loading speed: (source HR, target LR) patch pairs per second out of HDF5 shards, read by
the training loop's own DataLoader (`udean.train.patch_data` + `data_loader`, what training
builds) with N workers, against what the training step consumes.

    # a GPU node: synthetic paper-size shards in $TMPDIR (or --data DIR with a manifest.json)
    python benchmarks/loader.py --workers 0 1 2 4 8 16 --step-json benchmarks/results/train_step_gpu.json
    python benchmarks/loader.py --data /scratch/udean/data         # the real preprocessed shards
    # CPU smoke check (tiny patches, seconds): what the tests run
    OMP_NUM_THREADS=1 python benchmarks/loader.py --smoke

A synthetic shard set is written with preprocessing's own writer (float16, one patch per chunk,
`--compression`), so the read path is exactly training's. Just written, those files sit in the
page cache: the figure is decode + h5py + collate + worker overhead, not disk bandwidth; point
--data at shards on the cluster file system (after they dropped out of the cache) for that.

Consumption: patches/s of the training step from a train_step JSON (each ok setup at the same
batch), or --consumption; `keeps_up` says whether the loader delivers at least that much.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, bar_chart, provenance, relative, write_json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402


def write_synthetic_shards(root: Path, n_shards: int, per_shard: int, slab: int, lr_size: tuple[int, int],
                           compression: str, dtype: str) -> tuple[list[Path], list[Path]]:
    """`n_shards` source (2S, 2h, 2w) and target (S, h, w) shards of random patches in [0, 1]."""
    from preprocessing.config import StorageConfig
    from preprocessing.shards import write_patches

    storage = StorageConfig(dtype=dtype, compression=compression)
    rng = np.random.default_rng(0)
    h, w = lr_size
    paths: dict[str, list[Path]] = {"source": [], "target": []}
    for group, shape in (("source", (2 * slab, 2 * h, 2 * w)), ("target", (slab, h, w))):
        for k in range(n_shards):
            p = root / "shards" / group / f"rank{k:04d}.h5"
            p.parent.mkdir(parents=True, exist_ok=True)
            patches = rng.random((per_shard, *shape), dtype=np.float32)
            write_patches(p, patches, np.zeros((per_shard, 3), np.int32), kind=("hr" if group == "source" else "lr"),
                          subject=f"synth{k}", group=group, storage=storage)
            paths[group].append(p)
    return paths["source"], paths["target"]


def measure(source_paths, target_paths, batch: int, workers: int, batches: int, device: torch.device) -> dict[str, Any]:
    """Pairs/s of the training DataLoader over `batches` batches after the first (startup apart)."""
    from udean.config import load
    from udean.train import data_loader, patch_data

    train = load("paper", [f"train.batch_size={batch}", f"train.num_workers={workers}", "train.seed=0"]).train
    dataset, sampler = patch_data(source_paths, target_paths, train, steps_per_epoch=batches + 1)
    loader = data_loader(dataset, sampler, train, device)
    t0 = time.perf_counter()
    it = iter(loader)
    y_s, x_t = next(it)
    first = time.perf_counter() - t0
    times = []
    t = time.perf_counter()
    for y_s, x_t in it:
        now = time.perf_counter()
        times.append(now - t)
        t = now
    total = sum(times)
    del it, loader
    dataset.source.close()
    dataset.target.close()
    return {"workers": workers, "batch": batch, "batches": len(times), "first_batch_s": first,
            "pairs_per_s": len(times) * batch / total, "batch_s_median": statistics.median(times),
            "hr_shape": list(y_s.shape[1:]), "lr_shape": list(x_t.shape[1:]), "pinned": device.type == "cuda"}


def step_consumption(path: Path | None, batch: int) -> dict[str, float]:
    """{setup: patches/s} of the ok training-step setups at `batch` (all variants), from a JSON."""
    if path is None or not path.is_file():
        return {}
    d = json.loads(path.read_text())
    return {f"{r['variant']} {r['setup']}": r["patches_per_s"] for r in d.get("runs", [])
            if r.get("status") == "ok" and r.get("batch") == batch and "patches_per_s" in r}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny patches and shards: a CPU check in seconds")
    p.add_argument("--data", default=None, help="a preprocessed data folder (manifest.json); default: synthetic shards")
    p.add_argument("--workers", nargs="+", type=int, default=None, help="DataLoader workers (default 0 1 2 4 8)")
    p.add_argument("--batch", type=int, default=8, help="patches per batch (per rank)")
    p.add_argument("--batches", type=int, default=None, help="timed batches per point (default 100; smoke 10)")
    p.add_argument("--shards", type=int, default=4, help="synthetic shards per group")
    p.add_argument("--per-shard", type=int, default=None, help="patches per synthetic shard (default 256; smoke 32)")
    p.add_argument("--compression", default="none", choices=["none", "gzip", "lz4", "zstd"])
    p.add_argument("--dtype", default="float16", choices=["float16", "uint16"])
    p.add_argument("--step-json", default=None, help="train_step JSON giving the step's patches/s")
    p.add_argument("--consumption", type=float, default=None, help="the step's patches/s, if no JSON")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/loader_<gpu|cpu>.json)")
    args = p.parse_args(argv)
    args.workers = args.workers if args.workers is not None else ([0, 1, 2] if args.smoke else [0, 1, 2, 4, 8])
    args.batches = args.batches or (10 if args.smoke else 100)
    args.per_shard = args.per_shard or (32 if args.smoke else 256)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from udean.config import load

    cuda = torch.cuda.is_available()
    cfg = load("paper", ["data.patches.lr_size=[16,16]"] if args.smoke else [])
    slab, lr_size = cfg.data.patches.slab, tuple(cfg.data.patches.lr_size)
    out = Path(args.out) if args.out else RESULTS / f"loader_{'gpu' if cuda else 'cpu'}.json"
    # the step that consumes patches of the same size: the GPU run, or the smoke run for --smoke
    step_json = Path(args.step_json) if args.step_json else \
        RESULTS / ("train_step_cpu_smoke.json" if args.smoke else "train_step_gpu.json")
    result: dict[str, Any] = {"benchmark": "loader", "provenance": provenance(argv),
                              "settings": {k: relative(v) if k in ("data", "step_json") else v
                                           for k, v in vars(args).items() if k != "out"}, "points": []}
    with tempfile.TemporaryDirectory(prefix="udean-loader-") as tmp:
        if args.data:
            from preprocessing.manifest import load_manifest

            m = load_manifest(args.data)
            source_paths, target_paths = m.shard_paths("source"), m.shard_paths("target")
            result["data"] = {"kind": "preprocessed", "path": relative(args.data)}
        else:
            t = time.perf_counter()
            source_paths, target_paths = write_synthetic_shards(Path(tmp), args.shards, args.per_shard, slab, lr_size,
                                                                args.compression, args.dtype)
            result["data"] = {"kind": "synthetic (page cache warm)", "shards_per_group": args.shards,
                              "patches_per_shard": args.per_shard, "compression": args.compression,
                              "dtype": args.dtype, "lr_size": list(lr_size), "slab": slab,
                              "bytes": sum(p.stat().st_size for p in [*source_paths, *target_paths]),
                              "write_s": time.perf_counter() - t}
        for w in args.workers:
            point = measure(source_paths, target_paths, args.batch, w, args.batches,
                            torch.device("cuda" if cuda else "cpu"))
            result["points"].append(point)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in point.items()}, flush=True)
    consumption = step_consumption(step_json, args.batch)
    if args.consumption:
        consumption["given"] = args.consumption
    best = max(p["pairs_per_s"] for p in result["points"])
    result["consumption"] = {"source": relative(step_json) if step_json.is_file() else None, "batch": args.batch,
                             "step_patches_per_s": consumption,
                             "keeps_up": {k: best >= v for k, v in consumption.items()},
                             "best_loader_pairs_per_s": best}
    if consumption:
        need = max(consumption.values())
        result["consumption"]["workers_needed_for_fastest"] = next(
            (p["workers"] for p in result["points"] if p["pairs_per_s"] >= need), None)
    write_json(out, result)
    m = result["provenance"]["machine"]
    labels = [f"{p['workers']} workers" for p in result["points"]] + [f"step: {k}" for k in consumption]
    values = [p["pairs_per_s"] for p in result["points"]] + list(consumption.values())
    colors = ["C0"] * len(result["points"]) + ["C3"] * len(consumption)
    png = bar_chart(out.with_suffix(".png"), [{
        "title": f"loader pairs/s (blue) vs training-step patches/s (red), batch {args.batch}",
        "xlabel": "patch pairs / s", "labels": labels, "values": values, "colors": colors}],
        title=f"{m['cpu']} ({m['cores']} cores){' - SMOKE' if args.smoke else ''}")
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
