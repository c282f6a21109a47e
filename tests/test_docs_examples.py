"""Every command block of the README and of docs/*.md runs, so no example goes stale.

A block (```bash, ```console, ```shell or a bare fence) runs command by command in one temp folder, so a later
command may read what an earlier one wrote; the inputs the docs assume the user has (`photo.jpg`, the
`corner.png` mask, `prompts.txt`, folders of captioned photos) are made first, and a ```toml block whose first
line names its file (`# lora.toml: sdcli finetune --config lora.toml`) is written and run. Only the `sdcli`
part of a line runs (`pip install … && sdcli …`, `… | jq …`).

What changes, so that a block runs offline and fast, without changing what it shows:
- a model the block names (`--model M`, a Hub id, a .safetensors file) becomes the tiny random pipeline of its
  family (MODELS; `python examples/make_tiny_pipeline.py M` is how the docs tell a reader to do the same), and a
  Hub ControlNet a tiny one;
- a command without `--steps` runs 3 steps; finetune runs 2 steps (`--max-steps 2`), makes at most 2 class
  images, and at the tiny model's own resolution.

Console blocks are checked against what they show: every output line (one with "…" is abbreviated and left
out) must be a line the command printed, and an `error: …` line must be the one line a refused command printed.

Left out, each for the reason SKIP gives: what needs CUDA (nf4, `--cpu-offload`), a real model's file (a GGUF
of FLUX.1-dev, an embedding file), a server that runs until stopped (`sdcli serve`; tests/commands/test_serve.py
drives it). Lines that are not sdcli commands are not run: `pip install`, `tensorboard`, multi-process launches
(`accelerate launch`, `torchrun`: tests/commands/test_generate_multiprocess.py and the training tests start
them), and the bundled model's 87-minute recipe (docs/shapes-recipe.md includes examples/shapes/README.md).
docs/cli.md is `--help` itself (tests/test_docs.py).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import one_error_line

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_EXAMPLES = {"cli.md", "shapes-recipe.md"}

# A model a block names -> the tiny pipeline family standing in for it.
MODELS = {
    "M": "sd1", "./my-model": "sd1", "./models/sd15.safetensors": "sd1", "./models/anything-v5.safetensors": "sd1",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd1", "stabilityai/stable-diffusion-2-1-base": "sd2",
    "stabilityai/stable-diffusion-3.5-medium": "sd3", "black-forest-labs/FLUX.1-dev": "flux",
    "./FLUX.1-dev": "flux", "black-forest-labs/FLUX.1-schnell": "flux-schnell",
    "black-forest-labs/FLUX.2-dev": "flux2", "Tongyi-MAI/Z-Image-Turbo": "zimage-turbo",
}
CONTROLNETS = {"lllyasviel/control_v11p_sd15_canny": "sd1"}
# A part of a command -> why that command cannot run here.
SKIP = {
    "--quantize nf4": "bitsandbytes' nf4 needs CUDA",
    "--cpu-offload": "CUDA only (refused elsewhere, as the docs say)",
    "flux1-dev-Q4_K_S.gguf": "a GGUF file of the real FLUX.1-dev (tests/test_quantize.py makes tiny ones)",
    "z_image_turbo_bf16.safetensors": "a real Z-Image transformer file (tests/test_denoiser_file.py writes tiny ones)",
    "flux2_dev_fp8mixed.safetensors": "a real FLUX.2 transformer file (tests/test_denoiser_file.py writes tiny ones)",
    "EasyNegative.safetensors": "an embedding file of the user's (tests/generation/test_embeddings.py makes some)",
    "sdcli serve": "serves until stopped (tests/commands/test_serve.py drives it)",
    "Tongyi-MAI/Z-Image-Turbo": "trains at Z-Image's own 1024 px, minutes on the CPU even for a tiny model "
                                "(tests/training/test_finetune_new_families.py trains one small)",
}
RUN_LANGS = ("bash", "console", "sh", "shell", "")


@dataclass
class Step:
    command: str
    shown: list[str] = field(default_factory=list)  # the output a console block shows under the command


@dataclass
class Block:
    where: str
    steps: list[Step]
    files: dict[str, str] = field(default_factory=dict)  # a toml block: its file name and text
    skipped: str | None = None


def sdcli_part(line: str) -> str | None:
    for part in line.split("&&"):
        part = part.strip()
        if part.startswith("sdcli "):
            return part
    return None


def steps_of(body: str, lang: str) -> list[Step]:
    steps: list[Step] = []
    for line in body.replace("\\\n", " ").splitlines():
        if lang == "console" and not line.startswith("$ "):
            if steps and line.strip():
                steps[-1].shown.append(line)
            continue
        line = line[2:] if lang == "console" else line
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        command = sdcli_part(line)
        if command:
            steps.append(Step(command))
        elif lang == "console":
            steps.append(Step(""))  # a console command that is not sdcli's: its output is not checked
    return [s for s in steps if s.command]


def blocks_of(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        lang, body = match.group(1), match.group(2)
        where = f"{path.relative_to(ROOT)}:{text[: match.start()].count(chr(10)) + 1}"
        if lang == "toml":
            named = re.match(r"# (\S+\.toml): (sdcli .*)", body)
            if named:
                found.append(Block(where, [Step(named.group(2))], {named.group(1): body}))
            continue
        if lang in RUN_LANGS:
            steps = steps_of(body, lang)
            if steps:
                found.append(Block(where, steps))
    return found


def all_blocks() -> list[Block]:
    files = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in NOT_EXAMPLES)
    blocks, seen = [], set()
    for path in files:
        for block in blocks_of(path):
            key = (tuple(s.command for s in block.steps), tuple(block.files.items()))
            if key in seen:  # the README repeats a page's example: run it once
                continue
            seen.add(key)
            # A command that cannot run here is left out; the docs' blocks keep such commands independent.
            kept = [s for s in block.steps if not any(part in s.command for part in SKIP)]
            block.skipped = "; ".join(f"{s.command[:60]}…: {why}" for s in block.steps for part, why in SKIP.items()
                                      if part in s.command) or None
            block.steps = kept
            blocks.append(block)
    return blocks


BLOCKS = all_blocks()
RUNNABLE = [b for b in BLOCKS if b.steps]


def test_the_docs_examples_are_found():
    """The parser sees the examples it must: the README's first example, a page's, a config file, a refusal."""
    flat = [s.command for b in BLOCKS for s in b.steps]
    assert any(c.startswith("sdcli generate") and "--guidance 1,3,7.5,12" in c for c in flat), flat
    assert any("(red:1.4)" in c for c in flat), flat
    assert any(b.files for b in RUNNABLE)
    assert any(line.startswith("error: ") for b in RUNNABLE for s in b.steps for line in s.shown)
    assert sum(len(b.steps) for b in RUNNABLE) >= 40, len(flat)
    # Every model a runnable command names stands for a tiny pipeline: a new example must say what it needs.
    for block in RUNNABLE:
        for step in block.steps:
            args = shlex.split(step.command, comments=True)
            for flag in ("--model", "-m"):
                if flag in args and "./no-such-model" not in args:
                    assert args[args.index(flag) + 1] in MODELS, f"{block.where}: add its model to MODELS or SKIP"


def make_inputs(folder: Path) -> None:
    """The pictures, prompt file and captioned folders the docs' examples assume are there."""
    from PIL import Image, ImageDraw

    from conftest import write_images

    photo = Image.new("RGB", (96, 64), (90, 140, 200))
    ImageDraw.Draw(photo).ellipse((20, 10, 70, 60), fill=(230, 200, 40))
    for name in ("photo.jpg", "photo.png", "cabin-photo.jpg"):
        photo.save(folder / name)
    corner = Image.new("L", (64, 64), 0)  # "64x64, black, with the bottom-right quarter white"
    corner.paste(255, (32, 32, 64, 64))
    corner.save(folder / "corner.png")
    (folder / "prompts.txt").write_text("a red circle\na blue square\n")
    for data in ("photos", "dog/photos", "dog/closeups", "sks-dog"):
        write_images(folder / data, 4)
    (folder / "faces-masks").mkdir()
    for path in write_images(folder / "faces", 2):  # .txt captions, and the .caption ones masked.toml reads
        path.with_suffix(".caption").write_text("a face")
        Image.new("L", (16, 16), 255).save(folder / "faces-masks" / path.name)


