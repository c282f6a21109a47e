"""Exclusive locks on output folders, held by the kernel for as long as the process lives.

`fcntl.flock` locks vanish with the process that holds them, so a run that is
killed (Ctrl-C twice, OOM killer, a closed laptop) never leaves a stale lock
behind. Where there is no fcntl (Windows) the lock is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def locked(path: Path, *, wait: bool = True) -> Iterator[IO[str] | None]:
    """Hold an exclusive lock on ``path`` (created if missing) and yield it open for reading and writing.

    With ``wait=False`` yields None at once when another process holds the lock.
    """
    f = open(path, "a+", encoding="utf-8")
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield None
                return
        f.seek(0)
        yield f
    finally:
        f.close()  # closing releases the lock


class FolderLock:
    """``folder`` reserved for one run: a second run (in any process) is told who holds it."""

    NAME = ".sdcli-lock"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.NAME
        self._cm: contextlib.AbstractContextManager | None = None
        self._made = False

    def acquire(self) -> int | None:
        """None when the folder is ours now, else the holder's process id (0 if unknown)."""
        self._made = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cm = locked(self.path, wait=False)
        f = cm.__enter__()
        if f is None:
            cm.__exit__(None, None, None)
            try:
                return int(self.path.read_text().strip() or 0)
            except (OSError, ValueError):
                return 0
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._cm = cm
        return None

    def release(self) -> None:
        if self._cm is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self._cm.__exit__(None, None, None)
            self._cm = None
            if self._made:  # a folder this run made and left empty (it stopped early) goes too
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()
