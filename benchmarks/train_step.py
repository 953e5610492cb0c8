"""Training-step speed: the project's own step (`udean.steps.train_step` through both DeepSpeed
engines) on the paper's configuration, thin-slab and 3D, fp32 / tf32 / bf16, batch 8 and larger.

    # a GPU node, one GPU: one variant per call (a few minutes each); --resume adds to the same
    # JSON, and the same command with --resume continues a run cut off by a time limit
    OMP_NUM_THREADS=8 python benchmarks/train_step.py --variants thin_slab
    OMP_NUM_THREADS=8 python benchmarks/train_step.py --variants 3d --resume
    python benchmarks/train_step.py --variants 3d --batches 8 32 --setups bf16 bf16+all --out x.json
    python benchmarks/train_step.py --setups bf16 --zero-stage 0 --cudnn-benchmark off --out y.json
    # CPU smoke check (tiny model, < 1 min): what the tests run
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --smoke

Per (variant, batch) it times these setups, each on freshly built engines with the same seed:

- `eager_bf16` - the BASELINE: the same step in plain eager PyTorch (the same Generator,
  Discriminators and losses, torch.optim.Adam, `torch.autocast(bf16)`), no DeepSpeed, no other
  optimisation: what "eager bf16 autocast" meant in the earlier measurements;
- `fp32`, `tf32`, `bf16` - `train_step` on `build_engines` with `train.precision` fp32 (IEEE fp32
  matmuls and convolutions), fp32 with TF32 tensor cores, and bf16 (DeepSpeed bf16: weights and
  activations in bf16, fp32 master weights) - the project's default;
- `bf16+channels_last`, `bf16+fused_adam`, `bf16+compile`, `bf16+all`: one optimisation switched
  on at a time on top of `bf16`, then all of them; `cuda_graphs` is listed as not implemented.

Before anything is timed, `bf16_check` runs the same Generator forward in fp32 and in bf16 (both
autocast and bf16 weights) on identical weights and inputs and refuses to time the bf16 setups
if the relative L2 error of any output exceeds REL_L2_MAX (some cuDNN versions returned wrong
bf16 Conv3d results; a wrong kernel gives errors of order 1, rounding gives ~1e-2).

`--zero-stage` (default: the config's, `train.zero_stage: null` = 1 for bf16, 0 for fp32) and
`--cudnn-benchmark on|off` (default on, what training uses: `train.cudnn_benchmark: null` = on
unless deterministic) apply to every setup; the JSON records both (`settings`, and each row's
resolved `zero_stage`).

Figures: FLOPs of one whole step (forward + backward of G and D, torch.utils.flop_counter,
counted on the DeepSpeed step and again on the eager baseline: the two must agree, it is the same
work), median step time, TFLOP/s, % of the bf16 matmul peak measured in the same run, patches/s,
peak GPU memory, speed-up over the baseline. JSON + PNG in benchmarks/results/; docs/performance.md
explains them.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, bar_chart, provenance, write_json  # noqa: E402

import torch  # noqa: E402

REL_L2_MAX = 0.05  # bf16 vs fp32 forward, per output: ||bf16 - fp32|| / ||fp32||
SETUPS = ("eager_bf16", "fp32", "tf32", "bf16", "bf16+channels_last", "bf16+fused_adam", "bf16+compile",
          "bf16+all", "bf16+cuda_graphs")
BASELINE = "eager_bf16"
# tiny shapes for the CPU smoke check: every code path, seconds instead of hours
SMOKE_OVERRIDES = ["model.features=8", "model.n_groups=1", "model.n_rcab=2", "model.reduction=2",
                   "model.encoder_layers=2", "model.disc_features=8", "model.disc_blocks=1",
                   "data.patches.lr_size=[16,16]"]


# --------------------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_fp32_precision(mode: str) -> None:
    """'ieee' (true fp32) or 'tf32' for CUDA matmuls and cuDNN convolutions. Note cuDNN convs
    default to TF32 in torch, so a plain `precision: fp32` run on a GPU already uses TF32 convs."""
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9; never mix with the legacy flags
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:
        torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
        torch.backends.cudnn.allow_tf32 = mode == "tf32"


def cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def matmul_peak(device: torch.device, n: int, repeats: int) -> dict[str, Any]:
    """Best-of-`repeats` TFLOP/s of an n x n x n bf16 matmul: the roof the step is compared to."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return {"n": n, "dtype": "bfloat16", "best_s": best, "tflops": 2 * n**3 / best / 1e12}


