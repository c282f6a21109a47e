"""Z-Image and Z-Image-Turbo: their own family file (guidance as ZImagePipeline's guidance_scale, unguided at 0;
Turbo, told by its scheduler's shift, without guidance), equal to plain diffusers on a tiny random Z-Image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line, paths_of, pixels
from newflow import comfyui_lora, generate, new_flow_model, plain_diffusers  # noqa: F401 - fixtures

SIZE = ["-W", "32", "-H", "32"]


@pytest.mark.parametrize("model,args,theirs", [
    ("zimage", [], {"guidance_scale": 4.0}),  # the model card's 4
    ("zimage", ["-g", "2", "-n", "blurry"], {"guidance_scale": 2.0, "negative_prompt": "blurry"}),
    ("zimage", ["-g", "0"], {"guidance_scale": 0.0}),  # unguided, as Z-Image defines it
    ("zimage-turbo", [], {"guidance_scale": 0.0}),  # step-distilled: no guidance
])
def test_zimage_generates_as_plain_diffusers_and_replays(generate, new_flow_model, plain_diffusers, model, args,
                                                         theirs):
    folder = new_flow_model(model)
    (out,) = paths_of(generate(folder, *SIZE, *args))
    assert np.abs(pixels(out) - plain_diffusers(folder, width=32, height=32, **theirs)).max() <= 1
    record = json.loads(Image.open(out).info["sdcli"])
    assert record["model_family"] == "zimage"
    assert record["guidance"] == (1.0 if model == "zimage-turbo" else theirs["guidance_scale"])
    (again,) = paths_of(generate(folder, "--from-metadata", out, name="again.png"))
    assert np.array_equal(pixels(again), pixels(out))


def test_zimage_img2img_is_diffusers_zimage_img2img(generate, new_flow_model, plain_diffusers, tmp_path):
    folder = new_flow_model("zimage")
    start = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    start.save(tmp_path / "start.png")
    (out,) = paths_of(generate(folder, "--init-image", tmp_path / "start.png", "--strength", "0.6"))
    theirs = plain_diffusers(folder, "ZImageImg2ImgPipeline", image=start, strength=0.6, guidance_scale=4.0,
                             width=32, height=32)
    assert np.abs(pixels(out) - theirs).max() <= 1


@pytest.mark.parametrize("layout", ["diffusers", "comfyui", "comfyui-kohya"])
def test_a_zimage_lora_loads_as_diffusers_loads_it(generate, new_flow_model, plain_diffusers, tmp_path, layout):
    from sdcli.testing import save_random_transformer_lora

    folder = new_flow_model("zimage")
    lora = save_random_transformer_lora(folder, tmp_path / "lora", targets=("to_q", "to_k", "to_v"))
    shared = lora if layout == "diffusers" else comfyui_lora(lora, layout, tmp_path)
    (out,) = paths_of(generate(folder, *SIZE, "--lora", shared))
    theirs = plain_diffusers(folder, lora=str(lora), guidance_scale=4.0, width=32, height=32)
    assert np.abs(pixels(out) - theirs).max() <= 1
    assert np.abs(pixels(out) - plain_diffusers(folder, guidance_scale=4.0, width=32, height=32)).max() > 2


def test_zimage_trajectory_ends_at_its_image(new_flow_model):
    from sdcli import api as sdcli

    (made,) = sdcli.load(new_flow_model("zimage")).generate("a red circle", seeds=[3], steps=2, width=32, height=32,
                                                             save_trajectory=True)
    assert len(made.trajectory) == 2
    assert np.abs(np.asarray(made.trajectory[-1], np.int16) - np.asarray(made.image, np.int16)).max() <= 1


@pytest.mark.parametrize("model,args,flag", [
    ("zimage-turbo", ["-g", "3"], "guidance"),
    ("zimage-turbo", ["-n", "blurry"], "--negative-prompt"),
    ("zimage", ["-g", "0", "-n", "blurry"], "--negative-prompt"),
    ("zimage", ["--true-cfg", "-g", "3"], "--true-cfg"),
    ("zimage", ["--distilled-guidance", "2"], "--distilled-guidance"),
    ("zimage", ["--reference-image", "ref.png"], "--reference-image"),
    ("zimage", ["--clip-skip", "2"], "--clip-skip"),
])
def test_what_zimage_lacks_is_refused_before_loading(generate, new_flow_model, no_pipeline_loads, tmp_path, model,
                                                     args, flag):
    Image.new("RGB", (32, 32)).save(tmp_path / "ref.png")
    line = one_error_line(generate(new_flow_model(model), *SIZE, *args), 2)
    assert flag in line and not no_pipeline_loads
