"""The CLI's promises that hold for every command: instant --help, one-line errors, version."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "matplotlib")


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["schedulers", "--help"],
                                  ["inspect-schedule", "--help"], ["finetune", "--help"],
                                  ["serve", "--help"]])
def test_help_imports_no_heavy_library(argv):
    code = (
        "import sys\n"
        "from sdcli.cli import app\n"
        f"try:\n    app({argv!r}, prog_name='sdcli')\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "Usage" in out
    assert "HEAVY []" in out


@pytest.mark.parametrize("command", ["generate", "finetune", "inspect-schedule", "schedulers", "serve"])
def test_help_shows_each_help_text_as_written_and_flags_as_flags(cli, command):
    # Typer reads help as rich markup: --prompt-syntax's `[red:blue:0.5] and [red|blue]` came out `and ,`; and a
    # flag had a `<bool>` type, as if it took a value.
    import re

    import typer.main

    from sdcli.cli import app

    result = cli(command, "--help", env={"COLUMNS": "2000", "TERMINAL_WIDTH": "2000"})
    assert result.exit_code == 0
    shown = " ".join(" ".join(line.strip("│ ").split()) for line in result.stdout.splitlines())
    params = typer.main.get_command(app).commands[command].params
    written = [part for p in params for part in re.findall(r"\[[^\]]*\]+", p.help or "")]
    assert all(part in shown for part in written), [part for part in written if part not in shown]
    assert "<bool>" not in result.stdout and any(getattr(p, "is_flag", False) for p in params)


def test_every_command_is_registered():
    # A command module left out of sdcli.commands.COMMANDS must fail here, not skip quietly above.
    from sdcli.cli import app

    assert sorted(c.name for c in app.registered_commands) == ["finetune", "generate", "inspect-schedule", "schedulers", "serve"]


def test_version_and_module_entry_point():
    from sdcli import __version__

    out = subprocess.run([sys.executable, "-m", "sdcli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"sdcli {__version__}"


def test_user_error_is_one_line_with_exit_code(cli):
    result = cli("generate", "x", "--model", "./no/such/model")
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: no such model file or folder: ./no/such/model"]
    assert result.stdout == ""


def test_debug_env_shows_traceback(tmp_path):
    env = {"SDCLI_DEBUG": "1", "PATH": "", "HF_HUB_OFFLINE": "1"}
    import os

    env = {**os.environ, **env}
    res = subprocess.run([sys.executable, "-m", "sdcli", "generate", "x", "--model", "./missing"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback" in res.stderr
