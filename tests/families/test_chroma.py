"""Chroma: its own family file (recognition, guidance as ChromaPipeline's guidance_scale, Flux-packed latents,
img2img through ChromaImg2ImgPipeline), equal to plain diffusers on a tiny random Chroma."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line, paths_of, pixels
from newflow import generate, new_flow_model, plain_diffusers  # noqa: F401 - fixtures

SIZE = ["-W", "32", "-H", "32"]


@pytest.fixture(scope="module")
def chroma(new_flow_model):
    return new_flow_model("chroma")


@pytest.mark.parametrize("args,theirs", [
    ([], {"guidance_scale": 3.0}),  # diffusers' Chroma1-HD example: guidance 3
    (["-g", "4", "-n", "blurry"], {"guidance_scale": 4.0, "negative_prompt": "blurry"}),
    (["-g", "1"], {"guidance_scale": 1.0}),  # unguided: one pass a step
])
def test_chroma_generates_as_plain_diffusers_and_replays(generate, chroma, plain_diffusers, tmp_path, args, theirs):
    (out,) = paths_of(generate(chroma, *SIZE, *args))
    assert np.abs(pixels(out) - plain_diffusers(chroma, width=32, height=32, **theirs)).max() <= 1
    record = json.loads(Image.open(out).info["sdcli"])
    assert record["model_family"] == "chroma" and record["guidance"] == theirs["guidance_scale"]
    (again,) = paths_of(generate(chroma, "--from-metadata", out, name="again.png"))
    assert np.array_equal(pixels(again), pixels(out))


def test_chroma_img2img_is_diffusers_chroma_img2img(generate, chroma, plain_diffusers, tmp_path):
    start = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    start.save(tmp_path / "start.png")
    (out,) = paths_of(generate(chroma, "--init-image", tmp_path / "start.png", "--strength", "0.6"))
    theirs = plain_diffusers(chroma, "ChromaImg2ImgPipeline", image=start, strength=0.6, guidance_scale=3.0,
                             width=32, height=32)
    assert np.abs(pixels(out) - theirs).max() <= 1


def test_a_chroma_lora_loads_as_diffusers_loads_it(generate, chroma, plain_diffusers, tmp_path):
    from sdcli.testing import save_random_transformer_lora

    lora = save_random_transformer_lora(chroma, tmp_path / "lora")
    (out,) = paths_of(generate(chroma, *SIZE, "--lora", lora))
    theirs = plain_diffusers(chroma, lora=str(lora), guidance_scale=3.0, width=32, height=32)
    assert np.abs(pixels(out) - theirs).max() <= 1
    assert np.abs(pixels(out) - plain_diffusers(chroma, guidance_scale=3.0, width=32, height=32)).max() > 2


def test_chroma_trajectory_ends_at_its_image(chroma):
    from sdcli import api as sdcli

    (made,) = sdcli.load(chroma).generate("a red circle", seeds=[3], steps=2, width=32, height=32,
                                          save_trajectory=True)
    assert len(made.trajectory) == 2
    # Euler's last step lands on its x̂0 (σ = 0): unpacked and decoded right, the last frame is the image.
    assert np.abs(np.asarray(made.trajectory[-1], np.int16) - np.asarray(made.image, np.int16)).max() <= 1


@pytest.mark.parametrize("args,flag", [
    (["--true-cfg", "-g", "3"], "--true-cfg"),
    (["--distilled-guidance", "2"], "--distilled-guidance"),
    (["-g", "1", "-n", "blurry"], "--negative-prompt"),
    (["-W", "36"], "--width"),  # not a multiple of the VAE's factor times the 2x2 packing (nor of 8)
    (["--reference-image", "ref.png"], "--reference-image"),
    (["--guidance-rescale", "0.5"], "--guidance-rescale"),
    (["--scheduler", "euler"], "--scheduler"),
])
def test_what_chroma_lacks_is_refused_before_loading(generate, chroma, no_pipeline_loads, tmp_path, args, flag):
    Image.new("RGB", (32, 32)).save(tmp_path / "ref.png")
    line = one_error_line(generate(chroma, *args), 2)
    assert flag in line and not no_pipeline_loads
