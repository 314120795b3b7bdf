"""What a run shows and leaves behind: progress bar, JSON-lines metrics, TensorBoard events,
PNG plots and the final summary line.

Only process 0 writes files or prints the bar; every process may call the methods.

Files in the workdir:

* ``metrics.jsonl``: one JSON object per logged step, ``{"step": int, "<name>": float, ...}``
  (``train/loss``, ``train/lr``, ``train/grad_norm``, ``train/img_per_s``, ``eval/top1``,
  ``eval/top5``, ``eval/loss``, ``eval_ema/top1``, ...), appended across restarts;
* ``tensorboard/``: the same scalars as TensorBoard events (tensorboardX);
* ``loss.png``, ``accuracy.png``: curves drawn from ``metrics.jsonl`` at the end;
* ``summary.json``: the final numbers (also printed as one line).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class ProgressBar:
    """A one-line bar on stderr: step, percent, images/s, ETA, loss.

    Redrawn in place on a terminal (at most every ``min_interval_s``), printed as a new line
    every ``line_interval_s`` otherwise (log files).
    """

    def __init__(
        self,
        total_steps: int,
        global_batch: int,
        start_step: int = 0,
        *,
        enabled: bool = True,
        stream=None,
        min_interval_s: float = 0.25,
        line_interval_s: float = 30.0,
    ):
        self.total = total_steps
        self.batch = global_batch
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = min_interval_s if self.tty else line_interval_s
        self._window: deque[tuple[float, int]] = deque(maxlen=50)
        self._window.append((time.perf_counter(), start_step))
        self._last_draw = 0.0
        self.loss = float("nan")

    def images_per_second(self) -> float:
        """Throughput over the recent window of steps."""
        (t0, s0), (t1, s1) = self._window[0], self._window[-1]
        return (s1 - s0) * self.batch / (t1 - t0) if t1 > t0 else float("nan")

    def update(self, step: int, loss: float | None = None, force: bool = False) -> None:
        """Records that ``step`` steps are done; redraws if due."""
        now = time.perf_counter()
        self._window.append((now, step))
        if loss is not None:
            self.loss = loss
        if not self.enabled or (not force and now - self._last_draw < self.interval):
            return
        self._last_draw = now
        ips = self.images_per_second()
        eta = (self.total - step) * self.batch / ips if ips > 0 else float("nan")
        frac = step / max(self.total, 1)
        width = 24
        filled = int(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        line = (
            f"[{bar}] {step}/{self.total} {100 * frac:5.1f}% | {ips:8.1f} img/s | "
            f"ETA {_format_duration(eta)} | loss {self.loss:.4f}"
        )
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the in-place line."""
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Reporter:
    """JSON-lines + TensorBoard writer for process 0 (a no-op elsewhere).

    Args:
      workdir: the run's directory.
      enabled: whether this process writes (``jax.process_index() == 0``).
      tensorboard: also write TensorBoard events.
    """

    def __init__(self, workdir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.workdir = Path(workdir)
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.workdir / METRICS_FILE, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Appends ``metrics`` of ``step`` to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        record = {"step": int(step)}
        for k, v in metrics.items():
            record[k] = v if isinstance(v, str) else float(v)
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and not isinstance(v, str):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        """Flushes and closes the files."""
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """All records of ``<workdir>/metrics.jsonl``; after a resume, later records win per step."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # A line cut by a kill.
                    continue
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    by_step: dict[int, float] = {}
    for r in records:
        if key in r:
            by_step[r["step"]] = r[key]
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def make_plots(workdir: str | Path, steps_per_epoch: int | None = None) -> list[Path]:
    """Draws ``loss.png`` (train and eval loss) and ``accuracy.png`` (eval top-1/top-5, raw and
    EMA) from metrics.jsonl; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    records = read_metrics(workdir)
    scale = steps_per_epoch or 1
    xlabel = "epoch" if steps_per_epoch else "step"
    written = []
    panels = {
        "loss.png": ("loss", ["train/loss", "eval/loss", "eval_ema/loss"]),
        "accuracy.png": (
            "accuracy (%)",
            ["eval/top1", "eval/top5", "eval_ema/top1", "eval_ema/top5"],
        ),
    }
    for name, (ylabel, keys) in panels.items():
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        drawn = False
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(
                    [s / scale for s in steps],
                    values,
                    label=key,
                    marker="." if len(steps) < 30 else None,
                )
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(workdir / name)
        plt.close(fig)
        written.append(workdir / name)
    return written


def summary_line(summary: dict[str, Any]) -> str:
    """The final one-line summary, e.g. ``DONE vig_t step 500 | top-1 41.20% top-5 ...``."""
    parts = [f"DONE {summary.get('model', '?')} step {summary.get('step', '?')}"]
    for prefix, label in (("eval", "model"), ("eval_ema", "EMA")):
        if f"{prefix}/top1" in summary:
            parts.append(
                f"{label}: top-1 {summary[f'{prefix}/top1']:.2f}% "
                f"top-5 {summary[f'{prefix}/top5']:.2f}%"
            )
    if "best/top1" in summary:
        parts.append(f"best top-1 {summary['best/top1']:.2f}% (step {summary['best/step']})")
    parts.append(f"{summary.get('wall_s', 0):.0f} s")
    parts.append(f"{summary.get('skipped_images', 0)} unreadable images skipped")
    return " | ".join(parts)


def write_summary(workdir: str | Path, summary: dict[str, Any], enabled: bool = True) -> str:
    """Writes summary.json, prints and returns the summary line (process 0)."""
    line = summary_line(summary)
    if enabled:
        with open(Path(workdir) / SUMMARY_FILE, "w") as f:
            json.dump(summary, f, indent=2)
        print(line, flush=True)
    return line
