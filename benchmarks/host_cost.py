"""Host cost of one training step, on any machine (a CPU included): the work the host does per
step, which bounds a GPU's speed when the arithmetic is small (docs/performance.md, "Host cost").

    OMP_NUM_THREADS=1 python benchmarks/host_cost.py --label after    # CPU: the counts (a few minutes)
    python benchmarks/host_cost.py --paper-size --label gpu            # a GPU: also times the step
    python benchmarks/host_cost.py --smoke --out x.json                # tiny model, seconds (the tests)

The recommended recipe (udean/configs/recommended.yaml) at the paper's depth (5 x 5 RCAB, 6
encoder layers, 3 discriminator blocks; width 16 and LR patches 16x16 on a CPU, the paper's 64
and 64x64 with --paper-size: the counts do not depend on width or patch size) in two setups,
bf16 + ZeRO-1 and fp32 + ZeRO-0, fresh engines from one seed. After `--warmup` steps one
non-logging `udean.steps.train_step` runs under `HostCost`, which counts:

- dispatched ops (every aten op, forward and backward) by phase: inputs, forward, losses (with
  the step's flag all-reduce), G backward, G step, D backward, D step;
- host syncs both ways, by origin (the innermost frame outside torch: udean / hpc = ours,
  deepspeed, torch.optim, other). Reads: a device value read on the host (`.item()`, `bool()`,
  a copy to the CPU). Writes: a copy onto the device from host memory that is not the batch's
  pinned, non-blocking input copy (counted apart as `input_copies`): a CPU constant `.to(x)`, a
  Python scalar written into a device tensor (`x[i] = 1.0`), `torch.tensor(...)` moved in.
  CUDA copies from pageable memory wait for the stream;
- collectives (c10d ops).

On CUDA the counter reads each copy's devices. On a CPU-only machine every tensor is on the CPU,
so it tracks which tensors a GPU run would hold on the host: module-level tensors (constants
computed at import), tensors made from Python values alone without a `device` argument
(`torch.tensor(...)`, `torch.arange(n)`, a scalar written by indexing), and whatever is computed
from those alone. A copy from such a tensor with an explicit device (`.to(x)`, `.to(device)`) or
into a tensor that is not one, and `torch.tensor(..., device=...)`, is a write. torch.optim's
reads and writes of its step counters are left out of `syncs`: torch keeps them on the host on a
GPU too (`device_syncs`). On a logging step `StepResult.scalars`
adds one read; a CPU run cannot see it (`.tolist()` of a CPU tensor dispatches nothing).

With CUDA it also times `--steps` steps and reports the GPU idle share: 1 - (device time of the
kernels and copies, torch.profiler) / wall time.

Results accumulate in one JSON by `--label` (a rerun replaces its label's rows): `before` was
measured on the code before issue 26, `after` on the code after it.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, bar_chart, provenance, write_json  # noqa: E402

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

SETUPS = (("bf16", 1), ("fp32", 0))  # (train.precision, train.zero_stage): the two defaults
PHASES = ("inputs", "forward", "losses", "g_backward", "g_step", "d_backward", "d_step")
OURS = ("udean", "hpc")
TARGETS = {"ops": 4000, "syncs_ours": 1, "syncs_all": 3}  # issue 26's acceptance, per non-logging step
NARROW = ["model.features=16", "model.disc_features=16", "data.patches.lr_size=[16,16]"]
SMOKE = ["model.features=8", "model.n_groups=1", "model.n_rcab=2", "model.reduction=2", "model.encoder_layers=2",
         "model.disc_features=8", "model.disc_blocks=1", "data.patches.lr_size=[16,16]"]
_TORCH = str(Path(torch.__file__).parent)
_ATEN = torch.ops.aten


def origin() -> str:
    """Who asked: the innermost frame outside torch's own plumbing (torch.optim counts), by package."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        if "/torch/optim/" in name:
            return "torch.optim"
        if name.startswith(_TORCH) or name == __file__:
            continue
        for pkg in ("deepspeed", "udean", "hpc"):
            if f"/{pkg}/" in name:
                return pkg
        return "other"
    return "other"


def _tensors(*trees) -> list[torch.Tensor]:
    return [t for t in tree_flatten(trees)[0] if isinstance(t, torch.Tensor)]


def _names_device(args, kwargs) -> bool:
    """Whether `Tensor.to(*args, **kwargs)` says where to (a device, a name, an index or a tensor)."""
    return kwargs.get("device") is not None or any(
        isinstance(a, (torch.device, str, torch.Tensor)) or (isinstance(a, int) and not isinstance(a, bool))
        for a in args)


