"""Training logs on rank 0: a rich progress bar, JSONL metrics and TensorBoard.

`train.out/metrics.jsonl`: one JSON object per line, `{"kind": "train"|"val"|"fidelity"|"event",
"step": ..., "epoch": ..., ...}`; train rows carry every loss term (g.*, d.*), lr and patches/s;
fidelity rows the degradation's fidelity (udean/fidelity.py). `train.out/tb/`: the same scalars
for TensorBoard, and the fidelity image summaries. Other ranks get a `Logs` that does nothing,
so the training loop never asks which rank it is on.

`open(step)` starts the files at the step training starts from: rows of later steps (written
by a run that died after its last checkpoint, and about to be redone) move from metrics.jsonl
to `metrics.replaced.jsonl`, and TensorBoard purges its events after `step`, so both hold
every step exactly once. Before `open`, `warn` and `message` print only.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from hpc.atomic import atomic_write_text
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Logs:
    """Rank 0's logs. Use as a context manager around the loop."""

    def __init__(self, out: str | Path, total_steps: int, enabled: bool = True, console: Console | None = None,
                 progress_every: int = 0):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        # a console that is not a terminal (a batch job's log file) shows no progress bar until the
        # end: there, a plain line every `progress_every` steps
        self.progress_every = progress_every if not self.console.is_terminal else 0
        self._started = (0, time.perf_counter())  # (step, time) at open: the rate of this run
        self._last_row = 0
        self.out, self.total_steps = Path(out), total_steps
        self._jsonl = self._tb = self._progress = None
        self._task = None
        self.replaced = 0  # rows of steps after the start moved to metrics.replaced.jsonl

    def open(self, start_step: int) -> None:
        """Open the JSONL, TensorBoard and progress bar at `start_step` (0, or the resumed step)."""
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "metrics.jsonl"
        if path.exists():
            keep, later = [], []
            for line in path.read_text().splitlines():
                try:
                    step = json.loads(line).get("step", 0)
                except (ValueError, AttributeError):
                    step = None  # a torn last line of a killed run: not a row
                (keep if step is not None and step <= start_step else later).append(line)
            if later:
                with open(self.out / "metrics.replaced.jsonl", "a") as f:
                    f.write("".join(line + "\n" for line in later))
                atomic_write_text(path, "".join(line + "\n" for line in keep))
            self.replaced = len(later)
        self._jsonl = open(path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step + 1)
        except ImportError:
            self.console.print("[yellow]tensorboard is not installed: no TensorBoard logs[/]")
        self._progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            transient=False)
        self._task = self._progress.add_task("train", total=self.total_steps, completed=start_step, info="")
        self._started = (start_step, time.perf_counter())
        self._last_row = start_step

    def __enter__(self) -> "Logs":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _write(self, row: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")

    def _record(self, kind: str, step: int, epoch: int, scalars: dict[str, float]) -> None:
        """One JSONL row and the TensorBoard scalars `<kind>/<name>`."""
        self._write({"kind": kind, "step": step, "epoch": epoch, **scalars})
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{kind}/{k}", v, step)

    def train(self, step: int, epoch: int, scalars: dict[str, float]) -> None:
        """A train row: `scalars` holds losses (g.total, d.total, ...), lr, patches_per_s."""
        if not self.enabled:
            return
        self._record("train", step, epoch, scalars)
        info = (f"ep {epoch} G {scalars.get('g.total', float('nan')):.4f} "
                f"D {scalars.get('d.total', float('nan')):.4f} {scalars.get('patches_per_s', 0):.1f} patch/s")
        self._progress.update(self._task, completed=step, info=info)
        n, (first, t0) = self.progress_every, self._started
        if n and (step // n > self._last_row // n or step == self.total_steps):  # a multiple of n since the last row
            took = time.perf_counter() - t0
            eta = took / max(step - first, 1) * (self.total_steps - step)
            self.message(f"step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.0f} %), {info}, "
                         f"elapsed {_hms(took)}, ETA {_hms(eta)}")
        self._last_row = step

    def val(self, step: int, epoch: int, scalars: dict[str, float | int]) -> None:
        if not self.enabled:
            return
        self._record("val", step, epoch, scalars)
        self.message(f"epoch {epoch} val: " + " ".join(f"{k} {v}" if isinstance(v, int) else f"{k} {v:.4f}"
                                                       for k, v in scalars.items()))

    def fidelity(self, step: int, epoch: int, scalars: dict[str, float]) -> None:
        """A fidelity row (udean/fidelity.py: X_{s~t} against the target and the truth)."""
        if self.enabled:
            self._record("fidelity", step, epoch, scalars)

    def images(self, step: int, images: dict[str, Any]) -> None:
        """Image summaries `images/<name>` in TensorBoard: (h, w) arrays in [0, 1]."""
        if self.enabled and self._tb is not None:
            for k, v in images.items():
                self._tb.add_image(f"images/{k}", v[None], step, dataformats="CHW")

    def event(self, step: int, what: str, **fields: Any) -> None:
        """A one-off (checkpoint, skipped step, resume, stop): JSONL row and a console line."""
        if not self.enabled:
            return
        self._write({"kind": "event", "step": step, "event": what, **fields})

    def message(self, text: str, style: str = "") -> None:
        if self.enabled:  # one line however long: a log is read with grep
            self.console.print(f"[{style}]{text}[/]" if style else text, highlight=False, soft_wrap=True)

    def warn(self, text: str) -> None:
        if self.enabled:
            self.console.print(f"[bold yellow]warning:[/] {text}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
