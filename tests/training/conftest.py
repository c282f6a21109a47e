"""Helpers for the finetune tests: small captioned image folders made with PIL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
