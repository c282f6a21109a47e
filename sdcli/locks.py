"""Exclusive locks on output folders, held by the kernel for as long as the process lives.

`fcntl.flock` locks vanish with the process that holds them, so a run that is
killed (Ctrl-C twice, OOM killer, a closed laptop) never leaves a stale lock
behind. Where there is no fcntl (Windows) the lock is a no-op.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import IO, Iterator

from sdcli.errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def locked(path: Path, *, wait: bool = True) -> Iterator[IO[str] | None]:
    """Hold an exclusive lock on ``path`` (created if missing) and yield it open for reading and writing.

    With ``wait=False`` yields None at once when another process holds the lock.
    """
    f = open_own(path)
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


def open_own(path: Path) -> IO[str]:
    """``path`` (created if missing) open for reading and writing, refused if it is not sdcli's own plain
    file: a symbolic or hard link there would have sdcli truncate and rewrite whatever it points to."""
    path = Path(path)
    if path.is_symlink():  # also where the platform has no O_NOFOLLOW
        raise _not_own(path, "a symbolic link")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # made a link between the check and the open
            raise _not_own(path, "a symbolic link") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise _not_own(path, "not a plain file" if not stat.S_ISREG(info.st_mode) else "a hard link to another file")
    return os.fdopen(fd, "r+", encoding="utf-8")


def check_own(path: Path) -> None:
    """Refuse, before any work, a link where sdcli keeps its own file (`open_own` refuses it again when used)."""
    path = Path(path)
    if path.is_symlink():
        raise _not_own(path, "a symbolic link")
    if path.exists() and (not path.is_file() or path.stat().st_nlink > 1):
        raise _not_own(path, "not a plain file" if not path.is_file() else "a hard link to another file")


def _not_own(path: Path, what: str) -> OutputError:
    return OutputError(f"{path} is {what}; sdcli keeps its own file there and will not write through it "
                       "(remove it, or pick another folder)")


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
