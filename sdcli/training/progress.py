"""Progress and notes on stderr, from the main process only.

On a terminal: a rich progress bar with loss, steps per second and time left.
Elsewhere (CI, `nohup`, a log file): a plain line every twentieth of the run,
since a redrawn bar would leave nothing readable in a log.
"""

from __future__ import annotations

import sys
import time


class Notes:
    """print() to stderr, or nothing when quiet or not the main process."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)


class TrainingProgress:
    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled = enabled
        self.total = total
        self.start = start
        self.t0 = time.perf_counter()
        self.every = max(1, total // 20)
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.2f} steps/s"),
                TextColumn("eta"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), rate=0.0)
            self.bar.start()

    def rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self.t0
        return (step - self.start) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        rate = self.rate(step)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, rate=rate)
        elif step % self.every == 0 or step == self.total:
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(f"step {step}/{self.total}  loss {loss:.4f}  {rate:.2f} steps/s  eta {_clock(eta)}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