@pytest.fixture(scope="session")
def stand_ins(tiny_models, tiny_flow_models, tiny_flux2_models, tmp_path_factory):
    """The tiny pipelines standing in for the models the docs name, and a tiny ControlNet."""
    from sdcli.testing import save_tiny_controlnet, save_tiny_new_flow_pipeline

    zimage = str(save_tiny_new_flow_pipeline(tmp_path_factory.mktemp("zimage") / "zimage-turbo", "zimage-turbo"))
    models = {**tiny_models, **tiny_flow_models, "flux2": tiny_flux2_models["flux2"], "zimage-turbo": zimage}
    controlnets = {"sd1": str(save_tiny_controlnet(tmp_path_factory.mktemp("controlnet") / "sd1", "sd1"))}
    return models, controlnets


def runnable_args(command: str, models: dict, controlnets: dict) -> list[str]:
    args = shlex.split(command, comments=True)
    if "|" in args:
        args = args[: args.index("|")]
    for i, arg in enumerate(args[:-1]):
        if arg in ("--model", "-m") and args[i + 1] in MODELS:
            args[i + 1] = models[MODELS[args[i + 1]]]
        if arg == "--controlnet" and args[i + 1] in CONTROLNETS:
            args[i + 1] = controlnets[CONTROLNETS[args[i + 1]]]
    if args[1] == "generate" and "--steps" not in args and "--from-metadata" not in args:
        args += ["--steps", "3"]
    if args[1] == "finetune":
        for flag in ("--resolution",):
            if flag in args:
                del args[args.index(flag): args.index(flag) + 2]
        if "--num-class-images" in args:
            args[args.index("--num-class-images") + 1] = "2"
        args += ["--max-steps", "2"]
    return args[1:]


