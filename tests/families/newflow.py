"""Fixtures of the Chroma, Z-Image and Qwen-Image tests (imported by their modules): their tiny pipelines, and the
same request made to plain diffusers; a LoRA in the layouts people share them in for ComfyUI."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def new_flow_model(tmp_path_factory):
    """``new_flow_model(name)``: the folder of a tiny ``name`` pipeline (`sdcli.testing.NEW_FLOW_FAMILIES`), saved
    the first time a test asks for it."""
    from sdcli.testing import save_tiny_new_flow_pipeline

    root, saved = tmp_path_factory.mktemp("new-flow"), {}

    def get(name: str) -> str:
        if name not in saved:
            saved[name] = str(save_tiny_new_flow_pipeline(root / name, name))
        return saved[name]

    return get


@pytest.fixture(scope="session")
def plain_diffusers():
    """``plain_diffusers(folder, cls=None, lora=None, **call)``: the image plain diffusers makes for "a red circle"
    in 2 steps from seed 3 (as `generate` below asks), as 0..255 integers; ``cls`` another task's class name."""
    import diffusers
    import torch

    def run(folder, cls=None, lora=None, **call):
        pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
        if cls:
            pipe = getattr(diffusers, cls).from_pipe(pipe)
        if lora:
            pipe.load_lora_weights(lora)
        pipe.set_progress_bar_config(disable=True)
        image = pipe(prompt="a red circle", num_inference_steps=2, output_type="np",
                     generator=[torch.Generator("cpu").manual_seed(3)], **call).images[0]
        return np.round(image * 255).astype(np.int16)

    return run


@pytest.fixture
def generate(cli, tmp_path):
    """``generate(model, *args)``: sdcli's image for "a red circle" in 2 steps from seed 3, and the CLI result."""

    def run(model, *args, name="x.png"):
        result = cli("generate", "a red circle", "--model", model, "--steps", "2", "--seed", "3", "--out",
                     tmp_path / name, *args)
        return result

    return run


def comfyui_lora(lora, layout: str, folder):
    """The diffusers-format LoRA folder ``lora`` (peft's names under ``transformer.``, scale 1) as Z-Image and
    Qwen-Image LoRAs are shared for ComfyUI: diffusers' module paths under ``diffusion_model.``, peft's
    ``lora_A``/``lora_B`` (layout "comfyui") or kohya's ``lora_down``/``lora_up`` ("comfyui-kohya"), and an
    ``.alpha`` per module: 4·rank, with the up half quartered, so only a loader that reads alpha gives the same
    image."""
    import torch
    from safetensors.torch import load_file, save_file

    names = {"lora_A": "lora_A", "lora_B": "lora_B"} if layout == "comfyui" else {"lora_A": "lora_down",
                                                                                   "lora_B": "lora_up"}
    out = {}
    for key, tensor in load_file(str(lora / "pytorch_lora_weights.safetensors")).items():
        module, half, _ = key.rsplit(".", 2)
        stem = "diffusion_model." + module.removeprefix("transformer.")
        if half == "lora_B":
            tensor = tensor / 4
        else:
            out[f"{stem}.alpha"] = torch.tensor(4.0 * tensor.shape[0])
        out[f"{stem}.{names[half]}.weight"] = tensor
    save_file(out, str(folder / f"{layout}.safetensors"))
    return folder / f"{layout}.safetensors"
