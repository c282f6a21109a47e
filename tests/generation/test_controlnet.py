"""ControlNet: equal to diffusers' ControlNet pipelines with the same inputs (one ControlNet or several, text-to-image,
img2img and inpainting), recorded and replayed, and refused in one line where it cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import one_error_line, paths_of, pixels
from test_settings import assert_round_trip

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    """Tiny ControlNets: two for SD 1.x (other random weights) and one for SDXL."""
    from sdcli.testing import save_tiny_controlnet

    root = tmp_path_factory.mktemp("controlnets")
    return {name: str(save_tiny_controlnet(root / name, family, seed=seed))
            for name, family, seed in (("sd1", "sd1", 0), ("sd1-b", "sd1", 1), ("sdxl", "sdxl", 0))}


@pytest.fixture
def control(tmp_path) -> Path:
    """A 32x24 control image: a white disc and bar on black, edges for Canny to find."""
    image = Image.new("RGB", (32, 24), (10, 10, 10))
    draw = ImageDraw.Draw(image)
    draw.ellipse((4, 4, 18, 18), fill=(250, 250, 250))
    draw.rectangle((22, 2, 27, 21), fill=(160, 160, 160))
    image.save(tmp_path / "control.png")
    return tmp_path / "control.png"


@pytest.fixture
def init(tmp_path) -> Path:
    image = Image.new("RGB", (32, 24), (200, 30, 30))
    ImageDraw.Draw(image).ellipse((6, 4, 22, 20), fill=(20, 20, 220))
    image.save(tmp_path / "init.png")
    return tmp_path / "init.png"


def record_of(path: Path) -> dict:
    return json.loads(Image.open(path).info["sdcli"])


def ours(model, monkeypatch=None, **kw) -> Image.Image:
    """sdcli's image (before an inpainting composite, given ``monkeypatch``) for settings ``kw``."""
    from sdcli.generation import Engine, Settings, plan
    from sdcli.generation.tasks import Inpaint

    if monkeypatch is not None:
        monkeypatch.setattr(Inpaint, "finish", lambda self, prepared, images: images)
    s = Settings(prompts=[PROMPT], model=model, steps=3, seeds=[1], **kw)
    p = plan(s, distributed=False)
    (item,) = Engine.load(s).images(s, p.jobs)
    return item.image


def seed():
    import torch

    return [torch.Generator("cpu").manual_seed(1)]


def canny_map(path: Path) -> Image.Image:
    """The edges diffusers' ControlNet guide computes: cv2.Canny(image, 100, 200), stacked to RGB."""
    import cv2

    edges = cv2.Canny(np.asarray(Image.open(path).convert("RGB")), 100, 200)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def same(a: Image.Image, b: Image.Image) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


# Equal to diffusers ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_one_controlnet_is_diffusers_controlnet_pipeline(family, tiny_models, controlnets, control):
    from diffusers import AutoPipelineForText2Image, ControlNetModel

    model = tiny_models[family]
    steered = ours(model, controlnets=[(controlnets[family], 1.0)], control_images=[str(control)])
    assert steered.size == (32, 24)  # without -W/-H, the control image's size, as diffusers takes it
    controlnet = ControlNetModel.from_pretrained(controlnets[family])
    pipe = AutoPipelineForText2Image.from_pretrained(model, controlnet=controlnet)
    assert type(pipe).__name__ == ("StableDiffusionXLControlNetPipeline" if family == "sdxl"
                                   else "StableDiffusionControlNetPipeline")
    # sdcli's default scale is 7.5, as SD 1.x's pipelines have it (diffusers' SDXL ones default to 5).
    theirs = pipe(PROMPT, image=Image.open(control), guidance_scale=7.5, num_inference_steps=3,
                  generator=seed()).images[0]
    assert same(steered, theirs)
    # The ControlNet does something: the same image without it differs.
    assert not same(steered, ours(model, width=32, height=24))


