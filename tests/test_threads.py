"""torch's CPU threads: a fixed --threads, and auto leaving alone the cores other processes keep busy."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from conftest import one_error_line
from sdcli import threads


@pytest.mark.skipif(threads._cpu_seconds() is None, reason="needs /proc")
def test_a_spinning_process_is_seen_as_a_busy_core():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        threads.mark()
        sum(i * i for i in range(3_000_000))  # our own work meanwhile must not count as someone else's
        busy = threads.busy_elsewhere(min_window=0.5)
    finally:
        burner.kill()
    assert 0.6 < busy < threads.cores() + 0.1


def test_auto_takes_the_free_cores_and_at_least_one(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 4)
    for busy, expected in ((0.0, 4), (1.2, 3), (2.6, 1), (7.0, 1)):
        monkeypatch.setattr(threads, "busy_elsewhere", lambda b=busy: b)
        assert threads.auto_threads(default=4) == expected
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 0.0)
    assert threads.auto_threads(default=2) == 2  # never more than torch would use


def test_threads_option_sets_torchs_count_and_zero_is_refused(cli, tiny_sd):
    import torch

    from sdcli.generation import Engine, Settings

    before = torch.get_num_threads()
    try:
        Engine.load(Settings(prompts=["x"], model=tiny_sd, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "--threads must be between 1 and 1024, got 0" in one_error_line(cli("generate", "x", "--model", tiny_sd, "--threads", "0"), 2)