class _HostBorn(TorchFunctionMode):
    """CPU-only runs (`HostCost.emulate`): tags the tensors a GPU run would hold on the host, and
    counts the copies from them (and from the batch) to the device that `.to` asks for, which
    on a CPU return the tensor itself and dispatch nothing."""

    def __init__(self, cost: "HostCost"):
        super().__init__()
        self.cost = cost

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        host = self.cost.host
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        moved = func is torch.Tensor.to and src is not None and (src in host or src in self.cost.inputs) and \
            _names_device(args[1:], kwargs)
        if moved:
            self.cost.write(src, bool(kwargs.get("non_blocking") or any(a is True for a in args[1:])))
        elif func in (torch.tensor, torch.as_tensor, torch.asarray) and kwargs.get("device") is not None:
            self.cost.write(None, False)  # Python / NumPy values copied to the device
        out = func(*args, **kwargs)
        if moved:
            if out is src:  # on a GPU a new tensor, not the host one: an alias, not counted as an op
                self.cost.quiet = True
                out = out.view_as(out)
                self.cost.quiet = False
            host.pop(out, None)
        elif kwargs.get("device") is None and not _tensors(args, kwargs):
            for t in _tensors(out):  # made from Python values alone, where no device was named
                host[t] = True
        return out


class HostCost(TorchDispatchMode):
    """While active: dispatched ops by `phase`, host reads and writes and collectives by origin.

    `inputs`: the batch as the DataLoader hands it (pinned on CUDA); its copy to the device is
    counted as `input_copies`, not as a write, when it is non-blocking."""

    def __init__(self, inputs: tuple[torch.Tensor, ...] = ()):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.reads: collections.Counter = collections.Counter()
        self.writes: collections.Counter = collections.Counter()
        self.collectives: collections.Counter = collections.Counter()
        self.input_copies = 0
        self.phase = PHASES[0]
        self.quiet = False  # the emulation's own ops
        self.emulate = not torch.cuda.is_available()
        self.host = WeakIdKeyDictionary()
        self.inputs = WeakIdKeyDictionary({t: True for t in inputs})
        self._born = _HostBorn(self)
        if self.emulate:  # module-level tensors: made at import, on the host
            for module in list(sys.modules.values()):
                for value in list(getattr(module, "__dict__", {}).values()):
                    if issubclass(type(value), torch.Tensor):  # type(): no deprecated attribute access
                        self.host[value] = True

    def __enter__(self):
        if self.emulate:
            self._born.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        if self.emulate:
            self._born.__exit__(*exc)
        return out

    def on_host(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu" and (not self.emulate or t in self.host)

    def write(self, src: torch.Tensor | None, non_blocking: bool) -> None:
        """A copy from host memory (`src`, None: Python values) onto the device."""
        if src is not None and src in self.inputs and non_blocking and (self.emulate or src.is_pinned()):
            self.input_copies += 1
        else:
            self.writes[origin()] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.quiet:
            return func(*args, **kwargs)
        self.ops[self.phase] += 1
        if func is _ATEN._local_scalar_dense.default:
            if not self.on_host(args[0]):
                self.reads[origin()] += 1
        elif func is _ATEN._to_copy.default:  # (emulated: `.to` is counted where it is called, _HostBorn)
            src, device = args[0], kwargs.get("device")
            if device is not None and torch.device(device).type == "cpu" and src.device.type != "cpu":
                self.reads[origin()] += 1
            elif device is not None and src.device.type == "cpu" and torch.device(device).type != "cpu":
                self.write(src, bool(kwargs.get("non_blocking")))
        elif func is _ATEN.copy_.default:
            dst, src = args[0], args[1]
            if dst.device.type == "cpu" and src.device.type != "cpu":
                self.reads[origin()] += 1
            elif self.on_host(src) and not self.on_host(dst):
                self.write(src, bool(args[2] if len(args) > 2 else kwargs.get("non_blocking")))
        elif func.namespace == "c10d":
            self.collectives[origin()] += 1
        out = func(*args, **kwargs)
        if self.emulate and func is not _ATEN.copy_.default:
            ins = _tensors(args, kwargs)
            if func in (_ATEN.lift_fresh.default, _ATEN.lift_fresh_copy.default) or (ins and all(
                    t in self.host for t in ins)):
                for t in _tensors(out):
                    self.host[t] = True
        return out

    def device_syncs(self, ours: bool = False) -> int:
        """Reads and writes a GPU would wait for, torch.optim's host-side step counters aside;
        `ours`: only those of udean / hpc."""
        return sum(n for c in (self.reads, self.writes) for o, n in c.items()
                   if o != "torch.optim" and (not ours or o in OURS))

    def summary(self) -> dict[str, Any]:
        return {"ops": sum(self.ops.values()), "ops_by_phase": {p: self.ops.get(p, 0) for p in PHASES},
                "syncs": self.device_syncs(), "syncs_ours": self.device_syncs(ours=True),
                "reads_by_origin": dict(self.reads), "writes_by_origin": dict(self.writes),
                "input_copies": self.input_copies, "collectives_by_origin": dict(self.collectives)}


def phases(counter: HostCost, engines):
    """Set `counter.phase` as the step goes: hooks on the generator's forward, and the engines'
    backward / step wrapped on the instances. Returns an undo function."""
    g, d = engines.g, engines.d

    def mark(name):
        def set_phase(*_):
            counter.phase = name
        return set_phase

    handles = [g.module.register_forward_pre_hook(mark("forward")), g.module.register_forward_hook(mark("losses"))]
    for engine, name in ((g, "g"), (d, "d")):
        for method in ("backward", "step"):
            def wrapped(*a, _f=getattr(engine, method), _p=f"{name}_{method}", **k):
                counter.phase = _p
                return _f(*a, **k)
            setattr(engine, method, wrapped)

    def undo():
        for h in handles:
            h.remove()
        for engine in (g, d):
            for method in ("backward", "step"):
                delattr(engine, method)
    return undo


def config(precision: str, zero: int, args):
    from udean.config import load

    size = SMOKE if args.smoke else [] if args.paper_size else NARROW
    return load("recommended", size + [f"train.precision={precision}", f"train.zero_stage={zero}",
                                       f"train.batch_size={args.batch}"])


def batch(cfg, n: int, device: torch.device, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A source HR batch with the model's margin of context and a target LR batch, on the host
    (pinned with CUDA), as the DataLoader hands them to the step."""
    s, (h, w) = cfg.data.patches.slab, cfg.data.patches.lr_size
    m0, m1 = cfg.model.source_margin
    g = torch.Generator().manual_seed(seed)
    y_s = torch.rand(n, 2 * (s + 2 * m0), 2 * (h + 2 * m1), 2 * (w + 2 * m1), generator=g)
    x_t = torch.rand(n, s, h, w, generator=g)
    return (y_s.pin_memory(), x_t.pin_memory()) if device.type == "cuda" else (y_s, x_t)


def gpu_timing(step, device: torch.device, steps: int) -> dict[str, Any]:
    """Median step time and the GPU idle share over `steps` steps (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile

    times = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            step()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6  # us -> s
    return {"steps": steps, "step_s_median": statistics.median(times), "step_s_min": min(times),
            "gpu_busy_s": busy, "wall_s": wall, "gpu_idle_share": max(0.0, 1.0 - busy / wall)}


def measure(precision: str, zero: int, args, dist) -> dict[str, Any]:
    from udean.engines import build_engines
    from udean.losses import model_parts
    from udean.models.udean import build
    from udean.steps import train_step

    cfg = config(precision, zero, args)
    torch.manual_seed(0)
    gen, discs = build(cfg.model, slab=cfg.data.patches.slab, **model_parts(cfg.loss))
    engines = build_engines(cfg, gen, discs, total_steps=10_000, device=dist.device, ds_args=dist.deepspeed_args())
    y_s, x_t = batch(cfg, args.batch, dist.device)

    def step():
        return train_step(engines, y_s, x_t, cfg.loss, dist, adapt=1.0)

    for _ in range(args.warmup):
        step()
    counter = HostCost(inputs=(y_s, x_t))
    undo = phases(counter, engines)
    with counter:
        result = step()
    undo()
    row = {"precision": precision, "zero_stage": zero, "skipped": result.skipped,
           "optimizer": {"g": type(engines.g.optimizer).__name__, "d": type(engines.d.optimizer).__name__},
           "param_tensors": {"g": sum(1 for p in engines.generator.parameters() if p.requires_grad),
                             "d": sum(1 for p in engines.discriminators.parameters() if p.requires_grad)},
           **counter.summary()}
    if dist.device.type == "cuda":
        row["timing"] = gpu_timing(step, dist.device, args.steps)
    del engines
    return row


def chart(path: Path, result: dict) -> Path | None:
    rows = result["rows"]
    labels = [f"{r['label']}: {r['precision']} ZeRO {r['zero_stage']}" for r in rows]
    colors = ["C2" if r["label"] != "before" else "C3" for r in rows]

    def device(counts: dict) -> int:  # torch.optim's host-side step counters aside, as `syncs`
        return sum(n for o, n in counts.items() if o != "torch.optim")

    panels = [{"title": "ops per step: in / fwd / loss / G bwd / G step / D bwd / D step", "xlabel": "ops",
               "labels": labels, "values": [r["ops"] for r in rows], "colors": colors,
               "ref": (TARGETS["ops"], "target"),
               "notes": [" / ".join(str(r["ops_by_phase"][p]) for p in PHASES) for r in rows]},
              {"title": "host syncs per step, both ways (ours in brackets)", "xlabel": "syncs", "labels": labels,
               "values": [r["syncs"] for r in rows], "colors": colors, "ref": (TARGETS["syncs_all"], "target"),
               "notes": [f"{r['syncs']} ({r['syncs_ours']}): {device(r['reads_by_origin'])} reads, "
                         f"{device(r['writes_by_origin'])} writes" for r in rows]}]
    timed = [r for r in rows if "timing" in r]
    if timed:
        panels.append({"title": "ms per step (GPU idle share)", "xlabel": "ms", "colors": None,
                       "labels": [f"{r['label']}: {r['precision']} ZeRO {r['zero_stage']}" for r in timed],
                       "values": [1e3 * r["timing"]["step_s_median"] for r in timed],
                       "notes": [f"idle {100 * r['timing']['gpu_idle_share']:.0f}%" for r in timed]})
    m = result["provenance"]["machine"]
    where = m["gpu"]["name"] if m.get("gpu") else f"CPU ({m['cores']} cores)"
    return bar_chart(path, panels, title=f"train_step host cost, recommended recipe at the paper's depth, {where}"
                                         f"{' - SMOKE' if result['smoke'] else ''}", ncols=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="after", help="name of this measurement in the JSON (default: after)")
    p.add_argument("--smoke", action="store_true", help="tiny model (seconds)")
    p.add_argument("--paper-size", action="store_true", help="the paper's width and 64x64 LR patches (a GPU)")
    p.add_argument("--batch", type=int, default=None, help="default 8 with --paper-size, else 2")
    p.add_argument("--warmup", type=int, default=2, help="steps before the counted one")
    p.add_argument("--steps", type=int, default=20, help="timed steps (CUDA only)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/host_cost_<cpu|gpu>.json)")
    args = p.parse_args(argv)
    args.batch = args.batch or (8 if args.paper_size else 2)
    from hpc.dist import init

    dist = init("auto")
    kind = "gpu" if dist.device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else RESULTS / f"host_cost_{kind}{'_smoke' if args.smoke else ''}.json"
    prov = provenance(argv)
    result: dict[str, Any] = {"benchmark": "host_cost", "provenance": prov, "smoke": args.smoke,
                              "targets": TARGETS, "phases": list(PHASES), "rows": [], "sessions": {}}
    if out.is_file():  # other labels' rows stay
        previous = json.loads(out.read_text())
        result["rows"] = [r for r in previous.get("rows", []) if r["label"] != args.label]
        result["sessions"] = {k: v for k, v in previous.get("sessions", {}).items() if k != args.label}
    result["sessions"][args.label] = {"date": prov["date"], "command": prov["command"], "git_commit": prov["git_commit"],
                                      "git_dirty": prov["git_dirty"], "loadavg": prov["loadavg"],
                                      "device": str(dist.device), "batch": args.batch,
                                      "size": "smoke" if args.smoke else "paper" if args.paper_size else "narrow"}
    try:
        for precision, zero in SETUPS:
            row = {"label": args.label, **measure(precision, zero, args, dist)}
            row["meets_targets"] = (row["ops"] <= TARGETS["ops"] and row["syncs_ours"] <= TARGETS["syncs_ours"]
                                    and row["syncs"] <= TARGETS["syncs_all"])
            result["rows"].append(row)
            write_json(out, result)
            print(f"{args.label}: {precision} ZeRO {zero}: {row['ops']} ops "
                  f"({', '.join(f'{k} {v}' for k, v in row['ops_by_phase'].items())}); syncs {row['syncs']} "
                  f"(ours {row['syncs_ours']}; reads {row['reads_by_origin']}, writes {row['writes_by_origin']})"
                  + (f"; {1e3 * row['timing']['step_s_median']:.1f} ms/step, GPU idle "
                     f"{100 * row['timing']['gpu_idle_share']:.0f}%" if "timing" in row else ""), flush=True)
    finally:
        dist.shutdown()
    order = {label: i for i, label in enumerate(["before", *sorted(result["sessions"])])}
    result["rows"].sort(key=lambda r: (order.get(r["label"], 99), SETUPS.index((r["precision"], r["zero_stage"]))))
    write_json(out, result)
    png = chart(out.with_suffix(".png"), result)
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
