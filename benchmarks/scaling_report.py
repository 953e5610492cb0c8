"""Merge measured scaling points, run the projection, write JSON + PNG.

    python benchmarks/scaling.py report [--step-ms 237] [--variant 3d] [--precision bf16]

- scaling_train.json/png: measured step = compute + gradient all-reduce + data wait per rank count
  (weak and strong), throughput and efficiency, and the projection's prediction of each point:
  1-rank compute + ring all-reduce of the real gradient buffers over the link fitted from the
  timed all-reduce ladder (messages of 4 KiB..128 MiB, not the gradient sizes).
- scaling_projection.json/png: predicted weak-scaling efficiency from 1 to 128 GPUs for a few
  clusters, per-GPU step time from --step-ms (default: the issue's H100 figure, 3D, bf16, batch 8),
  gradient bytes counted from the real G and D of configs/paper.yaml in that precision.
- scaling_preprocess.png from scaling_preprocess.json (written by `scaling.py preprocess`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.projection import (BACKWARD_FRACTION, CLUSTERS, H100_STEP_S_3D_BF16_B8,  # noqa: E402
                                   as_dict, fit_link, project)

GPUS = [1, 2, 4, 8, 16, 32, 64, 128]
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--config", default="paper", help="model whose gradients are projected")
    p.add_argument("--variant", choices=("3d", "thin_slab"), default="3d")
    p.add_argument("--precision", choices=tuple(BYTES), default="bf16")
    p.add_argument("--step-ms", type=float, default=H100_STEP_S_3D_BF16_B8 * 1e3,
                   help="per-GPU step time (ms) at --batch; default: the issue's H100 measurement "
                        "(3D variant, eager bf16, batch 8), not measured by this benchmark")
    p.add_argument("--batch", type=int, default=8, help="per-GPU batch of --step-ms")
    p.add_argument("--step-json", default=None, metavar="PATH",
                   help="take the per-GPU step from the GPU benchmark's JSON (benchmarks/train_step.py): "
                        "the run of --variant, --batch and --step-setup")
    p.add_argument("--step-setup", default="bf16", help="which train_step.py setup (default: the engines' bf16)")
    p.add_argument("--step-from-measured", action="store_true",
                   help="use the smallest measured weak point (compute + data wait, its batch and gradient "
                        "bytes) instead of --step-ms: on a GPU cluster, after `scaling.py train`")
    p.add_argument("--overlap", type=float, default=0.0,
                   help="fraction of the all-reduce hidden behind backward (DeepSpeed ZeRO-0: 0)")


def gradient_elements(config: str, variant: str) -> dict[str, int]:
    """Trainable elements of G and D as built for training (meta device: nothing allocated)."""
    import torch

    from udean.config import load
    from udean.models.udean import build

    cfg = load(config, [f"model.variant={variant}"])
    with torch.device("meta"):
        gen, discs = build(cfg.model, slab=cfg.data.patches.slab)
    return {"g": sum(p.numel() for p in gen.parameters() if p.requires_grad),
            "d": sum(p.numel() for p in discs.parameters() if p.requires_grad)}


# --------------------------------------------------------------------------- training
def train_report(results: Path) -> dict | None:
    points = {}
    for path in sorted(results.glob("scaling_train_*_n*.json")):
        r = json.loads(path.read_text())
        points.setdefault(r["mode"], {})[r["ranks"]] = r
    if not points:
        return None
    ladders = [r for m in points.values() for r in m.values() if r["ranks"] > 1]
    link = None
    if ladders:
        ref = max(ladders, key=lambda r: r["ranks"])
        bw, lat = fit_link(ref["ladder_bytes"], ref["ladder_s"], ref["ranks"])
        link = {"bandwidth_Bps": bw, "latency_s": lat, "fitted_at_ranks": ref["ranks"]}
    out = {"modes": {}, "link_fit": link}
    for mode, by_p in points.items():
        # the baseline is the smallest measured point: 1 rank here, maybe one whole node on a cluster
        ps = sorted(by_p)
        p0, base = ps[0], by_p[ps[0]]
        buffers = [base["grad_bytes"]["g"], base["grad_bytes"]["d"]]
        batch = base["batch_per_rank"] if mode == "weak" else base["global_batch"]
        compute_1 = base["compute_s"] * (p0 if mode == "strong" else 1)  # strong: one rank would do p0 ranks' work
        pred = {}
        if link or ps == [1]:
            pred = {x.p: x for x in project(ps, compute_1, buffers, batch,
                                            (link["bandwidth_Bps"], link["latency_s"]) if link else (1.0, 0.0),
                                            mode=mode, data_wait_s=base["data_wait_s"])}
        rows = []
        for p in ps:
            r = by_p[p]
            t0 = base["step_total_s"]
            eff = t0 / r["step_total_s"] if mode == "weak" else p0 * t0 / (p * r["step_total_s"])
            row = {"ranks": p, "batch_per_rank": r["batch_per_rank"], "step_s": r["step_total_s"],
                   "compute_s": r["compute_s"], "allreduce_s": r["allreduce_s"],
                   "allreduce_profiled_s": r.get("allreduce_profiled_s"), "data_wait_s": r["data_wait_s"],
                   "throughput": r["throughput_samples_per_s"], "efficiency": eff, "efficiency_relative_to": p0,
                   "step_min_s": r.get("step_total_min_s"), "backend": r["backend"], "device": r["device"],
                   "loadavg": r["provenance"]["loadavg"], "date": r["provenance"]["date"],
                   "command": r["provenance"]["command"], "machine": r["provenance"]["machine"]}
            row["compute_vs_baseline"] = r["compute_s"] / base["compute_s"]  # > 1 at equal batch: contention
            if p in pred:
                x, x0 = pred[p], pred[p0]
                row.update(predicted_step_s=x.step_s, predicted_allreduce_s=x.comm_s,
                           predicted_efficiency=(x0.step_s / x.step_s if mode == "weak"
                                                 else p0 * x0.step_s / (p * x.step_s)),
                           predicted_throughput=x.throughput,
                           # the same model fed this point's own measured compute: isolates the comm model
                           predicted_step_with_measured_compute_s=r["compute_s"] + r["data_wait_s"] + x.comm_s)
            rows.append(row)
        out["modes"][mode] = {"grad_bytes": base["grad_bytes"], "comm_dtype": base["comm_dtype"],
                              "config": base["config"], "patch_lr": base["patch_lr"], "points": rows}
    return out


# --------------------------------------------------------------------------- GPU projection
def step_from_gpu_benchmark(path: Path, variant: str, batch: int, setup: str) -> tuple[float, str]:
    """Median step seconds of one run of benchmarks/train_step.py, refusing CPU smoke figures."""
    r = json.loads(path.read_text())
    if r.get("settings", {}).get("smoke") or r.get("settings", {}).get("device") == "cpu":
        raise ValueError(f"{path}: a CPU/smoke run; its step time says nothing about a GPU")
    runs = [x for x in r.get("runs", []) if x.get("variant") == variant and x.get("batch") == batch
            and x.get("setup") == setup and x.get("status") == "ok"]
    if not runs:
        raise ValueError(f"{path}: no ok run with variant={variant} batch={batch} setup={setup}")
    gpu = (r.get("provenance", {}).get("machine", {}) or {}).get("gpu")
    return runs[0]["step_s_median"], f"{path.name}: {setup}, {variant}, batch {batch} on {gpu}"


def gpu_projection(a: argparse.Namespace, train: dict | None = None) -> dict:
    elems = gradient_elements(a.config, a.variant)
    nbytes = {k: v * BYTES[a.precision] for k, v in elems.items()}
    step, source = a.step_ms / 1e3, ("issue's H100 measurement (3D, eager bf16, batch 8); not measured here"
                                     if a.step_ms == H100_STEP_S_3D_BF16_B8 * 1e3 else "--step-ms")
    if a.step_json:
        step, source = step_from_gpu_benchmark(Path(a.step_json), a.variant, a.batch, a.step_setup)
    if a.step_from_measured:
        if not train or "weak" not in train["modes"]:
            raise ValueError("--step-from-measured needs measured scaling_train_weak_n*.json points")
        w = train["modes"]["weak"]
        base = w["points"][0]
        step, a.batch, nbytes = base["compute_s"] + base["data_wait_s"], base["batch_per_rank"], w["grad_bytes"]
        # weak scaling: per-GPU compute does not depend on p, so the smallest point's compute is t(1)'s
        elems, source = None, f"measured weak n={base['ranks']} point: compute + data wait ({base['command']})"
    clusters = {}
    for key, c in CLUSTERS.items():
        clusters[key] = {"cluster": c.__dict__,
                         "overlap_0": as_dict(project(GPUS, step, list(nbytes.values()), a.batch, c, overlap=0.0)),
                         "overlap_1": as_dict(project(GPUS, step, list(nbytes.values()), a.batch, c, overlap=1.0)),
                         f"overlap_{a.overlap:g}": as_dict(project(GPUS, step, list(nbytes.values()), a.batch, c,
                                                                   overlap=a.overlap))}
    return {"config": a.config, "variant": a.variant, "precision": a.precision, "gradient_elements": elems,
            "gradient_bytes": nbytes, "step_s_per_gpu": step, "batch_per_gpu": a.batch,
            "step_source": source,
            "backward_fraction": BACKWARD_FRACTION, "gpus": GPUS, "clusters": clusters}


# --------------------------------------------------------------------------- plots
def plot_train(train: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted(train["modes"], key=lambda m: m != "weak")
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        pts = train["modes"][mode]["points"]
        xs = range(len(pts))
        comp = [p["compute_s"] * 1e3 for p in pts]
        comm = [p["allreduce_s"] * 1e3 for p in pts]
        data = [p["data_wait_s"] * 1e3 for p in pts]
        ax.bar(xs, comp, 0.5, label="compute")
        ax.bar(xs, comm, 0.5, bottom=comp, label="gradient all-reduce (timed)")
        ax.bar(xs, data, 0.5, bottom=[c + m for c, m in zip(comp, comm)], label="data wait")
        pred = [p.get("predicted_step_s") for p in pts]
        if all(v is not None for v in pred):
            ax.plot(xs, [v * 1e3 for v in pred], "kD", label="projection (1-rank compute)")
            ax.plot(xs, [p["predicted_step_with_measured_compute_s"] * 1e3 for p in pts], "r_", ms=20, mew=2,
                    label="projection (measured compute)")
        for i, p in enumerate(pts):
            ax.text(i, (comp[i] + comm[i] + data[i]) * 1.02, f"eff {p['efficiency']:.2f}\n{p['throughput']:.1f} samp/s",
                    ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [f"{p['ranks']} rank(s)\nbatch {p['batch_per_rank']}/rank" for p in pts])
        ax.set_ylabel("step time (ms)")
        ax.set_ylim(0, max(c + m + d for c, m, d in zip(comp, comm, data)) * 1.35)
        loads = ", ".join(f"{p['loadavg'][0]:.1f}" for p in pts)
        ax.set_title(f"{mode} scaling, {pts[0]['backend']} ({train['modes'][mode]['config']} model, "
                     f"LR patch {'x'.join(map(str, train['modes'][mode]['patch_lr']))})\n"
                     f"machine load average at each point: {loads}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_projection(proj: dict, train: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for key, c in proj["clusters"].items():
        e0 = [x["efficiency"] for x in c["overlap_0"]]
        e1 = [x["efficiency"] for x in c["overlap_1"]]
        line, = ax.plot(proj["gpus"], e0, "o-", label=c["cluster"]["name"])
        ax.fill_between(proj["gpus"], e0, e1, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("weak-scaling efficiency t(1)/t(p)")
    mb = sum(proj["gradient_bytes"].values()) / 1e6
    ax.set_title(f"UDEAN {proj['variant']} {proj['precision']}: {mb:.0f} MB gradients/step, "
                 f"{proj['step_s_per_gpu'] * 1e3:.0f} ms/GPU step\n(line: no overlap, as DeepSpeed ZeRO-0; "
                 "band: up to full overlap with backward)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    if train and "weak" in train["modes"]:
        pts = train["modes"]["weak"]["points"]
        ps = [p["ranks"] for p in pts]
        ax.plot(ps, [p["step_s"] * 1e3 for p in pts], "ks", ms=9, label="measured step (CPU, gloo)")
        if all("predicted_step_s" in p for p in pts):
            ax.plot(ps, [p["predicted_step_s"] * 1e3 for p in pts], "bD--", label="projected: 1-rank compute + ring")
            ax.plot(ps, [p["predicted_step_with_measured_compute_s"] * 1e3 for p in pts], "r^:",
                    label="projected: measured compute + ring")
        link = train.get("link_fit")
        if link:  # the same model beyond the measured points, on this machine's fitted link
            base, more = pts[0], [1, 2, 4, 8]
            ext = project(more, base["compute_s"], list(train["modes"]["weak"]["grad_bytes"].values()),
                          base["batch_per_rank"], (link["bandwidth_Bps"], link["latency_s"]),
                          data_wait_s=base["data_wait_s"])
            ax.plot(more, [x.step_s * 1e3 for x in ext], "b:", alpha=0.5, label="projected beyond the measured ranks")
            ps = sorted(set(ps) | set(more))
        ax.set_xticks(ps)
        ax.set_xlabel("ranks (processes on this machine)")
        ax.set_ylabel("step time (ms)")
        ax.set_ylim(0, None)
        link = train.get("link_fit")
        ax.set_title("validation on this machine (weak scaling)" +
                     (f"\nlink fit: {link['bandwidth_Bps'] / 1e9:.2f} GB/s, {link['latency_s'] * 1e6:.0f} us/hop"
                      if link else ""), fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_preprocess(pre: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = pre["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    ax = axes[0]
    ps = [r["ranks"] for r in runs]
    ax.plot(ps, [r["subjects"] / r["wall_s"] for r in runs], "ks", ms=9, label="measured (wall, incl. startup)")
    ax.plot(ps, [r["subjects_per_s"] for r in runs], "go", ms=7, label="measured (processing span)")
    ax.plot(ps, [r["subjects"] / r["predicted_wall_s"] for r in runs], "bD--", label="projected (1-rank costs, queue)")
    ax.set_xticks(ps)
    ax.set_xlabel("MPI ranks")
    ax.set_ylabel("subjects / s")
    ax.set_ylim(0, None)
    ax.set_title(f"{runs[0]['subjects']} synthetic subjects {'x'.join(map(str, pre['shape']))}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    multi = [r for r in runs if r["ranks"] > 1]
    if multi:
        r = max(multi, key=lambda r: r["ranks"])
        xs = list(range(r["ranks"]))
        w = 0.27
        ax.bar([x - w for x in xs], [q["busy_s"] for q in r["per_rank"]], w, label="dynamic queue, measured")
        ax.bar(xs, r["dynamic_sim_busy_s"], w, label="dynamic queue, 1-rank costs")
        ax.bar([x + w for x in xs], r["static_busy_s"], w, label="static i mod p, 1-rank costs")
        for x, q in zip(xs, r["per_rank"]):
            ax.text(x - w, q["busy_s"], f"{q['subjects']}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, [f"rank {x}" for x in xs])
        ax.set_ylabel("busy seconds (number: subjects done)")
        ax.set_ylim(0, max(max(q["busy_s"] for q in r["per_rank"]), max(r["static_busy_s"])) * 1.3)
        ax.set_title(f"load balance at {r['ranks']} ranks: makespan dynamic {r['predicted_span_s']:.1f} s vs "
                     f"static {r['static_span_s']:.1f} s\n(1-rank costs); measured imbalance max/mean "
                     f"{r['imbalance']:.2f}", fontsize=9)
        ax.legend(fontsize=8)
    ax = axes[2]
    for name, proj in pre["projection_1113"].items():
        cores = [x["cores"] for x in proj["by_cores"]]
        line, = ax.plot(cores, [x["dynamic_s"] / 60 for x in proj["by_cores"]], "o-", label=f"{name}: dynamic")
        ax.plot(cores, [x["static_s"] / 60 for x in proj["by_cores"]], "x:", color=line.get_color(), label="static")
        if "manifest_floor_s" in proj["by_cores"][0]:
            ax.axhline(proj["by_cores"][0]["manifest_floor_s"] / 60, color=line.get_color(), ls="--", lw=0.8)
        ax.fill_between(cores, [x["dynamic_s"] / 60 for x in proj["by_cores"]],
                        [x["dynamic_contended_s"] / 60 for x in proj["by_cores"]], color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cores (one rank each)")
    ax.set_ylabel("projected wall time (minutes)")
    ax.set_title(f"HCP projection (band: x{pre['contention_factor']:.2f} per-core slowdown seen at "
                 f"{max(ps)} ranks)\ndashed: rank 0's serial time per subject, "
                 + (f"{pre['rank0_s_per_subject'] * 1e3:.2f} ms" if "rank0_s_per_subject" in pre else
                    f"a manifest rewrite each, {pre.get('manifest_write_s_1113_rows', float('nan')) * 1e3:.0f} ms "
                    "at 1113 rows (before issue 28)"), fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import provenance, write_json

    p = argparse.ArgumentParser(prog="scaling.py report", description=__doc__.split("\n")[0])
    add_arguments(p)
    a = p.parse_args(argv)
    results = Path(a.results)
    train = train_report(results)
    if train:
        write_json(results / "scaling_train.json", {"kind": "train", **train, "provenance": provenance()})
        plot_train(train, results / "scaling_train.png")
    proj = gpu_projection(a, train)
    if train:
        proj["validation"] = {m: [{k: p.get(k) for k in ("ranks", "step_s", "predicted_step_s",
                                                         "predicted_step_with_measured_compute_s",
                                                         "allreduce_s", "allreduce_profiled_s",
                                                         "predicted_allreduce_s", "efficiency", "predicted_efficiency")}
                                  for p in v["points"]] for m, v in train["modes"].items()}
    write_json(results / "scaling_projection.json", {"kind": "projection", **proj, "provenance": provenance()})
    plot_projection(proj, train, results / "scaling_projection.png")
    pre_path = results / "scaling_preprocess.json"
    if pre_path.is_file():
        plot_preprocess(json.loads(pre_path.read_text()), results / "scaling_preprocess.png")
    for key, c in proj["clusters"].items():
        effs = " ".join(f"{x['p']}:{x['efficiency']:.3f}" for x in c["overlap_0"])
        print(f"projection {key}: {effs}")
    if train:
        print(markdown_train(train))
    if pre_path.is_file():
        print(markdown_preprocess(json.loads(pre_path.read_text())))
    return 0


def _ms(x) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


def markdown_train(train: dict) -> str:
    """The measured points next to the projection's prediction, as a Markdown table."""
    lines = ["| mode | ranks | batch/rank | step ms | compute ms | all-reduce ms (timed / in-step profiled) "
             "| data ms | samples/s | efficiency | projected step ms (1-rank compute / measured compute) "
             "| projected all-reduce ms | load avg |", "|" + "---|" * 12]
    for mode in sorted(train["modes"], key=lambda m: m != "weak"):
        for q in train["modes"][mode]["points"]:
            lines.append(
                f"| {mode} | {q['ranks']} | {q['batch_per_rank']} | {_ms(q['step_s'])} | {_ms(q['compute_s'])} "
                f"| {_ms(q['allreduce_s'])} / {_ms(q.get('allreduce_profiled_s'))} | {_ms(q['data_wait_s'])} "
                f"| {q['throughput']:.2f} | {q['efficiency']:.2f} | {_ms(q.get('predicted_step_s'))} / "
                f"{_ms(q.get('predicted_step_with_measured_compute_s'))} | {_ms(q.get('predicted_allreduce_s'))} "
                f"| {q['loadavg'][0]:.1f} |")
    return "\n".join(lines)


def markdown_preprocess(pre: dict) -> str:
    lines = ["| ranks | subjects | wall s (projected) | processing span s | subjects/s | busy s per rank "
             "| subjects per rank | static makespan s (computed) | load avg |", "|" + "---|" * 9]
    for r in pre["runs"]:
        busy = " / ".join(f"{q['busy_s']:.1f}" for q in r["per_rank"])
        count = " / ".join(str(q["subjects"]) for q in r["per_rank"])
        lines.append(f"| {r['ranks']} | {r['subjects']} | {r['wall_s']:.1f} ({r['predicted_wall_s']:.1f}) "
                     f"| {r['span_s']:.1f} | {r['subjects_per_s']:.2f} | {busy} | {count} | {r['static_span_s']:.1f} "
                     f"| {r.get('loadavg', [float('nan')])[0]:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
