"""The part of benchmarks/gpu_check.sh that no other benchmark script measures:

    python benchmarks/gpu_check.py --out X.json [--smoke]

the default recipe's training step (`recommended`, the paper's sizes: udean.steps.train_step
through both DeepSpeed engines, each precision at its default ZeRO stage) in fp32 and in bf16
from the same weights on the same batches and noise draws: the generator's outputs before any
step and every loss term of the first steps must agree within REL_MAX (a wrong kernel, e.g. the
cuDNN bf16 Conv3d bugs, gives errors of order 1; rounding ~1e-2). Exit 1 if not: the timings
that follow would time wrong arithmetic. (Host cost and step time of the same recipe:
benchmarks/host_cost.py.)

One process, one device (cuda if available). --smoke: the tiny model on CPU, seconds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import provenance, write_json  # noqa: E402
from benchmarks.host_cost import SMOKE, batch  # noqa: E402

import torch  # noqa: E402

REL_MAX = 0.05


def setup(variant: str, precision: str, n: int, smoke: bool, dist):
    """Fresh engines from seed 0 as training builds them, and two fixed batches: the same for
    every setup."""
    from udean.config import load
    from udean.engines import build_engines
    from udean.losses import model_parts
    from udean.models.udean import build

    cfg = load("recommended", (SMOKE if smoke else []) + [f"model.variant={variant}", f"train.batch_size={n}",
                                                          f"train.precision={precision}"])
    torch.manual_seed(0)
    gen, discs = build(cfg.model, slab=cfg.data.patches.slab, **model_parts(cfg.loss))
    engines = build_engines(cfg, gen, discs, total_steps=1000, device=dist.device, ds_args=dist.deepspeed_args())
    batches = [tuple(t.to(dist.device) for t in batch(cfg, n, dist.device, seed=1 + i)) for i in range(2)]
    return cfg, engines, batches


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def correctness(args, dist) -> dict[str, Any]:
    from udean.steps import train_step

    runs: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        cfg, engines, batches = setup(args.variant, precision, args.batch, args.smoke, dist)
        y_s, x_t = batches[0]
        torch.manual_seed(2)  # the same noise draws in both precisions (the degradation is float32 in both)
        with torch.no_grad():
            out = engines.g(y_s, x_t)
        losses = [train_step(engines, *batches[i % 2], cfg.loss, dist).scalars() for i in range(args.steps)]
        runs[precision] = {"outputs": {k: v.detach().float().cpu() for k, v in out.items()}, "losses": losses}
        del engines
    out_err = {k: rel(runs["bf16"]["outputs"][k], v) for k, v in runs["fp32"]["outputs"].items()}
    first_fp32, first_bf16 = runs["fp32"]["losses"][0], runs["bf16"]["losses"][0]
    loss_err = {k: abs(first_bf16[k] - v) / max(abs(v), 1e-12) for k, v in first_fp32.items()}
    finite = all(torch.isfinite(torch.tensor(list(step.values()))).all() for r in runs.values() for step in r["losses"])
    worst = max([*out_err.values(), *loss_err.values()])
    return {"variant": args.variant, "batch": args.batch, "steps": args.steps, "bound_rel": REL_MAX,
            "output_rel_l2": out_err, "first_step_loss_rel": loss_err, "worst": worst, "finite": bool(finite),
            "losses": {p: r["losses"] for p, r in runs.items()}, "passed": bool(finite) and worst <= REL_MAX}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU (seconds)")
    p.add_argument("--variant", choices=("thin_slab", "3d"), default="thin_slab")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 8; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="steps compared (default 10; smoke 2)")
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.smoke else 8)
    args.steps = args.steps or (2 if args.smoke else 10)
    from hpc.dist import init

    dist = init("auto")
    try:
        result = correctness(args, dist)
    finally:
        dist.shutdown()
    write_json(args.out, {"provenance": provenance(), "device": str(dist.device), "smoke": args.smoke, **result})
    print(f"bf16 vs fp32: worst relative difference {result['worst']:.3g} (bound {REL_MAX}): "
          f"{'passed' if result['passed'] else 'FAILED'}", flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