# --------------------------------------------------------------------------- inputs and models
def config(variant: str, batch: int, precision: str, smoke: bool, zero_stage: int | None = None):
    """The paper's config at this point; `zero_stage` None: the config's default for `precision`."""
    from udean.config import load

    overrides = (SMOKE_OVERRIDES if smoke else []) + [
        f"model.variant={variant}", f"train.batch_size={batch}", f"train.precision={precision}"]
    if zero_stage is not None:
        overrides.append(f"train.zero_stage={zero_stage}")
    return load("paper", overrides)


def make_batch(cfg, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """y_s (B, 2S, 2h, 2w) source HR and x_t (B, S, h, w) target LR, float32 in [0, 1]."""
    s = cfg.data.patches.slab
    h, w = cfg.data.patches.lr_size
    g = torch.Generator().manual_seed(seed)
    y_s = torch.rand(batch, 2 * s, 2 * h, 2 * w, generator=g)
    x_t = torch.rand(batch, s, h, w, generator=g)
    return y_s.to(device), x_t.to(device)


def build_models(cfg, seed: int = 0):
    """Generator and Discriminators as training builds them (only the networks the loss reads)."""
    from udean.losses import model_parts
    from udean.models.udean import build

    torch.manual_seed(seed)  # every setup starts from the same weights
    return build(cfg.model, slab=cfg.data.patches.slab, **model_parts(cfg.loss))


def bf16_check(cfg, device: torch.device, batch: int = 2) -> dict[str, Any]:
    """The same G forward in fp32 (IEEE) and bf16 on identical weights and inputs.

    Two bf16 forms: autocast (the eager baseline) and bf16 weights + inputs (DeepSpeed bf16).
    Passed when every output's relative L2 error is <= REL_L2_MAX."""
    gen, _ = build_models(cfg)
    gen.to(device)
    y_s, x_t = make_batch(cfg, batch, device, seed=1)
    set_fp32_precision("ieee")
    with torch.no_grad():
        ref = gen(y_s, x_t)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            auto = gen(y_s, x_t)
        low = copy.deepcopy(gen).to(torch.bfloat16)(y_s.bfloat16(), x_t.bfloat16())
    errors: dict[str, dict[str, float]] = {}
    for form, out in (("autocast", auto), ("bf16_weights", low)):
        errors[form] = {}
        for k, r in ref.items():
            r = r.float()
            errors[form][k] = float((out[k].float() - r).norm() / r.norm().clamp_min(1e-30))
    worst = max(v for e in errors.values() for v in e.values())
    finite = all(bool(torch.isfinite(o).all()) for out in (auto, low) for o in out.values())
    del gen, ref, auto, low
    cleanup(device)
    return {"batch": batch, "bound_rel_l2": REL_L2_MAX, "rel_l2": errors, "worst_rel_l2": worst,
            "passed": finite and worst <= REL_L2_MAX}


# --------------------------------------------------------------------------- the steps timed
class EagerStep:
    """The BASELINE: `train_step`'s work in plain eager PyTorch with bf16 autocast.

    Same modules, same losses, same order (G loss through frozen D, D loss on detached outputs,
    one finiteness check before any update), torch.optim.Adam with the paper's settings."""

    def __init__(self, cfg, device: torch.device):
        from udean.steps import StepResult

        self.StepResult = StepResult
        self.cfg, self.device = cfg, device
        self.gen, self.discs = build_models(cfg)
        self.gen.to(device)
        self.discs.to(device)
        t = cfg.train
        adam = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=0.0)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), **adam)
        self.opt_d = torch.optim.Adam(self.discs.parameters(), **adam)

    def __call__(self, y_s: torch.Tensor, x_t: torch.Tensor):
        from udean.engines import frozen
        from udean.losses import discriminator_loss, forward_args, generator_loss

        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            out = self.gen(y_s, x_t, **forward_args(self.cfg.loss))
            with frozen(self.discs):
                g_loss, _ = generator_loss(out, y_s, x_t, self.discs, self.cfg.loss)
            d_loss, _ = discriminator_loss(out, y_s, x_t, self.discs, self.cfg.loss)
        if not bool(torch.isfinite(g_loss.detach()) & torch.isfinite(d_loss.detach())):
            return self.StepResult(skipped=True)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        return self.StepResult(skipped=False)