def test_several_controlnets_with_scales_canny_and_a_step_window_are_diffusers_multicontrolnet(
        tiny_sd, controlnets, control, tmp_path):
    from diffusers import ControlNetModel, MultiControlNetModel, StableDiffusionControlNetPipeline

    second = tmp_path / "second.png"
    Image.open(control).transpose(Image.FLIP_LEFT_RIGHT).resize((16, 16)).save(second)  # resized to the first's size
    steered = ours(tiny_sd, controlnets=[(controlnets["sd1"], 0.7), (controlnets["sd1-b"], 1.3)],
                   control_images=[str(control), str(second)], control_preprocess=["canny", "none"],
                   control_start=0.2, control_end=0.7)
    multi = MultiControlNetModel([ControlNetModel.from_pretrained(controlnets[n]) for n in ("sd1", "sd1-b")])
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd, controlnet=multi)
    common = dict(image=[canny_map(control), Image.open(second).convert("RGB")], num_inference_steps=3,
                  control_guidance_start=0.2, control_guidance_end=0.7, width=32, height=24)
    theirs = pipe(PROMPT, **common, controlnet_conditioning_scale=[0.7, 1.3], generator=seed()).images[0]
    assert same(steered, theirs)
    # Each knob is passed on: other scales give another image.
    other = pipe(PROMPT, **common, controlnet_conditioning_scale=[0.7, 0.0], generator=seed()).images[0]
    assert not same(steered, other)


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_controlnet_with_img2img_and_inpainting_is_diffusers_controlnet_twin(task, tiny_sd, controlnets, control,
                                                                             init, tmp_path, monkeypatch):
    from diffusers import (
        ControlNetModel, StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline,
    )

    mask = tmp_path / "mask.png"
    m = Image.new("L", (32, 24), 0)
    ImageDraw.Draw(m).rectangle((16, 0, 31, 23), fill=255)
    m.save(mask)
    extra = {"mask": str(mask), "mask_blur": 0} if task == "inpaint" else {}
    steered = ours(tiny_sd, monkeypatch, controlnets=[(controlnets["sd1"], 1.0)], control_images=[str(control)],
                   init_image=str(init), strength=0.8, **extra)
    cls = StableDiffusionControlNetInpaintPipeline if task == "inpaint" else StableDiffusionControlNetImg2ImgPipeline
    pipe = cls.from_pretrained(tiny_sd, controlnet=ControlNetModel.from_pretrained(controlnets["sd1"]))
    more = {"mask_image": Image.open(mask)} if task == "inpaint" else {}
    # A scale of 1 unless given, as AUTOMATIC1111's Weight (these two diffusers pipelines default to 0.8 and 0.5).
    theirs = pipe(PROMPT, image=Image.open(init), control_image=Image.open(control), controlnet_conditioning_scale=1.0,
                  strength=0.8, width=32, height=24, num_inference_steps=3, generator=seed(), **more).images[0]
    assert same(steered, theirs)


def test_outpainting_follows_a_control_image_of_the_whole_canvas(cli, tiny_sd, controlnets, control, init):
    (out,) = paths_of(cli("generate", PROMPT, "--model", tiny_sd, "--steps", "2", "--seed", "1", "--init-image", init,
                          "--outpaint", "8,0,0,0", "--mask-blur", "0", "--controlnet", controlnets["sd1"],
                          "--control-image", control))
    assert pixels(out).shape == (24, 40, 3)
    assert (pixels(out)[:, 8:] == pixels(init)).all()  # the picture inside is kept
    assert record_of(out)["task"] == "outpaint+controlnet"


# Records and replay ------------------------------------------------------------------------------


