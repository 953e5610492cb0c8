"""The parts of benchmarks/gpu_check.sh that no other benchmark script measures:

    python benchmarks/gpu_check.py correctness --out X.json [--smoke]
        the real training step (udean.steps.train_step through both DeepSpeed engines) in fp32
        and in bf16 from the same weights on the same batches: the generator's outputs before
        any step and every loss term of the first steps must agree within REL_MAX (a wrong
        kernel, e.g. the cuDNN bf16 Conv3d bugs, gives errors of order 1; rounding ~1e-2).
        Exit 1 if not: the timings that follow would time wrong arithmetic.
    python benchmarks/gpu_check.py step --out X.json [--smoke] [--variants thin_slab 3d]
        the same step's median time at ZeRO 0 and 1, with cudnn.benchmark off and on
        (benchmarks/train_step.py fixes ZeRO 0 and cudnn.benchmark on).

One process, one device (cuda if available). --smoke: the tiny model of train_step.py's smoke
mode on CPU, seconds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import provenance, write_json  # noqa: E402

import torch  # noqa: E402

REL_MAX = 0.05
SMOKE = ["model.features=8", "model.n_groups=1", "model.n_rcab=2", "model.reduction=2", "model.encoder_layers=2",
         "model.disc_features=8", "model.disc_blocks=1", "data.patches.lr_size=[16,16]"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(variant: str, precision: str, zero: int, batch: int, smoke: bool, dist):
    """Fresh engines from seed 0, and two fixed batches: the same for every setup."""
    from udean.config import load
    from udean.engines import build_engines
    from udean.models.udean import build

    cfg = load("paper", (SMOKE if smoke else []) + [
        f"model.variant={variant}", f"train.precision={precision}", f"train.zero_stage={zero}",
        f"train.batch_size={batch}"])
    torch.manual_seed(0)
    gen, discs = build(cfg.model, slab=cfg.data.patches.slab)
    engines = build_engines(cfg, gen, discs, total_steps=1000, device=dist.device, ds_args=dist.deepspeed_args())
    s, (h, w) = cfg.data.patches.slab, cfg.data.patches.lr_size
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(batch, 2 * s, 2 * h, 2 * w, generator=g).to(dist.device),
                torch.rand(batch, s, h, w, generator=g).to(dist.device)) for _ in range(2)]
    return cfg, engines, batches


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def correctness(args, dist) -> dict[str, Any]:
    from udean.steps import train_step

    runs: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        cfg, engines, batches = setup(args.variants[0], precision, 0, args.batch, args.smoke, dist)
        y_s, x_t = batches[0]
        with torch.no_grad():
            out = engines.g(y_s.to(engines.dtype), x_t.to(engines.dtype))
        losses = [train_step(engines, *batches[i % 2], cfg.loss, dist).scalars() for i in range(args.steps)]
        runs[precision] = {"outputs": {k: v.detach().float().cpu() for k, v in out.items()}, "losses": losses}
        del engines
    out_err = {k: rel(runs["bf16"]["outputs"][k], v) for k, v in runs["fp32"]["outputs"].items()}
    first_fp32, first_bf16 = runs["fp32"]["losses"][0], runs["bf16"]["losses"][0]
    loss_err = {k: abs(first_bf16[k] - v) / max(abs(v), 1e-12) for k, v in first_fp32.items()}
    finite = all(torch.isfinite(torch.tensor(list(step.values()))).all() for r in runs.values() for step in r["losses"])
    worst = max([*out_err.values(), *loss_err.values()])
    return {"variant": args.variants[0], "batch": args.batch, "steps": args.steps, "bound_rel": REL_MAX,
            "output_rel_l2": out_err, "first_step_loss_rel": loss_err, "worst": worst, "finite": bool(finite),
            "losses": {p: r["losses"] for p, r in runs.items()}, "passed": bool(finite) and worst <= REL_MAX}


def step_times(args, dist) -> list[dict[str, Any]]:
    from udean.steps import train_step

    precision = "bf16" if dist.device.type == "cuda" else "fp32"
    rows = []
    for variant in args.variants:
        for zero in (0, 1):
            for bench in (False, True):
                torch.backends.cudnn.benchmark = bench
                cfg, engines, batches = setup(variant, precision, zero, args.batch, args.smoke, dist)
                times = []
                for i in range(args.warmup + args.steps):
                    sync(dist.device)
                    t = time.perf_counter()
                    train_step(engines, *batches[i % 2], cfg.loss, dist)
                    sync(dist.device)
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t)
                med = statistics.median(times)
                rows.append({"variant": variant, "precision": precision, "zero_stage": zero, "cudnn_benchmark": bench,
                             "batch": args.batch, "median_s": med, "patches_per_s": args.batch / med})
                print(f"{variant} zero={zero} cudnn.benchmark={bench}: {med * 1e3:.1f} ms/step", flush=True)
                del engines
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("correctness", "step"))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU (seconds)")
    p.add_argument("--variants", nargs="+", choices=("thin_slab", "3d"), default=["thin_slab", "3d"])
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 8; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="steps compared / timed (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.smoke else 8)
    args.steps = args.steps or (2 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    from hpc.dist import init

    dist = init("auto")
    try:
        result = correctness(args, dist) if args.what == "correctness" else {"rows": step_times(args, dist)}
    finally:
        dist.shutdown()
    write_json(args.out, {"provenance": provenance(), "device": str(dist.device), "smoke": args.smoke, **result})
    if args.what == "correctness":
        print(f"bf16 vs fp32: worst relative difference {result['worst']:.3g} (bound {REL_MAX}): "
              f"{'passed' if result['passed'] else 'FAILED'}", flush=True)
        return 0 if result["passed"] else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