def _channels_last_hooks(modules) -> list:
    """Every conv sees a channels-last input (NHWC / NDHWC, cuDNN's native tensor-core layout).

    Hooks rather than `module.to(memory_format=...)`: DeepSpeed's bf16 optimizer views every
    parameter as bytes of one flat buffer and fails on channels-last weights. With a
    channels-last input cuDNN picks NHWC kernels and its output stays channels-last, so after the
    first conv of a chain the hook is a no-op."""
    handles = []
    for root in modules:
        for m in root.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
                fmt = torch.channels_last if isinstance(m, torch.nn.Conv2d) else torch.channels_last_3d
                handles.append(m.register_forward_pre_hook(
                    lambda _m, args, fmt=fmt: (args[0].contiguous(memory_format=fmt), *args[1:])))
    return handles


def _torch_adams(engine) -> list[torch.optim.Optimizer]:
    """The torch.optim.Adam inside a DeepSpeed engine's optimizer wrapper(s)."""
    found, opt, seen = [], engine.optimizer, set()
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Adam):
            found.append(opt)
        opt = getattr(opt, "optimizer", None)
    return found


def engine_step(cfg, dist, flags: set[str]) -> tuple[Callable, dict[str, Any]]:
    """`train_step` on fresh engines, with the optimisation `flags` switched on."""
    from udean.engines import build_engines
    from udean.steps import train_step

    gen, discs = build_models(cfg)
    notes: dict[str, Any] = {}
    if "compile" in flags:  # train.compile: what training does with it
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": True})})
    engines = build_engines(cfg, gen, discs, total_steps=10_000, device=dist.device)
    notes["optimizer"] = type(engines.g.optimizer).__name__
    if "channels_last" in flags:
        # activations only: channels-last weights break DeepSpeed's bf16 flat buffer
        # ("self.stride(-1) must be 1 to view BFloat16 as Byte"); cuDNN goes NHWC when the input is
        notes["channels_last_conv_hooks"] = len(_channels_last_hooks([gen, discs]))
    if "fused_adam" in flags:
        # a benchmark-only switch on the built optimizer; if it wins, train.* should grow a key
        # that deepspeed_config turns into Adam's `fused=True` (the one place that sets Adam)
        adams = _torch_adams(engines.g) + _torch_adams(engines.d)
        if not adams:
            raise RuntimeError(f"no torch.optim.Adam inside {notes['optimizer']}: cannot fuse")
        for opt in adams:
            for group in opt.param_groups:
                group["fused"], group["foreach"] = True, False
        notes["fused_adams"] = len(adams)

    def step(y_s, x_t):
        return train_step(engines, y_s, x_t, cfg.loss, dist)

    step.engines = engines  # keeps them alive for the caller
    return step, notes