def test_a_controlnet_image_records_what_automatic1111_writes_and_round_trips(cli, tiny_sd, controlnets, control,
                                                                            tmp_path):
    (image,) = paths_of(cli("generate", PROMPT, "--model", tiny_sd, "--steps", "3", "--seed", "2", "--controlnet",
                            f"{controlnets['sd1']}:0.8", "--control-image", control, "--control-preprocess", "canny",
                            "--control-end", "0.5", "--out", tmp_path / "a"))
    record = record_of(image)
    assert record["task"] == "txt2img+controlnet"
    assert record["controlnets"] == [{"path": controlnets["sd1"], "scale": 0.8}]
    assert record["control_images"][0]["path"] == str(control.resolve())
    assert len(record["control_images"][0]["sha256"]) == 64
    assert ('ControlNet 0: "Module: canny, Model: sd1, Weight: 0.8, Resize Mode: Just Resize, Threshold A: 100, '
            'Threshold B: 200, Guidance Start: 0, Guidance End: 0.5, Control Mode: Balanced"'
            in Image.open(image).info["parameters"])
    assert_round_trip(cli, image, tmp_path)
    # Without ControlNet nothing of it is recorded.
    (plain,) = paths_of(cli("generate", PROMPT, "--model", tiny_sd, "--steps", "2", "--out", tmp_path / "plain.png"))
    assert not any("control" in key for key in record_of(plain))


def test_img2img_with_two_controlnets_round_trips_and_a_changed_control_image_is_refused(
        cli, tiny_sd, controlnets, control, init, tmp_path):
    (image,) = paths_of(cli("generate", PROMPT, "--model", tiny_sd, "--steps", "3", "--seed", "2", "--init-image", init,
                            "--strength", "0.7", "--controlnet", controlnets["sd1"], "--controlnet",
                            f"{controlnets['sd1-b']}:0.5", "--control-image", control, "--control-image", init,
                            "--control-start", "0.3", "--out", tmp_path / "a"))
    assert record_of(image)["task"] == "img2img+controlnet" and record_of(image)["strength"] == 0.7
    assert "ControlNet 1: \"Module: none, Model: sd1-b, Weight: 0.5" in Image.open(image).info["parameters"]
    assert_round_trip(cli, image, tmp_path)
    Image.new("RGB", (32, 24), (255, 255, 255)).save(control)
    line = one_error_line(cli("generate", "--from-metadata", image, "--out", tmp_path / "b"))
    assert f"--control-image {control.resolve()} has changed since the image was made" in line
    assert not (tmp_path / "b").exists()


# Control images given in memory (from Python) ------------------------------------------------------


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_control_images_in_memory_give_the_image_their_files_give(task, cli, tiny_sd, controlnets, control, init,
                                                                  tmp_path):
    from sdcli.commands.generate import run_generate
    from sdcli.generation.settings import Settings

    def settings(**images):
        # Without -W/-H a text-to-image takes its size from the first control image, read in memory too.
        return Settings(prompts=[PROMPT], model=tiny_sd, steps=2, seeds=[1], control_preprocess=["canny", "none"],
                        controlnets=[(controlnets["sd1"], 1.0), (controlnets["sd1-b"], 0.5)], **images)

    files = {"control_images": [str(control), str(init)], **({"init_image": str(init)} if task == "img2img" else {})}
    given = {"control_images": [Image.open(control).convert("RGBA"), Image.open(init)],
             **({"init_image": Image.open(init).convert("RGBA")} if task == "img2img" else {})}
    (by_path,) = run_generate(settings(**files), out=tmp_path / "path.png", quiet=True)
    (by_image,) = run_generate(settings(**given), out=tmp_path / "memory.png", quiet=True)
    assert pixels(by_image).shape == (24, 32, 3) and np.array_equal(pixels(by_image), pixels(by_path))
    record = record_of(by_image)
    assert record["task"] == f"{task}+controlnet"
    assert [(c["path"], c["size"]) for c in record["control_images"]] == [(None, [32, 24]), (None, [32, 24])]
    line = one_error_line(cli("generate", "--from-metadata", by_image, "--out", tmp_path / "b.png"), 1)
    first = "--init-image" if task == "img2img" else "--control-image"  # the first given in memory, as declared
    assert line.startswith(f"error: {first}: the image was made from an image given in memory, not a file")
    replaced = ["--control-image", control, "--control-image", init] + (["--init-image", init] if task == "img2img"
                                                                        else [])
    (again,) = paths_of(cli("generate", "--from-metadata", by_image, *replaced, "--out", tmp_path / "c.png"))
    assert np.array_equal(pixels(again), pixels(by_image))


# Sweeps, contact sheets, batches and trajectories ----------------------------------------------------


