"""One progress bar shape for every command: rich on stderr, or nothing with --quiet."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


def note(quiet: bool, message: str) -> None:
    """A note for the user on stderr (stdout stays for results), unless quiet."""
    import sys

    if not quiet:
        print(message, file=sys.stderr)


@contextlib.contextmanager
def progress_bar(label: str, total: int, disable: bool = False) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; the bar lives on stderr so stdout stays for results."""
    import sys

    # A bar redrawn in place only makes sense on a terminal; in a log it is noise.
    if disable or not sys.stderr.isatty():
        yield lambda n=1: None
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