def count_flops(step: Callable, y_s, x_t) -> tuple[int, Any]:
    """FLOPs of one whole step (forward + backward of G and D); the step is also run once."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = step(y_s, x_t)
    return int(counter.get_total_flops()), result


def time_steps(step: Callable, y_s, x_t, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    for _ in range(warmup):
        step(y_s, x_t)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, skipped = [], 0
    for _ in range(steps):
        t = time.perf_counter()
        r = step(y_s, x_t)
        sync(device)
        times.append(time.perf_counter() - t)
        skipped += int(r.skipped)
    out = {"steps": steps, "warmup": warmup, "step_s_median": statistics.median(times),
           "step_s_mean": statistics.fmean(times), "step_s_min": min(times), "skipped_steps": skipped}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        out["peak_mem_gib"] = None  # CUDA allocator statistics only; a process RSS would mix setups
    return out


# --------------------------------------------------------------------------- one (variant, batch)
def skip_reason(setup: str, device: torch.device, check_passed: bool, allow_compile_cpu: bool) -> str | None:
    if setup == "bf16+cuda_graphs":
        return "not implemented yet: needs static input buffers and a graph-safe step (no host sync in train_step)"
    if setup == "tf32" and device.type != "cuda":
        return "TF32 is a CUDA tensor-core format; on CPU it would equal fp32"
    if setup in ("bf16+compile", "bf16+all") and device.type != "cuda" and not allow_compile_cpu:
        if setup == "bf16+compile":
            return ("torch.compile skipped on CPU: inductor's C++ build takes minutes on a shared CPU "
                    "and says nothing about GPU speed (--compile-on-cpu forces it)")
    if "bf16" in setup and not check_passed:
        return f"REFUSED: bf16 outputs differ from fp32 beyond rel. L2 {REL_L2_MAX} (see bf16_check)"
    return None


def flags_of(setup: str, device: torch.device, allow_compile_cpu: bool) -> set[str]:
    if setup == "bf16+all":
        flags = {"channels_last", "fused_adam", "compile"}
        if device.type != "cuda" and not allow_compile_cpu:
            flags.discard("compile")
        return flags
    return {setup.split("+", 1)[1]} if "+" in setup else set()


def bench_point(variant: str, batch: int, setups: list[str], args, dist, check: dict,
                emit: Callable[[dict], None]) -> None:
    device = dist.device
    y_s, x_t = make_batch(config(variant, batch, "bf16", args.smoke), batch, device)
    for setup in setups:
        row: dict[str, Any] = {"variant": variant, "batch": batch, "setup": setup,
                               "baseline": setup == BASELINE}
        reason = skip_reason(setup, device, check["passed"], args.compile_on_cpu)
        if reason:
            emit({**row, "status": "refused" if reason.startswith("REFUSED") else "skipped", "reason": reason})
            continue
        precision = {"fp32": "fp32", "tf32": "fp32"}.get(setup, "bf16")
        set_fp32_precision("tf32" if setup == "tf32" else "ieee")
        cfg = config(variant, batch, precision, args.smoke, args.zero_stage)
        if setup != BASELINE:
            row["zero_stage"] = cfg.train.zero_stage
        flags = flags_of(setup, device, args.compile_on_cpu)
        if setup == "bf16+all" and "compile" not in flags:
            row["note"] = "without compile (skipped on CPU)"
        step = None
        try:
            if setup == BASELINE:
                step, notes = EagerStep(cfg, device), {"optimizer": "torch.optim.Adam", "autocast": "bfloat16"}
            else:
                step, notes = engine_step(cfg, dist, flags)
            row["flags"], row["notes"] = sorted(flags), notes
            if setup in (BASELINE, "bf16"):  # the FLOP count doubles as the first warm-up step
                row["flops_counted"], _ = count_flops(step, y_s, x_t)
            if setup == "bf16+compile" or "compile" in flags:
                t = time.perf_counter()
                step(y_s, x_t)
                sync(device)
                row["compile_s"] = time.perf_counter() - t
            row.update(time_steps(step, y_s, x_t, device, args.warmup, args.steps))
            row["status"] = "ok"
        except torch.cuda.OutOfMemoryError as exc:
            row.update(status="oom", reason=str(exc).splitlines()[0])
        except Exception as exc:  # noqa: BLE001 - one failing setup must not lose the others
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=4))
        finally:
            del step
            cleanup(device)
        if row["status"] == "ok":
            row["patches_per_s"] = batch / row["step_s_median"]
        emit(row)
    set_fp32_precision("ieee")


def finish_rows(rows: list[dict], peak_tflops: float) -> list[dict]:
    """Derive TFLOP/s, % of peak and speed-up; return the FLOP cross-checks.

    The work of a step does not depend on the setup, so every setup of a (variant, batch) gets
    the count of the DeepSpeed bf16 step; the eager baseline's own count must be equal."""
    checks = []
    for key in sorted({(r["variant"], r["batch"]) for r in rows}):
        group = [r for r in rows if (r["variant"], r["batch"]) == key]
        counts = {r["setup"]: r["flops_counted"] for r in group if "flops_counted" in r}
        flops = counts.get("bf16", counts.get(BASELINE))
        if "bf16" in counts and BASELINE in counts:
            checks.append({"variant": key[0], "batch": key[1], "engine_bf16": counts["bf16"],
                           "eager_bf16": counts[BASELINE], "equal": counts["bf16"] == counts[BASELINE]})
        base = next((r for r in group if r["setup"] == BASELINE and r.get("status") == "ok"), None)
        for r in group:
            if r.get("status") != "ok":
                continue
            if flops is not None:
                r["flops_per_step"] = flops
                r["flops_per_patch"] = flops / r["batch"]
                r["tflops"] = flops / r["step_s_median"] / 1e12
                r["pct_of_bf16_peak"] = 100.0 * r["tflops"] / peak_tflops
            if base is not None:
                r["speedup_vs_baseline"] = base["step_s_median"] / r["step_s_median"]
    return checks


