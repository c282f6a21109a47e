"""`generate --lora` with pickled weights (.bin): refused before loading anything unless --allow-pickle, as weights are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def loras(tiny_sd, tmp_path_factory):
    """One random LoRA three ways: the safetensors folder, the same tensors pickled in one .bin file,
    and a folder holding only that .bin under diffusers' default name."""
    import safetensors.torch
    import torch

    from sdcli.testing import save_random_lora

    root = tmp_path_factory.mktemp("loras")
    safe = save_random_lora(tiny_sd, root / "safe")
    tensors = safetensors.torch.load_file(safe / "pytorch_lora_weights.safetensors")
    torch.save(tensors, root / "lora.bin")
    (root / "bin-folder").mkdir()
    torch.save(tensors, root / "bin-folder" / "pytorch_lora_weights.bin")
    return {"safe": safe, "file": root / "lora.bin", "folder": root / "bin-folder"}


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_pickled_lora_is_refused_before_the_model_loads(cli, tiny_sd, loras, kind):
    result = cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--out", "o", "--lora", loras[kind])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1, result.stderr
    # One line, and nothing before it: the model was never loaded ("loaded ... in 0.4s" is not there).
    assert lines == [f"error: --lora {loras[kind]} holds pickled weights, which can run code when loaded; "
                     "convert it to .safetensors or pass --allow-pickle if you trust it"]
    assert not Path("o").exists()


def test_with_allow_pickle_a_pickled_lora_loads_and_acts_as_its_safetensors_twin(cli, tiny_sd, loras, tmp_path):
    def image(*extra):
        result = cli("generate", "x", "--model", tiny_sd, "--steps", "2", "--seed", "5", "--out", tmp_path, "-q",
                     *extra)
        assert result.exit_code == 0, result.stderr
        return np.asarray(Image.open(result.stdout.split()[-1]), np.int16)

    base = image()
    safe = image("--lora", loras["safe"])
    assert np.abs(base - safe).max() > 2  # the LoRA does something, so equal images below mean it loaded
    for kind in ("file", "folder"):
        assert np.abs(image("--lora", loras[kind], "--allow-pickle") - safe).max() <= 1, kind