def test_a_sweep_in_batches_with_trajectories(cli, tiny_sd, controlnets, control, tmp_path):
    common = ("generate", PROMPT, "--model", tiny_sd, "--steps", "2", "-g", "3,7", "--seed", "1,2", "--controlnet",
              controlnets["sd1"], "--control-image", control, "--control-preprocess", "canny")
    made = paths_of(cli(*common, "--batch-size", "2", "--save-trajectory", "--out", tmp_path / "batched"))
    images = [p for p in made if p.name.endswith(("-g3.png", "-g7.png"))]
    assert len(images) == 4 and {record_of(p)["task"] for p in images} == {"txt2img+controlnet"}
    assert len([p for p in made if "sheet" in p.name]) == 1
    gifs = [p for p in made if p.name.endswith("-trajectory.gif")]
    assert len(gifs) == 4 and Image.open(gifs[0]).size == Image.open(images[0]).size == (32, 24)
    one_by_one = [p for p in paths_of(cli(*common, "--out", tmp_path / "single")) if "sheet" not in p.name]
    for a, b in zip(images, one_by_one):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


# Bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,expected", [
    (["--controlnet", "{sd1}", "--controlnet", "{sd1-b}", "--control-image", "c.png"],
     "one --control-image per --controlnet, in order: 2 ControlNets but 1 control image"),
    (["--controlnet", "{sd1}"], "1 ControlNet but 0 control images"),
    (["--control-image", "c.png"], "--control-image needs --controlnet"),
    (["--control-preprocess", "canny"], "--control-preprocess needs --controlnet"),
    (["--controlnet", "{sd1}", "--control-image", "c.png", "--control-start", "-0.1"],
     "--control-start must be between 0 and 1 (a fraction of the steps), got -0.1"),
    (["--controlnet", "{sd1}", "--control-image", "c.png", "--control-end", "1.5"], "--control-end must be between 0 and 1 (a fraction of the steps), got 1.5"),
    (["--controlnet", "{sd1}", "--control-image", "c.png", "--control-start", "0.6", "--control-end", "0.4"],
     "--control-start 0.6 must be less than --control-end 0.4"),
    (["--controlnet", "{sd1}", "--control-image", "c.png", "--control-preprocess", "canny", "--control-preprocess",
      "none"], "--control-preprocess: give one for every ControlNet or one for each of the 1, not 2"),
    (["--controlnet", "{sd1}", "--control-image", "missing.png"], "--control-image missing.png: no such file"),
    (["--controlnet", "nowhere/at/all", "--control-image", "c.png"], "--controlnet nowhere/at/all: no such folder"),
    (["--controlnet", "{model}", "--control-image", "c.png"], "is a pipeline folder, not a diffusers ControlNet"),
    (["--controlnet", "{sd1}", "--control-image", "c.png", "--hires-scale", "2"],
     "--hires-scale does not combine with --controlnet"),
    (["--model", "{sdxl}", "--controlnet", "{sd1}", "--control-image", "c.png"],
     "was made for a UNet with 32-wide cross-attention, but the model is SDXL"),
], ids=["two-one", "one-none", "no-controlnet", "preprocess-alone", "start", "end", "start-end", "preprocess-count",
        "missing-image", "missing-controlnet", "pipeline", "hires", "family"])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(args, expected, cli, tiny_models, controlnets,
                                                                     control):
    Image.open(control).save("c.png")
    names = {**controlnets, "model": tiny_models["sd1"], "sdxl": tiny_models["sdxl"]}
    args = [a.format(**names) if a.startswith("{") else a for a in args]
    result = cli("generate", PROMPT, "--model", tiny_models["sd1"], "--steps", "2", "--out", "o", *args)
    assert expected in one_error_line(result)
    assert not Path("o").exists() or not any(Path("o").iterdir())


def test_canny_without_opencv_names_the_install(cli, tiny_sd, controlnets, control, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    line = one_error_line(cli("generate", PROMPT, "--model", tiny_sd, "--controlnet", controlnets["sd1"],
                              "--control-image", control, "--control-preprocess", "canny", "--out", "o"), code=2)
    assert "needs OpenCV, which is not installed: pip install 'sdcli[controlnet]'" in line
