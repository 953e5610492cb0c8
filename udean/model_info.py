"""`udean model-info`: parameters and forward FLOPs of every UDEAN component, per variant.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matmul/conv FLOPs, a
multiply-add counts 2) for one forward call of each component on one sample (batch 1) of the
configured patch size (`data.patches`: LR S x H x W, HR 2S x 2H x 2W). Models are built on the
meta device, so nothing is computed and the paper-sized 3D model is counted instantly.
Note: one Generator training step calls sr_decoder twice, lr_encoder twice, lr_decoder twice.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from udean.models.udean import build

COMPONENTS = ("down_extractor", "lr_decoder", "lr_encoder", "sr_decoder", "d_lr", "d_feat", "d_hr")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", choices=("both", "configured", "thin_slab", "3d"), default="both",
                   help="which model variant(s) to count (default: both)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers as JSON")


def _flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x)
    return int(counter.get_total_flops())


def count(cfg, variant: str) -> dict:
    """{component: {"params": int, "flops": int, "input": [shape]}} for one variant, batch 1."""
    model_cfg = cfg.model.model_copy(update={"variant": variant})
    s = cfg.data.patches.slab
    h, w = cfg.data.patches.lr_size
    with torch.device("meta"):
        gen, discs = build(model_cfg, slab=s)
        x = torch.zeros(1, s, h, w)
        y = torch.zeros(1, 2 * s, 2 * h, 2 * w)
        f = gen.lr_encoder(x)
    inputs = {"down_extractor": y, "lr_decoder": f, "lr_encoder": x, "sr_decoder": f,
              "d_lr": x, "d_feat": f, "d_hr": y}
    modules = {n: getattr(gen, n) for n in COMPONENTS[:4]} | {n: getattr(discs, n) for n in COMPONENTS[4:]}
    rows = {}
    with torch.no_grad():
        for name in COMPONENTS:
            mod = modules[name]
            if mod is None:  # d_hr disabled
                continue
            rows[name] = {"params": sum(p.numel() for p in mod.parameters()),
                          "flops": _flops(mod, inputs[name]), "input": list(inputs[name].shape)}
    return rows


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    cfg = args.cfg
    variants = {"both": ["thin_slab", "3d"], "configured": [cfg.model.variant]}.get(args.variant, [args.variant])
    result = {v: count(cfg, v) for v in variants}
    s, (h, w) = cfg.data.patches.slab, cfg.data.patches.lr_size
    console = Console()
    for v, rows in result.items():
        mark = " (configured)" if v == cfg.model.variant else ""
        table = Table(title=f"UDEAN {v}{mark}: LR {s}x{h}x{w}, HR {2 * s}x{2 * h}x{2 * w}, batch 1, forward")
        for col in ("component", "input", "params", "FLOPs"):
            table.add_column(col, justify="left" if col in ("component", "input") else "right")
        for name, r in rows.items():
            table.add_row(name, "x".join(map(str, r["input"])), f"{r['params']:,}", _human(r["flops"], "FLOP"))
        gen = [r for n, r in rows.items() if not n.startswith("d_")]
        sr = [rows["lr_encoder"], rows["sr_decoder"]]
        table.add_section()
        table.add_row("generator (all 4)", "", f"{sum(r['params'] for r in gen):,}", _human(sum(r["flops"] for r in gen), "FLOP"))
        table.add_row("inference (lr_encoder + sr_decoder)", "", f"{sum(r['params'] for r in sr):,}",
                      _human(sum(r["flops"] for r in sr), "FLOP"))
        console.print(table)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {"patch": {"lr": [s, h, w], "hr": [2 * s, 2 * h, 2 * w]}, "batch": 1,
               "configured_variant": cfg.model.variant, "variants": result}
        args.json.write_text(json.dumps(doc, indent=2))
        console.print(f"wrote {args.json}")
    return 0
