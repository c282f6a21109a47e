"""Every default in one place, so commands, docs and tests agree."""

from __future__ import annotations

import os
from pathlib import Path

MODEL_ENV = "SDCLI_MODEL"
# The bundled model lives inside the package once it exists; until then the
# user must name one with --model or SDCLI_MODEL.
BUNDLED_MODEL = Path(__file__).parent / "models" / "shapes"
BUNDLED_NAME = "bundled:shapes"  # what records and --model call it, wherever sdcli is installed

STEPS = 25
GUIDANCE = 7.5
DISTILLED_GUIDANCE = 3.5  # Flux-dev's own default (diffusers' FluxPipeline guidance_scale)
NEGATIVE_PROMPT = ""
NULL_PROMPT = ""  # what the unconditional branch of guidance sees; finetune drops captions to this
OUT_DIR = Path("outputs")
UNCOND_PROB = 0.1
COMPILE_MODE = "reduce-overhead"  # --compile on CUDA: with CUDA graphs, 2.9-5.3x eager on an H100 (docs/benchmarks.md)


def default_model() -> str | None:
    """The model used when --model is not given: $SDCLI_MODEL, else the bundled one if installed."""
    env = os.environ.get(MODEL_ENV, "").strip()
    if env:
        return env
    if (BUNDLED_MODEL / "model_index.json").is_file():
        return str(BUNDLED_MODEL)
    return None
