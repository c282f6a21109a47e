"""`finetune`'s CUDA path, run only where a GPU is (`python -m pytest -m gpu -q`); CI has none."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sdcli.training import finetune

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_defaults_are_fp16_and_channels_last_and_compile_works(tiny_sd, dataset, tmp_path, make_config):
    result = finetune(make_config(dataset, tmp_path / "out", tiny_sd, max_steps=3, compile=True))
    record = json.loads((tmp_path / "out" / "training_settings.json").read_text())["config"]
    assert record["mixed_precision"] == "fp16" and record["channels_last"] is True and record["compile"] is True
    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.weights.is_file()
