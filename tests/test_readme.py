"""Every README code block that runs on the bundled model runs, as written.

A block's `sdcli` commands are taken up to the first one that names a `--model` (the rest may read what
that one wrote): those run on the model sdcli ships, or only read presets. Each such block runs command by command in one temp folder, so a
later command may read what an earlier one wrote; the few input pictures the README assumes the user has
(`photo.jpg`, the `corner.png` mask it describes) are made first. Blocks that need a real model
(`--model M`, a Hub id, a .safetensors file) or the network are left to the users who have them.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def commands(block: str, lang: str) -> list[str]:
    """The sdcli commands of one fenced block: continuation lines joined, prompts and comments dropped,
    console output lines skipped, `a && sdcli …` reduced to the sdcli part."""
    lines, out = block.replace("\\\n", " ").splitlines(), []
    for line in lines:
        if lang == "console":
            if not line.startswith("$ "):
                continue  # the command's printed output
            line = line[2:]
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for part in line.split("&&"):
            part = part.strip()
            if part.startswith("sdcli "):
                out.append(part)
    return out


def uses_bundled_model(command: str) -> bool:
    args = shlex.split(command, comments=True)
    return not any(a in ("--model", "-m") or a.startswith("--model=") for a in args)


def readme_blocks() -> list[tuple[int, list[str]]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        lang, body = match.group(1), match.group(2)
        if lang not in ("bash", "console", "sh", ""):
            continue
        cmds = []
        for command in commands(body, lang):
            if not uses_bundled_model(command):
                break  # what follows in the block may read what this command wrote
            cmds.append(command)
        if cmds:
            found.append((text[: match.start()].count("\n") + 1, cmds))
    return found


BLOCKS = readme_blocks()


def make_inputs(folder: Path) -> None:
    """The pictures the README's examples assume are there."""
    from PIL import Image, ImageDraw

    photo = Image.new("RGB", (96, 64), (90, 140, 200))
    ImageDraw.Draw(photo).ellipse((20, 10, 70, 60), fill=(230, 200, 40))
    photo.save(folder / "photo.jpg")
    photo.save(folder / "photo.png")
    corner = Image.new("L", (64, 64), 0)  # "64x64, black, with the bottom-right quarter white"
    corner.paste(255, (32, 32, 64, 64))
    corner.save(folder / "corner.png")


def test_the_readme_has_bundled_model_examples():
    """The README's first example and its prompt-weights example are among the blocks run below."""
    flat = [c for _, cmds in BLOCKS for c in cmds]
    assert any(c.startswith("sdcli generate") and "--guidance 7.5" in c for c in flat), flat
    assert any("(red:1.4)" in c for c in flat), flat
    assert len(BLOCKS) >= 6, BLOCKS


@pytest.mark.slow
@pytest.mark.parametrize("line,cmds", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(cli, tmp_path, line, cmds):
    make_inputs(tmp_path)
    for command in cmds:
        args = shlex.split(command, comments=True)
        pipe = "|" in args
        if pipe:  # `… --format json -q | jq …`: run the sdcli part and check it printed JSON
            args = args[: args.index("|")]
        result = cli(*args[1:])
        assert result.exit_code == 0, f"README.md:{line}: {command}\n{result.stderr}"
        assert "NaN" not in result.stderr, result.stderr
        if pipe:
            json.loads(result.stdout)
        for written in result.stdout.split():  # paths, one a line, or `plot: schedules.png`
            path = Path(written)
            if not path.is_absolute():
                path = tmp_path / path
            if path.suffix == ".png":
                assert path.exists(), f"README.md:{line}: {command} printed {written} but wrote nothing there"


def python_blocks() -> list[tuple[int, str]]:
    """The README's Python blocks that run on the bundled model."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(text[: m.start()].count("\n") + 1, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1) == "python" and 'load("bundled:shapes"' in m.group(2)]


@pytest.mark.parametrize("line,code", python_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
    # What the example says it makes, it made: the saved images, and the second request's steps.
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["circle-1.png", "circle-2.png"]
    assert capsys.readouterr().out.count("step ") == 10
    assert namespace["made"][0].image.size == (96, 64)
