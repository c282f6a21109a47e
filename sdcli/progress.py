"""Progress and notes, always on stderr: stdout stays for results.

- `note` / `Notes`: one line for the user, unless quiet (or not the main process).
- `progress_bar`: a rich bar for `generate` on a terminal; elsewhere plain lines with the time left.
- `quiet_libraries`: the libraries' own bars and chatter off, so these are the only ones.
- `TrainingProgress`: `finetune`'s bar with loss, steps per second and time left;
  where stderr is not a terminal (CI, `nohup`, a log file) a plain line every
  twentieth of the run instead, since a redrawn bar leaves nothing readable in a log.

rich is imported only when a bar is drawn.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator


def note(quiet: bool, message: str) -> None:
    """A note for the user on stderr (stdout stays for results), unless quiet."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


class Notes:
    """`note` with the decision made once (quiet, or not the main process), for code that passes it around."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        note(not self.enabled, message)


SLOW = 10.0  # seconds a step may take before `while_slow` says what the run waits for


@contextlib.contextmanager
def while_slow(say: Callable[[str], None], message: str, seconds: float | None = None) -> Iterator[None]:
    """Say ``message`` if the block is still running after ``seconds`` (default `SLOW`): loading a big model
    takes minutes, and a log said nothing meanwhile; a quick load, and an error soon after it, stay one line."""
    import threading

    timer = threading.Timer(SLOW if seconds is None else seconds, say, (message,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()  # a message already on its way is out before whatever follows


@contextlib.contextmanager
def progress_bar(label: str, total: int, disable: bool = False) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; the bar lives on stderr so stdout stays for results."""
    # A bar redrawn in place only makes sense on a terminal; in a log, plain lines (`PlainProgress`).
    if disable:
        yield lambda n=1: None
        return
    if not sys.stderr.isatty():
        yield PlainProgress(label, total).advance
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=True,
    ) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)
        bar.update(task, completed=total)


class PlainProgress:
    """`progress_bar` where stderr is not a terminal: "denoising 3/25  2.1 s/step  eta 0:00:46" lines.

    One after the first step (so a slow run says early how long it will take), then at most one every
    `INTERVAL` seconds, and one at the end; a 4096x4096 image on a CPU used to run for many minutes in
    silence in a log.
    """

    INTERVAL = 10.0  # seconds between lines

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, total, 0
        self.t0 = self.last = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.done == n or self.done >= self.total or now - self.last >= self.INTERVAL:
            self.last = now
            per_step = (now - self.t0) / self.done
            print(f"{self.label} {min(self.done, self.total)}/{self.total}  {_per(per_step)}  "
                  f"eta {_clock(per_step * max(0, self.total - self.done))}", file=sys.stderr, flush=True)


class Counted:
    """Progress of code that counts its own work as ``progress(done, total)`` (`TrainingInputs.build_cache`):
    `progress_bar`'s bar or plain lines, begun at the first count and ended at the last."""

    def __init__(self, label: str, enabled: bool = True):
        self.label, self.enabled, self.bar, self.advance, self.done = label, enabled, None, None, 0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        if self.advance is None:
            self.bar = progress_bar(self.label, total)
            self.advance = self.bar.__enter__()
        self.advance(done - self.done)
        self.done = done
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _per(seconds: float) -> str:
    return f"{seconds:.2f} s/step" if seconds >= 0.1 else f"{1 / max(seconds, 1e-9):.1f} steps/s"


class TrainingProgress:
    """`finetune`'s progress: ``update(step, loss, val_loss)`` after each optimizer step, ``close()`` at the end.

    The latest validation loss stays on the line until the next one is measured.
    """

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled = enabled
        self.total = total
        self.start = start
        self.t0 = time.perf_counter()
        self.every = max(1, total // 20)
        self.bar = None
        self.val = ""  # "  val_loss 0.1234", once one is measured
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}{task.fields[val]}"),
                TextColumn("{task.fields[rate]:.2f} steps/s"),
                TextColumn("eta"), TimeRemainingColumn(),
                console=Console(stderr=True), transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss=float("nan"), rate=0.0, val="")
            self.bar.start()

    def rate(self, step: int) -> float:
        elapsed = time.perf_counter() - self.t0
        return (step - self.start) / elapsed if elapsed > 0 else 0.0

    def update(self, step: int, loss: float, val_loss: float | None = None) -> None:
        if not self.enabled:
            return
        rate = self.rate(step)
        if val_loss is not None:
            self.val = f"  val_loss {val_loss:.4f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, rate=rate, val=self.val)
        elif step % self.every == 0 or step == self.total or val_loss is not None:
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            print(f"step {step}/{self.total}  loss {loss:.4f}{self.val}  {rate:.2f} steps/s  eta {_clock(eta)}",
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


# The libraries whose own log lines and warnings sdcli says in its words instead (a LoRA for another model
# printed 66 lines of diffusers' log before sdcli's one line saying so).
LIBRARIES = ("diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "torchao", "bitsandbytes", "gguf",
             "torch.utils._pytree", "xformers")


def quiet_libraries(imports: bool = True) -> None:
    """Silence the libraries' own progress bars, log lines and warnings; sdcli reports progress and errors itself.

    ``imports=False`` imports nothing, so every command runs it at start, before any library loads (the
    environment variables and logger levels hold for what imports later); with ``imports`` diffusers' and
    transformers' own switches are set too (diffusers' bars ignore the environment). With SDCLI_DEBUG=1 the
    libraries speak as they would on their own.
    """
    import logging
    import os
    import warnings

    from sdcli.errors import debug_enabled

    debug = debug_enabled()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not debug:
        # Read when diffusers and transformers import; "critical" keeps out the ERROR lines they log about a
        # failure sdcli then reports in one line of its own.
        for var in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(var, "critical")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    level = logging.WARNING if debug else logging.CRITICAL
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(level)
    if not debug:
        for name in LIBRARIES:
            warnings.filterwarnings("ignore", module=name.replace(".", r"\.") + r"(\.|$)")
        # diffusers >= 0.36 renamed torch_dtype to dtype; we keep the name every supported version takes.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated")
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        if imports:
            import importlib

            importlib.import_module(module)
        lib = sys.modules.get(module)
        if lib is not None:
            lib.set_verbosity(level)
            lib.disable_progress_bar()
