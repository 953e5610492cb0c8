"""Whole-volume inference speed: a 160x160x128 LR volume -> 320x320x256 SR volume through
`udean.infer.Inferer` (the sliding window `udean infer`, `udean evaluate` and validation run,
configured by the `infer:` section) with the SR network (LR encoder + SR decoder) of the
paper's configuration, thin-slab and 3D.

    # a GPU node (one GPU, a few minutes)
    python benchmarks/infer.py
    python benchmarks/infer.py --variants thin_slab --setups bf16_autocast --tile-batches 8 64
    # CPU smoke check (tiny model and volume, seconds): what the tests run
    OMP_NUM_THREADS=1 python benchmarks/infer.py --smoke

Setups: `fp32` (IEEE), `tf32` (CUDA only), `bf16_autocast` (`udean infer --amp`), `bf16_weights`
(weights and tiles in bf16, as validation runs a bf16 engine). Each (variant, setup, tile batch)
is run once untimed (cuDNN autotuning, allocator warm-up), then `--repeats` times; the figure is
the median wall time of the whole call: tiling, forward passes, blending and the copy of the SR
volume back to the host. Weights are random (speed does not depend on them), the volume too.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, bar_chart, provenance, write_json  # noqa: E402
from benchmarks.train_step import SMOKE_OVERRIDES, cleanup, set_fp32_precision, sync  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

SETUPS = ("fp32", "tf32", "bf16_autocast", "bf16_weights")
PAPER_LR_SHAPE = (160, 160, 128)  # HCP 320x320x256 at 0.7 mm, x2 down: slice axis first


def sr_net(cfg, device: torch.device, bf16_weights: bool):
    """The inference network of the paper's configuration, random weights, eval mode."""
    from udean.models.udean import build_sr

    torch.manual_seed(0)
    net = build_sr(cfg.model, slab=cfg.data.patches.slab).to(device).eval()
    if not bf16_weights:
        return net
    net = net.to(torch.bfloat16)
    return lambda tiles: net(tiles.to(torch.bfloat16)).float()


def tile_flops(cfg, device: torch.device) -> int:
    """FLOPs of one tile through the SR network (counted, torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = sr_net(cfg, device, bf16_weights=False)
    s, (h, w) = cfg.data.patches.slab, cfg.data.patches.lr_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.rand(1, s, h, w, device=device))
    return int(counter.get_total_flops())


def run_point(cfg, lr: np.ndarray, device: torch.device, setup: str, tile_batch: int, repeats: int) -> dict[str, Any]:
    from dataclasses import replace

    from udean.infer import Inferer

    set_fp32_precision("tf32" if setup == "tf32" else "ieee")
    model = sr_net(cfg, device, bf16_weights=setup == "bf16_weights")
    inferer = replace(Inferer.from_config(cfg.infer, cfg.data.patches, device), batch_size=tile_batch,
                      amp=setup == "bf16_autocast")
    t = time.perf_counter()
    sr = inferer(lr, model)
    sync(device)
    first = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sr = inferer(lr, model)
        sync(device)
        times.append(time.perf_counter() - t)
    tiles = inferer.tiles(lr.shape)
    row = {"setup": setup, "tile_batch": tile_batch, "status": "ok", "first_call_s": first,
           "seconds_median": statistics.median(times), "seconds_min": min(times), "repeats": repeats,
           "tiles": tiles, "sr_shape": list(sr.shape), "sr_finite": bool(np.isfinite(sr).all())}
    row["tiles_per_s"] = tiles / row["seconds_median"]
    row["sr_voxels_per_s"] = float(np.prod(sr.shape)) / row["seconds_median"]
    if device.type == "cuda":
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, sr
    set_fp32_precision("ieee")
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and volume: a CPU check in seconds")
    p.add_argument("--variants", nargs="+", default=["thin_slab", "3d"], choices=["thin_slab", "3d"])
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    p.add_argument("--tile-batches", nargs="+", type=int, default=None, help="tiles per forward (default 8 32)")
    p.add_argument("--lr-shape", nargs=3, type=int, default=None,
                   help=f"LR volume, slice axis first (default {PAPER_LR_SHAPE}; smoke 8 24 24)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (default 3; smoke 1)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/infer_<gpu|cpu>.json)")
    args = p.parse_args(argv)
    args.tile_batches = args.tile_batches or ([4] if args.smoke else [8, 32])
    args.lr_shape = tuple(args.lr_shape or ((8, 24, 24) if args.smoke else PAPER_LR_SHAPE))
    args.repeats = args.repeats or (1 if args.smoke else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from udean.config import load

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type != "cuda":
        print("infer benchmark: no CUDA device, running on CPU", file=sys.stderr)
    torch.backends.cudnn.benchmark = True
    out = Path(args.out) if args.out else RESULTS / f"infer_{'gpu' if device.type == 'cuda' else 'cpu'}.json"
    lr = np.random.default_rng(0).random(args.lr_shape, dtype=np.float32)
    window = load("paper").infer
    result: dict[str, Any] = {
        "benchmark": "infer", "provenance": provenance(argv),
        "settings": {"smoke": args.smoke, "lr_shape": list(args.lr_shape), "device": str(device),
                     "tile_batches": args.tile_batches, "repeats": args.repeats, "overlap": window.overlap,
                     "slab_overlap": window.slab_overlap if window.slab_overlap is not None else "slab - 1 (the default)",
                     "overrides": SMOKE_OVERRIDES if args.smoke else [], "config": "paper"},
        "runs": []}
    if args.smoke:
        result["note"] = "SMOKE: tiny model and volume on CPU; the figures test the script, not the hardware"
    for variant in args.variants:
        cfg = load("paper", (SMOKE_OVERRIDES if args.smoke else []) + [f"model.variant={variant}"])
        flops = tile_flops(cfg, device)
        for setup in args.setups:
            for tb in args.tile_batches:
                row: dict[str, Any] = {"variant": variant, "setup": setup, "tile_batch": tb}
                if setup == "tf32" and device.type != "cuda":
                    row.update(status="skipped", reason="TF32 is a CUDA tensor-core format; on CPU it would equal fp32")
                else:
                    try:
                        row.update(run_point(cfg, lr, device, setup, tb, args.repeats))
                        row["flops_per_tile"] = flops
                        row["tflops"] = flops * row["tiles"] / row["seconds_median"] / 1e12
                    except torch.cuda.OutOfMemoryError as exc:
                        row.update(status="oom", reason=str(exc).splitlines()[0])
                    finally:
                        cleanup(device)
                result["runs"].append(row)
                write_json(out, result)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                       if k in ("variant", "setup", "tile_batch", "status", "seconds_median", "tiles", "tflops")},
                      flush=True)
    ok = [r for r in result["runs"] if r.get("status") == "ok"]
    m = result["provenance"]["machine"]
    where = m["gpu"]["name"] if m.get("gpu") else f"CPU {m['cpu']} ({m['cores']} cores)"
    png = bar_chart(out.with_suffix(".png"), [{
        "title": f"LR {'x'.join(map(str, args.lr_shape))} -> SR, seconds per volume (TFLOP/s)",
        "xlabel": "seconds", "labels": [f"{r['variant']} {r['setup']} tb{r['tile_batch']}" for r in ok],
        "values": [r["seconds_median"] for r in ok], "notes": [f"{r['tflops']:.3g}" for r in ok]}],
        title=f"UDEAN whole-volume inference, {where}{' - SMOKE (tiny model)' if args.smoke else ''}")
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
