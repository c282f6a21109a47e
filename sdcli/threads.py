"""How many CPU threads torch uses, chosen for the machine as it is when a run starts.

torch's default is one thread per core. When another process keeps one of the
cores busy, every parallel region waits at its barrier for the thread that lost
its core, and a 2-core machine ran generation about 20× slower than with one
thread (issue 12; measured in docs/benchmarks.md). So `auto` counts the cores
other processes keep busy and leaves them alone.

How busy the others are is read from /proc over the time sdcli spends starting
up (importing torch takes seconds), minus what sdcli itself used meanwhile, so
the measurement costs nothing. Where /proc is missing (macOS, Windows) auto is
torch's default.
"""

from __future__ import annotations

import os
import time

_mark: tuple[float, float, float] | None = None  # (wall time, busy CPU seconds of all, CPU seconds of ours)


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) since boot, or None without /proc."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat", encoding="ascii") as f:
            mine = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / tick, (int(mine[11]) + int(mine[12])) / tick  # utime + stime


def mark() -> None:
    """Start watching how busy the other processes are (called as the CLI starts)."""
    global _mark
    now = _cpu_seconds()
    if now is not None:
        _mark = (time.monotonic(), *now)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def busy_elsewhere(min_window: float = 0.2) -> float | None:
    """How many cores other processes kept busy since `mark()` (sampling a little longer if that was
    too short to tell), or None where it cannot be read."""
    if _mark is None:
        mark()
    if _mark is None:
        return None
    t0, all0, ours0 = _mark
    if time.monotonic() - t0 < min_window:
        time.sleep(min_window - (time.monotonic() - t0))
    now = _cpu_seconds()
    if now is None:
        return None
    elapsed = time.monotonic() - t0
    return max(0.0, ((now[0] - all0) - (now[1] - ours0)) / elapsed)


def auto_threads(default: int) -> int:
    """torch's ``default`` thread count, less the cores other processes keep busy (at least one)."""
    others = busy_elsewhere()
    if others is None:
        return default
    return max(1, min(default, cores() - round(others)))


def apply(threads: int | None, device: str) -> int | None:
    """Set torch's intra-op threads for a CPU run: ``threads`` if given, else `auto_threads`. Returns the count."""
    if not str(device).startswith("cpu") and threads is None:
        return None  # on a GPU the CPU threads hardly matter; leave torch's default
    import torch

    n = threads or auto_threads(torch.get_num_threads())
    torch.set_num_threads(n)
    return n
