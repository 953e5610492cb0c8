"""Which DeepSpeed optimizer path each `train.precision` x `train.zero_stage` takes, and what one
training step costs on it: host syncs, collectives, dispatched ops, step time.

    OMP_NUM_THREADS=2 python benchmarks/zero_precision.py            # paper model, CPU-sized patches
    python benchmarks/zero_precision.py --smoke --out x.json          # tiny model, seconds (the tests)
    python benchmarks/zero_precision.py --paper-size                  # a GPU: LR 64x64 patches, batch 8

Every (precision, zero stage) the config accepts (fp32 / bf16 / fp16 x ZeRO 0 / 1) gets fresh
engines from the same seed and the same batch; one step is run under `HostCost`
(benchmarks/host_cost.py: host syncs both ways by origin, collectives, dispatched ops), then
`--steps` steps are timed. Why it matters: at ZeRO 0, DeepSpeed wraps a bf16 / fp16 Adam in
`FP16_UnfusedOptimizer`, whose overflow check (deepspeed/runtime/utils.py
`CheckOverflow.has_overflow_serial`) tests every gradient with a Python `if` on a device tensor:
one host sync per parameter tensor, every step, in each engine. ZeRO 1 (`DeepSpeedZeroOptimizer`)
checks nothing per tensor (its overflow test is off for bf16: udean/engines.py).

`syncs_per_step` leaves out torch.optim's reads of its step counters, which torch keeps on the
host on a GPU as well. The counts do not depend on the device: CPU counts are what a GPU would
do. CPU step times say little about a GPU, where each sync also drains the launch queue.
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
from benchmarks.host_cost import HostCost  # noqa: E402
from benchmarks.train_step import SMOKE_OVERRIDES, cleanup, sync  # noqa: E402

import torch  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")


def measure(precision: str, zero: int, args, dist) -> dict[str, Any]:
    from udean.config import load
    from udean.engines import build_engines
    from udean.losses import model_parts
    from udean.models.udean import build
    from udean.steps import train_step

    size = [] if args.paper_size else ["data.patches.lr_size=[16,16]"]
    cfg = load("paper", (SMOKE_OVERRIDES if args.smoke else size) + [
        f"train.precision={precision}", f"train.zero_stage={zero}", f"train.batch_size={args.batch}"])
    torch.manual_seed(0)
    gen, discs = build(cfg.model, slab=cfg.data.patches.slab, **model_parts(cfg.loss))
    tensors = {"g": sum(1 for p in gen.parameters() if p.requires_grad),
               "d": sum(1 for p in discs.parameters() if p.requires_grad)}
    engines = build_engines(cfg, gen, discs, total_steps=10_000, device=dist.device, ds_args=dist.deepspeed_args())
    s, (h, w) = cfg.data.patches.slab, cfg.data.patches.lr_size
    g = torch.Generator().manual_seed(1)
    y_s = torch.rand(args.batch, 2 * s, 2 * h, 2 * w, generator=g).to(dist.device)
    x_t = torch.rand(args.batch, s, h, w, generator=g).to(dist.device)
    for _ in range(args.warmup):
        train_step(engines, y_s, x_t, cfg.loss, dist)
    with HostCost(inputs=(y_s, x_t)) as counted:
        first = train_step(engines, y_s, x_t, cfg.loss, dist)
    times = []
    for _ in range(args.steps):
        sync(dist.device)
        t = time.perf_counter()
        train_step(engines, y_s, x_t, cfg.loss, dist)
        sync(dist.device)
        times.append(time.perf_counter() - t)
    row = {"precision": precision, "zero_stage": zero, "default": cfg.train.zero_stage == load(
               "paper", [f"train.precision={precision}"]).train.zero_stage,
           "optimizer": {"g": type(engines.g.optimizer).__name__, "d": type(engines.d.optimizer).__name__},
           "param_tensors": tensors, "syncs_per_step": counted.device_syncs(),
           "syncs_by_origin": dict(counted.reads + counted.writes), "reads_by_origin": dict(counted.reads),
           "writes_by_origin": dict(counted.writes), "collectives_by_origin": dict(counted.collectives),
           "ops_per_step": sum(counted.ops.values()), "skipped": first.skipped,
           "step_s_median": statistics.median(times), "step_s_min": min(times), "steps": args.steps,
           "batch": args.batch}
    del engines
    cleanup(dist.device)
    return row


def chart(path: Path, result: dict) -> Path | None:
    rows = result["rows"]
    labels = [f"{r['precision']} ZeRO {r['zero_stage']}{' (default)' if r['default'] else ''}" for r in rows]
    colors = ["C2" if r["default"] else "C0" for r in rows]
    m = result["provenance"]["machine"]
    where = m["gpu"]["name"] if m.get("gpu") else f"CPU {m['cpu']} ({m['cores']} cores)"
    return bar_chart(path, [
        {"title": "host syncs per G+D step (both ways)", "xlabel": "syncs", "labels": labels,
         "values": [r["syncs_per_step"] for r in rows], "colors": colors,
         "notes": [str(r["syncs_per_step"]) for r in rows]},
        {"title": "ms per G+D step (median)", "xlabel": "ms", "labels": labels,
         "values": [1e3 * r["step_s_median"] for r in rows], "colors": colors,
         "notes": [r["optimizer"]["g"] for r in rows]},
    ], title=f"train.precision x train.zero_stage, {where}{' - SMOKE' if result['smoke'] else ''}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model (seconds)")
    p.add_argument("--paper-size", action="store_true", help="the paper's 64x64 LR patches (default on CPU: 16x16)")
    p.add_argument("--batch", type=int, default=None, help="default 8 with --paper-size, else 1")
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None,
                   help="default: every one this machine's accelerator supports (udean.engines.supported_precisions; "
                        "fp16 needs oneDNN fp16 on a CPU, and its convolutions are very slow there: a minute per "
                        "paper-model step)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/zero_precision_<cpu|gpu>.json)")
    args = p.parse_args(argv)
    args.batch = args.batch or (8 if args.paper_size else 1)
    from udean.engines import check_precision, supported_precisions

    args.precisions = args.precisions or [p for p in PRECISIONS if p in supported_precisions()]
    for precision in args.precisions:
        try:
            check_precision(precision)
        except ValueError as exc:  # one line before any work, not DeepSpeed's traceback after the first rows
            p.error(str(exc))
    from hpc.dist import init

    dist = init("auto")
    kind = "gpu" if dist.device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else RESULTS / f"zero_precision_{kind}{'_smoke' if args.smoke else ''}.json"
    result: dict[str, Any] = {"benchmark": "zero_precision", "provenance": provenance(argv), "smoke": args.smoke,
                              "device": str(dist.device), "patches": "paper" if args.paper_size else "lr 16x16",
                              "rows": []}
    try:
        for precision, zero in ((p, z) for p in args.precisions for z in (0, 1)):
            row = measure(precision, zero, args, dist)
            result["rows"].append(row)
            write_json(out, result)
            print(f"{precision} ZeRO {zero}: {row['optimizer']['g']}, {row['syncs_per_step']} host syncs/step "
                  f"({row['param_tensors']['g'] + row['param_tensors']['d']} parameter tensors), "
                  f"{row['step_s_median'] * 1e3:.0f} ms/step", flush=True)
    finally:
        dist.shutdown()
    png = chart(out.with_suffix(".png"), result)
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
