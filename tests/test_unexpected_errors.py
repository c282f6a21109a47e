"""An error nobody anticipated, deep inside any command, still reaches the user as one line and exit 1.

Each command runs through `main()` (what the `sdcli` script calls) with one function deep in its
path replaced by one that raises; `SDCLI_DEBUG=1` lets the exception, and so its traceback, through.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# command -> (its arguments, the function that raises, what it raises)
CASES = {
    "schedulers": (["schedulers"], "sdcli.schedule.samplers.describe", RuntimeError("boom\nand a second line")),
    "inspect-schedule": (["inspect-schedule", "--preset", "cosine"], "sdcli.schedule.core.describe",
                         ZeroDivisionError("division by zero")),
    "generate": (["generate", "a red circle", "--model", "{model}", "--steps", "1", "--out", "out"],
                 "sdcli.generation.guidance.use_formula_guidance", KeyError("unet")),
    "finetune": (["finetune", "--data", "{data}", "--model", "{model}", "--out", "run", "--max-steps", "1",
                  "--batch-size", "2", "--checkpoint-every", "0"], "sdcli.training.objective.step_loss",
                 RuntimeError("boom")),
}


@pytest.fixture
def run_main(monkeypatch, tmp_path, capsys):
    """Run `main()` in-process on ``args`` in a temp folder; returns (exit code, stderr)."""
    from sdcli.cli import main

    monkeypatch.chdir(tmp_path)

    def run(args):
        monkeypatch.setattr(sys, "argv", ["sdcli", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main()
        return exit_.value.code, capsys.readouterr().err

    return run


def _inject(monkeypatch, name: str, exc: BaseException) -> list[int]:
    """Make ``name`` raise ``exc``; the returned list counts the calls, so a test knows the path reached it."""
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise exc

    monkeypatch.setattr(name, boom)
    return calls


def _args(command, tiny_sd, dataset):
    args, target, exc = CASES[command]
    return [a.format(model=tiny_sd, data=dataset) for a in args], target, exc


@pytest.fixture
def tiny_for(request):
    """The tiny model and dataset only for the commands that load them (the others stay fast)."""
    def get(command):
        if command in ("generate", "finetune"):
            return request.getfixturevalue("tiny_sd"), request.getfixturevalue("dataset")
        return "unused", "unused"
    return get


@pytest.mark.parametrize("command", list(CASES))
def test_an_unexpected_error_is_one_line_naming_its_type_and_command(command, run_main, monkeypatch, tiny_for):
    args, target, exc = _args(command, *tiny_for(command))
    calls = _inject(monkeypatch, target, exc)
    code, err = run_main(args)
    assert calls, f"{target} was never reached"
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1
    assert "Traceback" not in err
    assert lines[-1].startswith(f"error: unexpected {type(exc).__name__} in {command}: ")
    assert lines[-1].endswith("(set SDCLI_DEBUG=1 for the traceback)")
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    # Only the first line of a multi-line message.
    assert "second line" not in err


@pytest.mark.parametrize("command", list(CASES))
def test_with_sdcli_debug_the_exception_and_its_traceback_get_through(command, run_main, monkeypatch, tiny_for):
    import traceback

    args, target, exc = _args(command, *tiny_for(command))
    _inject(monkeypatch, target, exc)
    monkeypatch.setenv("SDCLI_DEBUG", "1")
    with pytest.raises(type(exc)) as raised:
        run_main(args)
    assert raised.value is exc
    assert "in boom" in "".join(traceback.format_exception(raised.value))


def test_with_sdcli_debug_an_eof_error_shows_its_traceback_not_a_bare_aborted(run_main, monkeypatch):
    _inject(monkeypatch, "sdcli.schedule.samplers.describe", EOFError("Ran out of input"))
    code, err = run_main(["schedulers"])
    assert (code, err.strip().splitlines()[-1]) == (1, "error: unexpected EOFError in schedulers: Ran out of input "
                                                       "(set SDCLI_DEBUG=1 for the traceback)")
    monkeypatch.setenv("SDCLI_DEBUG", "1")
    code, err = run_main(["schedulers"])
    assert code == 1 and "Traceback (most recent call last)" in err and "EOFError: Ran out of input" in err
    assert "Aborted" not in err


def test_ctrl_c_is_exit_130_in_one_line(run_main, monkeypatch):
    _inject(monkeypatch, "sdcli.schedule.samplers.describe", KeyboardInterrupt())
    code, err = run_main(["schedulers"])
    assert code == 130 and err.strip() == "error: interrupted"


def test_a_bad_command_line_is_still_typers_usage_error_exit_2(run_main):
    code, err = run_main(["generate", "a cat", "--steps", "many"])
    assert code == 2 and "Invalid value for '--steps'" in err and "Traceback" not in err
    code, err = run_main(["generate", "--no-such-option"])
    assert code == 2 and "No such option" in err and "unexpected" not in err


def test_a_known_foreign_error_keeps_its_friendly_wording(run_main, monkeypatch):
    _inject(monkeypatch, "sdcli.schedule.samplers.describe",
            FileNotFoundError(2, "No such file or directory", "x.json"))
    code, err = run_main(["schedulers"])
    assert (code, err.strip()) == (1, "error: No such file or directory: x.json")


def test_an_error_outside_any_command_is_one_line_too(run_main, monkeypatch):
    def broken(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'params'")

    monkeypatch.setattr("sdcli.cli.app", broken)
    code, err = run_main(["schedulers"])
    assert code == 1
    assert err.strip() == ("error: unexpected AttributeError in sdcli: 'NoneType' object has no attribute 'params' "
                           "(set SDCLI_DEBUG=1 for the traceback)")


# The real entry points, in a fresh interpreter: a sitecustomize on PYTHONPATH breaks `sdcli schedulers` first.

SITECUSTOMIZE = """
import sdcli.schedule.samplers

def describe():
    raise RuntimeError("boom")

sdcli.schedule.samplers.describe = describe
"""


def _entry_points():
    found = [pytest.param([sys.executable, "-m", "sdcli"], id="python-m-sdcli")]
    script = Path(sys.executable).parent / "sdcli"
    found.append(pytest.param([str(script)], id="sdcli-script", marks=pytest.mark.skipif(
        not script.is_file(), reason="no sdcli script beside this python")))
    return found


@pytest.mark.parametrize("entry", _entry_points())
@pytest.mark.parametrize("debug", [False, True])
def test_entry_points_print_one_line_or_with_debug_the_traceback(entry, debug, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    env.pop("SDCLI_DEBUG", None)
    if debug:
        env["SDCLI_DEBUG"] = "1"
    run = subprocess.run([*entry, "schedulers"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    if debug:
        assert "Traceback (most recent call last)" in run.stderr and run.stderr.rstrip().endswith("RuntimeError: boom")
    else:
        assert run.stderr.splitlines() == [
            "error: unexpected RuntimeError in schedulers: boom (set SDCLI_DEBUG=1 for the traceback)"]