def chart(path: Path, result: dict) -> Path | None:
    rows = [r for r in result["runs"] if r.get("status") == "ok"]
    panels = []
    for variant in result["settings"]["variants"]:
        vr = [r for r in rows if r["variant"] == variant]
        if not vr:
            continue
        labels = [f"b{r['batch']} {r['setup']}" for r in vr]
        colors = ["C3" if r["baseline"] else "C0" for r in vr]
        panels.append({"title": f"{variant}: TFLOP/s (% of measured bf16 matmul peak)", "xlabel": "TFLOP/s",
                       "labels": labels, "values": [r.get("tflops") for r in vr], "colors": colors,
                       "notes": [f"{r['pct_of_bf16_peak']:.1f}%" if "pct_of_bf16_peak" in r else "" for r in vr]})
        panels.append({"title": f"{variant}: ms per G+D step (speed-up vs eager bf16)", "xlabel": "ms / step",
                       "labels": labels, "values": [1e3 * r["step_s_median"] for r in vr], "colors": colors,
                       "notes": [f"x{r['speedup_vs_baseline']:.2f}" if "speedup_vs_baseline" in r else ""
                                 for r in vr]})
    if not panels:
        return None
    m = result["provenance"]["machine"]
    where = m["gpu"]["name"] if m.get("gpu") else f"CPU {m['cpu']} ({m['cores']} cores)"
    smoke = " - SMOKE (tiny model)" if result["settings"]["smoke"] else ""
    return bar_chart(path, panels, title=f"UDEAN training step, {where}{smoke}")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model and batches: a CPU check in < 1 min")
    p.add_argument("--variants", nargs="+", default=["thin_slab", "3d"], choices=["thin_slab", "3d"])
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="per-GPU batches (default 8 16 32; smoke 2 4)")
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    p.add_argument("--matmul-n", type=int, default=None, help="bf16 peak matmul size (default 8192; smoke 256)")
    p.add_argument("--compile-on-cpu", action="store_true", help="also time torch.compile on CPU")
    p.add_argument("--zero-stage", type=int, choices=(0, 1), default=None,
                   help="train.zero_stage of the engines (default: the config's, 1 for bf16 and 0 for fp32)")
    p.add_argument("--cudnn-benchmark", choices=("on", "off"), default="on",
                   help="torch.backends.cudnn.benchmark (default on, as training: train.cudnn_benchmark)")
    p.add_argument("--resume", action="store_true",
                   help="keep the complete (variant, batch) points already in --out and measure only the rest "
                        "(a run cut off by a time limit continues; --variants 3d --resume adds to a thin_slab run)")
    p.add_argument("--out", default=None,
                   help="JSON path (default benchmarks/results/train_step_<gpu|cpu[_smoke]>.json)")
    args = p.parse_args(argv)
    args.batches = args.batches or ([2, 4] if args.smoke else [8, 16, 32])
    args.steps = args.steps or (3 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.matmul_n = args.matmul_n or (256 if args.smoke else 8192)
    if BASELINE not in args.setups:
        args.setups = [BASELINE, *args.setups]  # every run carries its own baseline
    return args


def resume(out: Path, fresh: dict[str, Any], args) -> tuple[dict[str, Any], set[tuple[str, int]]]:
    """The JSON of earlier sessions, and the (variant, batch) points it holds complete."""
    import json

    prev = json.loads(out.read_text())
    gpu = lambda d: (d["provenance"]["machine"].get("gpu") or {}).get("name")  # noqa: E731
    if gpu(prev) != gpu(fresh) or prev["settings"]["smoke"] != args.smoke:
        raise SystemExit(f"--resume: {out} was measured on {gpu(prev) or 'CPU'} (smoke={prev['settings']['smoke']}), "
                         f"this is {gpu(fresh) or 'CPU'} (smoke={args.smoke}); use another --out")
    for key in ("zero_stage", "cudnn_benchmark"):
        if prev["settings"].get(key) != fresh["settings"][key]:
            raise SystemExit(f"--resume: {out} was measured with {key}={prev['settings'].get(key)}, this run has "
                             f"{fresh['settings'][key]}; use another --out")
    done = set()
    for key in {(r["variant"], r["batch"]) for r in prev["runs"]}:
        rows = {r["setup"]: r for r in prev["runs"] if (r["variant"], r["batch"]) == key}
        if all(s in rows and rows[s]["status"] not in ("error", "oom") for s in args.setups):
            done.add(key)
    settings = prev["settings"]
    settings["variants"] = [v for v in ("thin_slab", "3d") if v in settings["variants"] + args.variants]
    settings["batches"] = sorted(set(settings["batches"]) | set(args.batches))
    if max(prev["matmul_peak"]["tflops"], 0) < fresh["matmul_peak"]["tflops"]:
        prev["matmul_peak"] = fresh["matmul_peak"]  # the roof is the best this GPU model showed
    prev["provenance"] = fresh["provenance"]
    prev.setdefault("sessions", [])
    return prev, done


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hpc.dist import init

    dist = init("auto")
    if dist.world_size > 1:
        raise SystemExit("train_step.py measures one GPU (one process); benchmarks/scaling.py measures many")
    device = dist.device
    if device.type != "cuda":
        print("train_step benchmark: no CUDA device, running on CPU (smoke figures only)", file=sys.stderr)
    kind = "gpu" if device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else RESULTS / f"train_step_{kind}{'_smoke' if args.smoke else ''}.json"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"  # as training sets it (train.cudnn_benchmark)

    peak = matmul_peak(device, args.matmul_n, repeats=20 if device.type == "cuda" else 5)
    prov = provenance(argv)
    result: dict[str, Any] = {
        "benchmark": "train_step", "provenance": prov,
        "settings": {"smoke": args.smoke, "variants": args.variants, "batches": args.batches,
                     "setups": args.setups, "steps": args.steps, "warmup": args.warmup, "device": str(device),
                     "zero_stage": args.zero_stage, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                     "overrides": SMOKE_OVERRIDES if args.smoke else [], "config": "paper"},
        "matmul_peak": peak, "bf16_check": {}, "runs": [], "sessions": [],
    }
    done: set[tuple[str, int]] = set()
    if args.resume and out.is_file():
        result, done = resume(out, result, args)
        peak = result["matmul_peak"]
    result["sessions"].append({"date": prov["date"], "command": prov["command"], "matmul_peak": peak})
    if args.smoke:
        result["note"] = "SMOKE: tiny model on CPU; the figures test the script, not the hardware"

    def emit(row: dict) -> None:
        row["session"] = len(result["sessions"]) - 1
        result["runs"].append(row)
        result["flop_checks"] = finish_rows(result["runs"], peak["tflops"])
        write_json(out, result)  # after every setup: a killed run keeps what it measured
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if k in ("variant", "batch", "setup", "status", "step_s_median", "tflops", "patches_per_s", "reason")}
        print(shown, flush=True)

    for variant in args.variants:
        todo = [b for b in args.batches if (variant, b) not in done]
        if not todo:
            print(f"{variant}: batches {args.batches} already in {out} (--resume)", flush=True)
            continue
        # the guard runs in every session: the machine (and its cuDNN) may differ from the last one
        check = bf16_check(config(variant, 2, "fp32", args.smoke), device)
        result["bf16_check"][variant] = check
        print(f"bf16 check {variant}: worst rel. L2 {check['worst_rel_l2']:.2e} "
              f"(bound {REL_L2_MAX}) -> {'passed' if check['passed'] else 'FAILED: bf16 setups refused'}",
              flush=True)
        for batch in todo:
            # a partial point from an earlier session is redone whole: a setup is always
            # compared with a baseline timed in the same session
            result["runs"] = [r for r in result["runs"] if (r["variant"], r["batch"]) != (variant, batch)]
            bench_point(variant, batch, args.setups, args, dist, check, emit)
    result["flop_checks"] = finish_rows(result["runs"], peak["tflops"])
    write_json(out, result)
    png = chart(out.with_suffix(".png"), result)
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    dist.shutdown()
    return 0 if all(c["passed"] for c in result["bf16_check"].values()) else 2


if __name__ == "__main__":
    raise SystemExit(main())
