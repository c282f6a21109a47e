"""--help on an 80-column terminal shows every option name whole (rich used to cut `--guidance-resca…`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _commands():
    from sdcli.commands import COMMANDS

    return [[]] + [[name] for _module, _attr, name in COMMANDS]


def _long_flags(argv: list[str]) -> set[str]:
    import typer.main

    from sdcli.cli import app

    command = typer.main.get_command(app)
    for name in argv:
        command = command.commands[name]
    return {opt for p in command.params if not getattr(p, "hidden", False)
            for opt in (*p.opts, *getattr(p, "secondary_opts", ())) if opt.startswith("--")}


def _name_column(text: str) -> list[str]:
    """The first word of each line of the option panels, where the option names are."""
    names, start = [], None
    for line in text.splitlines():
        if line.startswith("╭"):
            start = None
        elif line.startswith("│") and start is None:
            start = next((i for i, ch in enumerate(line) if ch == "-"), None)
        if line.startswith("│") and start is not None and line[start:start + 2] == "--":
            names.extend(line[start:].split()[0].split(","))
    return names


@pytest.mark.parametrize("argv", _commands(), ids=lambda argv: " ".join(argv) or "sdcli")
def test_every_option_name_is_whole_at_80_columns(argv):
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("TERMINAL_WIDTH", None)
    run = subprocess.run([sys.executable, "-m", "sdcli", *argv, "--help"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert max(len(line) for line in run.stdout.splitlines()) <= 80
    names = _name_column(run.stdout)
    assert not [n for n in names if "…" in n]
    missing = _long_flags(argv) - set(names)
    assert not missing, f"not whole in the option column at 80 columns: {sorted(missing)}"
