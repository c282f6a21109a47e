"""The model sdcli ships in sdcli/models/shapes (issue 5): loads, fits the size budget, and draws what it is told.

Skipped where the bundled model is absent (model_index.json missing), e.g. a checkout that has not built it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdcli.defaults import BUNDLED_MODEL

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(
    not (BUNDLED_MODEL / "model_index.json").is_file(), reason="no bundled model in sdcli/models/shapes"
)

SIZE_LIMIT_MB = 20.0
PROMPT = "a large red circle in the top left corner on a black background"
# A prompt as people type it, naming only colour and shape. A triangle, not a circle: a model that draws round
# blobs whatever it is asked gets circles right by accident.
PARTIAL_PROMPT = "a green triangle"
# A short prompt that names the background: the model before partial-caption training got it right about half
# the time; and a star, the shape it draws worst.
BACKGROUND_PROMPT = "a blue star on a white background"
SEEDS = (1, 2, 3, 4, 5)
# Measured on the shipped model at guidance 7.5 with these seeds: every attribute 5 of 5 on all three prompts
# (over the guidance tables' images at 7.5: colour 100 %, shape 98 %, position 100 % on full captions; colour
# 100 %, shape 97.6 %, background 100 % on partial prompts). 4 of 5 is a real check (a random or washed-out model
# fails it) that a correct model clears without flaking.
MIN_RIGHT = 4


def test_bundled_model_loads_with_diffusers():
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(BUNDLED_MODEL), torch_dtype=torch.float32)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


def test_bundled_model_is_safetensors_only_and_within_the_size_budget():
    files = [p for p in BUNDLED_MODEL.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert len(weights) == 3  # unet, text_encoder, vae
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".ckpt", ".pth"}]
    assert not [p for p in files if "checkpoint" in p.as_posix() or "optimizer" in p.name]
    total_mb = sum(p.stat().st_size for p in weights) / 1e6
    assert total_mb <= SIZE_LIMIT_MB, f"{total_mb:.2f} MB of safetensors"
    # diffusers records where a model was loaded from; the shipped configs must not carry a build machine's paths.
    for config in [p for p in files if p.suffix == ".json"]:
        assert "_name_or_path" not in config.read_text(), config


@pytest.mark.parametrize(("prompt", "checked"), [(PROMPT, ("color", "shape", "position")),
                                                 (PARTIAL_PROMPT, ("color", "shape")),
                                                 (BACKGROUND_PROMPT, ("color", "shape", "background"))])
def test_generate_without_model_uses_the_bundled_model_and_follows_the_prompt(tmp_path, prompt, checked):
    from examples.shapes import evaluate
    from PIL import Image

    env = {k: v for k, v in os.environ.items() if k != "SDCLI_MODEL"}
    env.setdefault("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "sdcli", "generate", prompt, "--seed", ",".join(map(str, SEEDS)),
         "--guidance", "7.5", "--steps", "25", "--batch-size", str(len(SEEDS)), "--out", str(out), "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    paths = sorted(out.rglob("*.png"))
    assert len(paths) == len(SEEDS)
    want = evaluate.parse_prompt(prompt)
    got = [evaluate.analyse(Image.open(p).convert("RGB")) for p in paths]
    for attr in checked:
        right = sum(g[attr] == want[attr] for g in got)
        assert right >= MIN_RIGHT, (attr, [g[attr] for g in got])
