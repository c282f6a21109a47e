"""Shared fixtures: tiny random-weight pipelines saved to temp folders, and no network, ever."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests must never reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("SDCLI_MODEL", None)
os.environ.pop("SDCLI_DEBUG", None)

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

pytest_plugins = ["serve.fixtures"]  # the serve tests' server (tests/serve/fixtures.py)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of tiny saved pipelines, one per family, built once per test session."""
    from sdcli.testing import FAMILIES, save_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    return {family: str(save_tiny_pipeline(root / family, family)) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_flow_models(tmp_path_factory):
    """Paths of tiny saved flow-matching pipelines: sd3, flux (guidance-distilled) and flux-schnell."""
    from sdcli.testing import FLOW_FAMILIES, save_tiny_pipeline

    root = tmp_path_factory.mktemp("flow-models")
    return {family: str(save_tiny_pipeline(root / family, family)) for family in FLOW_FAMILIES}


@pytest.fixture(scope="session")
def tiny_flux2_models(tmp_path_factory):
    """Paths of tiny saved FLUX.2 pipelines (flux2: dev; klein: base, CFG; klein-distilled) and FLUX.1 Kontext."""
    from sdcli.testing import FLUX2_KINDS, save_tiny_flux2_pipeline, save_tiny_kontext_pipeline

    root = tmp_path_factory.mktemp("flux2-models")
    models = {kind: str(save_tiny_flux2_pipeline(root / kind, kind)) for kind in FLUX2_KINDS}
    return {**models, "kontext": str(save_tiny_kontext_pipeline(root / "kontext"))}


@pytest.fixture(scope="session")
def tiny_sd(tiny_models):
    return tiny_models["sd1"]


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """Run the real CLI in-process through Typer's runner, in a temp working directory."""
    from typer.testing import CliRunner

    from sdcli.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args, **kwargs):
        return runner.invoke(app, [str(a) for a in args], **kwargs)

    return run


# Shared assertions and readers, imported by the tests as `from conftest import ...`.


def one_error_line(result, code: int | None = None) -> str:
    """The one line a failed command printed: non-zero exit (``code`` if given), no traceback, one stderr line."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def strict_json(text: str):
    """json.loads that refuses NaN/Infinity, as jq and JavaScript do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def pixels(path) -> "np.ndarray":
    """An image file's RGB pixels as int16, so differences of two images do not wrap around."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def png_header_only(path, width, height):
    """A valid PNG that declares width x height with almost no pixel data: a decompression bomb to open(),
    costing nothing unless someone decodes it."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def paths_of(result) -> list[Path]:
    """The paths a successful command printed on stdout, one a line."""
    assert result.exit_code == 0, result.stderr
    return [Path(line) for line in result.stdout.splitlines() if line.strip()]


# Captioned image folders for finetune (and anything that needs a few small pictures), made with PIL.

CAPTIONS = ("a red circle", "a blue square", "a green triangle", "a yellow star")
COLOURS = ((220, 40, 40), (40, 40, 220), (40, 200, 60), (230, 210, 40))


def write_images(folder: Path, n: int = 4, size=(16, 16), captions: str = "txt", suffix: str = ".png") -> list[Path]:
    """``n`` images with a shape drawn on a plain background; captions as .txt sidecars, 'jsonl', 'csv' or 'none'."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for i in range(n):
        img = Image.new("RGB", size, (245, 245, 245) if i % 2 else (20, 20, 20))
        w, h = size
        ImageDraw.Draw(img).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=COLOURS[i % 4])
        path = folder / f"img{i:02d}{suffix}"
        img.save(path)
        paths.append(path)
        caption = CAPTIONS[i % 4]
        if captions == "txt":
            path.with_suffix(".txt").write_text(caption)
        rows.append({"file_name": path.name, "text": caption})
    if captions == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif captions == "csv":
        (folder / "metadata.csv").write_text("file_name,text\n" + "".join(f"{r['file_name']},{r['text']}\n" for r in rows))
    return paths


@pytest.fixture
def make_images():
    return write_images


@pytest.fixture
def dataset(tmp_path):
    """A folder of four 16x16 captioned images (the tiny models' native size)."""
    return write_images(tmp_path / "data")[0].parent


@pytest.fixture
def make_config():
    return train_config


def train_config(data, out, model, **overrides):
    """A FinetuneConfig for a few quick steps on a tiny model."""
    from sdcli.training import FinetuneConfig

    settings = dict(data=data, out=out, model=model, max_steps=4, batch_size=2, checkpoint_every=0, quiet=True,
                    learning_rate=1e-3)
    settings.update(overrides)
    return FinetuneConfig(**settings)


# Pipeline classes neither a family file nor the generic family takes: diffusers ones that make no image from text
# (audio, video, image editing) and a user's own. Other diffusers text-to-image classes go to the generic family.
OTHER_PIPELINES = ["AudioLDMPipeline", "TextToVideoSDPipeline", "AudioLDM2Pipeline", "MyOwnPipeline"]


def as_other_pipeline(source, folder, class_name: str) -> Path:
    """A copy of a tiny pipeline folder, weights and all, whose model_index.json names ``class_name``."""
    import shutil

    folder = Path(folder)
    shutil.copytree(source, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": class_name}))
    return folder


@pytest.fixture
def no_pipeline_loads(monkeypatch):
    """Records (and fails) any attempt to load pipeline weights, so a test can show none was made."""
    import diffusers

    tried = []

    def refuse(*args, **kwargs):
        tried.append(args)
        raise RuntimeError("weights were loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    return tried