def words(line: str) -> str:
    return " ".join(line.split())


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_docs_block_runs(cli, tmp_path, stand_ins, block):
    models, controlnets = stand_ins
    make_inputs(tmp_path)
    for name, text in block.files.items():  # a config file: its model is a stand-in too
        text = re.sub(r'^model = "(.*)"$', lambda m: f'model = "{models[MODELS[m.group(1)]]}"', text, flags=re.M)
        (tmp_path / name).write_text(re.sub(r"^num_class_images = \d+", "num_class_images = 2", text, flags=re.M))
    for step in block.steps:
        result = cli(*runnable_args(step.command, models, controlnets))
        context = f"{block.where}: {step.command}\n{result.stderr}"
        errors = [line for line in step.shown if line.startswith("error: ")]
        if errors:  # a refusal the page shows: exactly that one line
            assert one_error_line(result) == errors[0], context
            continue
        assert result.exit_code == 0, context
        assert "NaN" not in result.stderr, context
        if "| jq" in step.command:
            json.loads(result.stdout)
            if shutil.which("jq"):
                filt = shlex.split(step.command.split("| jq", 1)[1])
                got = subprocess.run(["jq", *filt], input=result.stdout, capture_output=True, text=True).stdout
                assert [words(x) for x in got.splitlines()] == [words(x) for x in step.shown], context
            continue
        printed = {words(line) for line in (result.stdout + "\n" + result.stderr).splitlines()}
        for line in step.shown:
            if line.strip() and "…" not in line:
                assert words(line) in printed, f"{context}\nthe page shows a line it did not print: {line}"
        for written in result.stdout.split():  # paths, one a line, or `plot: schedules.png`
            path = Path(written) if Path(written).is_absolute() else tmp_path / written
            if path.suffix == ".png":
                assert path.exists(), f"{context}: printed {written} but wrote nothing there"


def python_blocks() -> list[tuple[str, str]]:
    """The Python blocks that run on the bundled model."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        found += [(f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}", m.group(2))
                  for m in FENCE.finditer(text) if m.group(1) == "python" and 'load("bundled:shapes"' in m.group(2)]
    return found


@pytest.mark.parametrize("where,code", python_blocks(), ids=[w for w, _ in python_blocks()])
def test_docs_python_block_runs(where, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, where, "exec"), namespace)
    # What the example says it makes, it made: the saved images, and the second request's steps.
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["circle-1.png", "circle-2.png"]
    assert capsys.readouterr().out.count("step ") == 10
    assert namespace["made"][0].image.size == (96, 64)


def test_the_skipped_blocks_say_why():
    skipped = [b for b in BLOCKS if b.skipped]
    assert skipped and all(": " in b.skipped for b in skipped)
