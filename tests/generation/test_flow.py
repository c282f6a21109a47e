"""generate on flow-matching models (SD3, Flux): the same images as plain diffusers, guidance kept honest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_error_line, paths_of, pixels


def diffusers_image(path, **kw):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=[torch.Generator("cpu").manual_seed(3)], **kw).images[0]
    return np.round(image * 255).astype(np.int16)


def sdcli_image(cli, path, tmp_path, *args, name="x.png"):
    result = cli("generate", "a red circle", "--model", path, "--steps", "2", "--seed", "3", "-W", "16", "-H", "16",
                 "--out", tmp_path / name, *args)
    return paths_of(result)[0]  # the image; a trajectory's strip and GIF follow it


def test_sd3_equals_plain_diffusers_with_classifier_free_guidance(cli, tiny_flow_models, tmp_path):
    out = sdcli_image(cli, tiny_flow_models["sd3"], tmp_path)
    record = json.loads(Image.open(out).info["sdcli"])
    assert record["model_family"] == "sd3" and record["prediction_type"] == "flow" and record["guidance"] == 7.5
    assert np.abs(pixels(out) - diffusers_image(tiny_flow_models["sd3"], guidance_scale=7.5)).max() <= 1
    # Guidance is real classifier-free guidance here: a different scale, a different image.
    other = sdcli_image(cli, tiny_flow_models["sd3"], tmp_path, "-g", "2", name="g2.png")
    assert np.abs(pixels(other) - pixels(out)).max() > 2


def test_flux_dev_uses_its_distilled_guidance_and_records_it(cli, tiny_flow_models, tmp_path):
    out = sdcli_image(cli, tiny_flow_models["flux"], tmp_path)
    record = json.loads(Image.open(out).info["sdcli"])
    assert record["distilled_guidance"] == 3.5 and record["guidance"] == 1 and record["true_cfg"] is False
    assert "Distilled CFG Scale: 3.5" in Image.open(out).info["parameters"]
    assert np.abs(pixels(out) - diffusers_image(tiny_flow_models["flux"], guidance_scale=3.5)).max() <= 1


def test_flux_true_cfg_is_diffusers_true_cfg_scale(cli, tiny_flow_models, tmp_path):
    out = sdcli_image(cli, tiny_flow_models["flux"], tmp_path, "--true-cfg", "-g", "4", "-n", "blurry")
    theirs = diffusers_image(tiny_flow_models["flux"], guidance_scale=3.5, true_cfg_scale=4.0, negative_prompt="blurry")
    assert np.abs(pixels(out) - theirs).max() <= 1
    assert json.loads(Image.open(out).info["sdcli"])["true_cfg"] is True


@pytest.mark.parametrize("family,args,expected", [
    ("flux", ["-g", "7"], "distilled into the model"),
    ("flux", ["--true-cfg"], "needs --guidance above 1"),
    ("flux-schnell", ["--distilled-guidance", "2"], "no guidance input"),
    ("flux-schnell", ["-g", "3", "--true-cfg"], "no guidance input"),
    ("sd3", ["--distilled-guidance", "2"], "no guidance input"),
    ("sd3", ["--true-cfg"], "classifier-free guidance already"),
])  # --guidance-rescale, which no flow model has: tests/families/test_families.py
def test_guidance_that_does_not_exist_on_a_model_is_refused(cli, tiny_flow_models, family, args, expected):
    result = cli("generate", "x", "--model", tiny_flow_models[family], "--steps", "1", "--out", "o", *args)
    assert expected in one_error_line(result, 2)


def test_flux_schnell_runs_without_guidance(cli, tiny_flow_models, tmp_path):
    out = sdcli_image(cli, tiny_flow_models["flux-schnell"], tmp_path)
    record = json.loads(Image.open(out).info["sdcli"])
    assert record["distilled_guidance"] is None and record["guidance"] == 1


def test_flow_trajectory_ends_on_the_image(tiny_flow_models):
    # x̂_0 = x_t − σ·v; Euler's last step goes to σ = 0 by the same v, so the last frame is the image itself.
    from sdcli.generation import Engine, Settings, plan

    for family in ("sd3", "flux"):
        s = Settings(prompts=["a red circle"], model=tiny_flow_models[family], steps=3, seeds=[1], width=16,
                     height=16, save_trajectory=True)
        p = plan(s, distributed=False)
        (item,) = Engine.load(s).images(s, p.jobs)
        frames = [np.asarray(f, np.int16) for f in item.trajectory]
        assert len(frames) == 3
        assert np.abs(frames[-1] - np.asarray(item.image, np.int16)).max() <= 1
        assert np.abs(frames[0] - frames[-1]).max() > 2  # earlier guesses differ: it is a trajectory


def test_flow_images_round_trip_and_img2img_runs(cli, tiny_flow_models, tmp_path):
    from test_settings import assert_round_trip

    for family, args in (("sd3", ["-g", "5"]), ("flux", ["--true-cfg", "-g", "3", "--distilled-guidance", "2"])):
        assert_round_trip(cli, sdcli_image(cli, tiny_flow_models[family], tmp_path, *args, name=f"{family}.png"),
                          tmp_path)
    init = tmp_path / "init.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(init)
    out = sdcli_image(cli, tiny_flow_models["sd3"], tmp_path, "--init-image", init, "--strength", "0.5", "--steps",
                      "4", name="i2i.png")
    assert json.loads(Image.open(out).info["sdcli"])["task"] == "img2img"


def test_a_lora_of_another_family_does_not_fit(cli, tiny_flow_models, tiny_sd, tmp_path):
    from sdcli.testing import save_random_lora

    lora = save_random_lora(tiny_sd, tmp_path / "sd1-lora")
    result = cli("generate", "x", "--model", tiny_flow_models["sd3"], "--steps", "1", "--lora", lora)
    assert "does not fit this model" in one_error_line(result)


@pytest.mark.parametrize("key,expected", [
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "StableDiffusion3Pipeline"),
    ("double_blocks.0.img_attn.qkv.weight", "FluxPipeline"),
    ("conditioner.embedders.1.model.ln_final.weight", "StableDiffusionXLPipeline"),
    ("model.diffusion_model.input_blocks.0.0.weight", "StableDiffusionPipeline"),
    # Chroma keeps Flux.1's blocks beside its own guidance network: Chroma's, not Flux's
    (("double_blocks.0.img_attn.qkv.weight", "distilled_guidance_layer.in_proj.weight"), "ChromaPipeline"),
])
def test_a_single_file_checkpoint_loads_as_its_family(tmp_path, key, expected):
    from safetensors.torch import save_file

    from sdcli.families import single_file_class as _single_file_class

    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(1) for k in ((key,) if isinstance(key, str) else key)}, str(path))
    assert _single_file_class(path).__name__ == expected
