"""What every benchmark writes besides its figures: provenance, the JSON file and a bar chart.

    from benchmarks.common import RESULTS, provenance, relative, write_json, bar_chart

`provenance()` is the machine (CPU, cores, GPU, CUDA / cuDNN), package versions, git commit, date,
command line and load average; every benchmark puts it under "provenance" in its JSON, so a
figure is never separated from where and how it was measured. Paths in results (the command's,
data folders, figures) are written by `relative`: relative to the repository when inside it, so
committed results do not carry the checkout location of the machine that made them. JSON is
written atomically (temp file + rename: a benchmark killed mid-write leaves the previous result,
not half a file). PNGs use matplotlib's Agg backend; without matplotlib the chart is skipped and
said so, once.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

PACKAGES = ("torch", "deepspeed", "numpy", "h5py", "mpi4py", "scipy", "nibabel", "matplotlib", "SimpleITK", "nilearn",
            "dipy")


def relative(path: str | os.PathLike | None) -> str | None:
    """`path` relative to the repository when it lies inside it (`key=/abs/path` too), else as given."""
    if path is None:
        return None
    key, eq, value = str(path).rpartition("=")  # no "=": key and eq are empty
    if Path(value).is_absolute():
        try:
            value = Path(os.path.abspath(value)).relative_to(REPO).as_posix()
        except ValueError:
            pass
    return f"{key}{eq}{value}"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu() -> dict[str, Any] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"count": torch.cuda.device_count(), "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def provenance(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Machine, versions, git commit, date, command and load: what every result JSON carries.
    argv: the benchmark's arguments when its main(argv) was called with some (the script is then
    the caller's file); default: this process's command line. Paths are written `relative`."""
    import importlib.metadata as md

    versions: dict[str, Any] = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    argv = list(sys.argv) if argv is None else [sys._getframe(1).f_code.co_filename, *argv]
    threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if os.environ.get(k)}
    return {
        "machine": {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu": _cpu_name(),
                    "cores": os.cpu_count(), "gpu": _gpu(), "threads": threads,
                    "slurm_job": os.environ.get("SLURM_JOB_ID"), "nodes": os.environ.get("SLURM_JOB_NUM_NODES")},
        "versions": versions,
        "git_commit": commit, "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(relative(a) for a in [sys.executable, *argv]),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _clean(obj: Any) -> Any:
    """JSON has no NaN / Infinity: write them as null rather than produce a file json.load rejects
    in other languages."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: dict[str, Any]) -> Path:
    """Write `obj` as indented JSON, atomically (temp file + rename)."""
    from hpc.atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_clean(obj), indent=1) + "\n")
    return path


def bar_chart(path: str | os.PathLike, panels: Sequence[dict[str, Any]], title: str = "",
              ncols: int | None = None) -> Path | None:
    """One PNG of horizontal bar panels. Each panel: {"title", "xlabel", "labels": [...],
    "values": [...], optional "notes": [...] (text at the end of each bar), optional "ref":
    (x, label) for a vertical reference line}. None values are drawn as absent bars.
    Returns the path, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG written", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = ncols or min(n, 2)
    nrows = -(-n // ncols)
    height = max(max((len(p["labels"]) for p in panels), default=1) * 0.32 + 1.2, 2.5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, height * nrows), squeeze=False)
    for ax, p in zip(axes.flat, panels):
        labels = list(p["labels"])
        values = [v if v is not None else 0.0 for v in p["values"]]
        y = list(range(len(labels)))
        colors = p.get("colors") or ["C0"] * len(labels)
        ax.barh(y, values, color=colors)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(p.get("xlabel", ""))
        ax.set_title(p.get("title", ""), fontsize=10)
        for yi, note in zip(y, p.get("notes") or []):
            if note:
                ax.text(values[yi], yi, f" {note}", va="center", fontsize=7)
        if p.get("ref"):
            x, label = p["ref"]
            ax.axvline(x, color="k", ls="--", lw=0.8)
            ax.text(x, -0.6, f" {label}", fontsize=7)
        ax.margins(x=0.25)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
