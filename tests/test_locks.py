"""An output folder in use by a running sdcli is refused; a killed run leaves no stale lock."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import one_error_line
from sdcli.locks import FolderLock


def test_finetune_into_a_folder_another_run_holds_is_refused(cli, tiny_sd, dataset, tmp_path):
    out = tmp_path / "run"
    lock = FolderLock(out)
    assert lock.acquire() is None  # as a running finetune holds it
    try:
        result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, "--max-steps", "1", "-q")
        assert result.exit_code == 1
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "in use by another sdcli finetune" in lines[0], result.stderr
        assert [p.name for p in out.iterdir()] == [FolderLock.NAME]  # nothing of the refused run's
    finally:
        lock.release()
    assert not out.exists()  # the lock made the folder and the run left it empty
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, "--max-steps", "1", "-q",
                 "--checkpoint-every", "0")
    assert result.exit_code == 0, result.stderr
    assert not (out / FolderLock.NAME).exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = ("import sys, time\nfrom sdcli.locks import FolderLock\n"
            f"lock = FolderLock({str(tmp_path)!r})\nassert lock.acquire() is None\nprint('held', flush=True)\ntime.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert FolderLock(tmp_path).acquire() == holder.pid  # held, and by whom
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        deadline = time.time() + 5
        while (pid := FolderLock(tmp_path).acquire()) is not None and time.time() < deadline:
            time.sleep(0.05)
        assert pid is None
    finally:
        holder.kill()


@pytest.mark.parametrize("link", ["symbolic", "hard"])
@pytest.mark.parametrize("command", ["generate", "finetune"])
def test_a_link_where_sdcli_keeps_its_counter_or_lock_is_refused_and_its_target_survives(cli, tiny_sd, dataset,
                                                                                           tmp_path, command, link):
    import os

    from sdcli.generation.outputs import COUNTER

    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("do not truncate me\n")
    own = out / (COUNTER if command == "generate" else FolderLock.NAME)
    (os.symlink if link == "symbolic" else os.link)(target, own)
    if command == "generate":
        result = cli("generate", "a red circle", "--model", tiny_sd, "--steps", "1", "--seed", "1", "--out", out)
    else:
        result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, "--max-steps", "1", "-q",
                     "--checkpoint-every", "0")
    line = one_error_line(result, 1)
    assert str(own) in line and "link" in line
    assert target.read_text() == "do not truncate me\n"
    assert sorted(p.name for p in out.iterdir()) == [own.name]  # no image, no weights
