"""Qwen-Image and Qwen-Image-Edit: their own family file (guidance as true_cfg_scale against a negative prompt,
" " when none is given, as the model card does; a Wan-style VAE's latents for trajectories; --reference-image for
the editing models), equal to plain diffusers on a tiny random Qwen-Image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line, paths_of, pixels
from newflow import comfyui_lora, generate, new_flow_model, plain_diffusers  # noqa: F401 - fixtures

SIZE = ["-W", "32", "-H", "32"]


@pytest.fixture(scope="module")
def qwen(new_flow_model):
    return new_flow_model("qwenimage")


@pytest.mark.parametrize("args,theirs", [
    ([], {"true_cfg_scale": 4.0, "negative_prompt": " "}),  # the model card's 4, against " "
    (["-g", "2.5", "-n", "blurry"], {"true_cfg_scale": 2.5, "negative_prompt": "blurry"}),
    (["-g", "1"], {"true_cfg_scale": 1.0}),  # unguided: one pass a step
])
def test_qwen_image_generates_as_plain_diffusers_and_replays(generate, qwen, plain_diffusers, args, theirs):
    (out,) = paths_of(generate(qwen, *SIZE, *args))
    assert np.abs(pixels(out) - plain_diffusers(qwen, width=32, height=32, **theirs)).max() <= 1
    record = json.loads(Image.open(out).info["sdcli"])
    assert record["model_family"] == "qwenimage" and record["guidance"] == theirs["true_cfg_scale"]
    (again,) = paths_of(generate(qwen, "--from-metadata", out, name="again.png"))
    assert np.array_equal(pixels(again), pixels(out))


def test_qwen_image_img2img_is_diffusers_qwen_img2img(generate, qwen, plain_diffusers, tmp_path):
    start = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    start.save(tmp_path / "start.png")
    (out,) = paths_of(generate(qwen, "--init-image", tmp_path / "start.png", "--strength", "0.6"))
    theirs = plain_diffusers(qwen, "QwenImageImg2ImgPipeline", image=start, strength=0.6, true_cfg_scale=4.0,
                             negative_prompt=" ", width=32, height=32)
    assert np.abs(pixels(out) - theirs).max() <= 1


@pytest.mark.parametrize("layout", ["diffusers", "comfyui", "comfyui-kohya"])
def test_a_qwen_image_lora_loads_as_diffusers_loads_it(generate, qwen, plain_diffusers, tmp_path, layout):
    from sdcli.testing import save_random_transformer_lora

    lora = save_random_transformer_lora(qwen, tmp_path / "lora", targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                                   "add_k_proj", "add_v_proj", "to_add_out"))
    shared = lora if layout == "diffusers" else comfyui_lora(lora, layout, tmp_path)
    (out,) = paths_of(generate(qwen, *SIZE, "-g", "1", "--lora", shared))
    theirs = plain_diffusers(qwen, lora=str(lora), true_cfg_scale=1.0, width=32, height=32)
    assert np.abs(pixels(out) - theirs).max() <= 1
    assert np.abs(pixels(out) - plain_diffusers(qwen, true_cfg_scale=1.0, width=32, height=32)).max() > 2


def test_qwen_image_trajectory_decodes_its_own_latents(qwen):
    from sdcli import api as sdcli

    (made,) = sdcli.load(qwen).generate("a red circle", seeds=[3], steps=2, width=32, height=32, guidance=[1.0],
                                        save_trajectory=True)
    # Unpacked from 2x2 tokens and un-normalised by the VAE's means and deviations, the last x̂0 is the image.
    assert np.abs(np.asarray(made.trajectory[-1], np.int16) - np.asarray(made.image, np.int16)).max() <= 1


@pytest.mark.parametrize("args,flag", [
    (["--true-cfg", "-g", "3"], "--true-cfg"),
    (["-g", "1", "-n", "blurry"], "--negative-prompt"),
    (["--reference-image", "ref.png"], "--reference-image"),  # Qwen-Image is no editing model
    (["--embedding", "ref.png"], "--embedding"),
    (["--hires-scale", "2", "--hires-upscaler", "latent"], "--hires-upscaler"),
])
def test_what_qwen_image_lacks_is_refused_before_loading(generate, qwen, no_pipeline_loads, tmp_path, args, flag):
    Image.new("RGB", (32, 32)).save(tmp_path / "ref.png")
    line = one_error_line(generate(qwen, *SIZE, *args), 2)
    assert flag in line and not no_pipeline_loads


def test_an_editing_model_refuses_more_reference_images_than_it_reads_and_an_init_image(generate, qwen, tmp_path):
    # A Qwen-Image folder named as Qwen-Image-Edit: refused from its configs, before any weights load.
    import shutil

    edit = tmp_path / "edit"
    shutil.copytree(qwen, edit)
    index = json.loads((edit / "model_index.json").read_text())
    (edit / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPipeline"}))
    Image.new("RGB", (32, 32)).save(tmp_path / "ref.png")
    two = one_error_line(generate(edit, "--reference-image", tmp_path / "ref.png", "--reference-image",
                                  tmp_path / "ref.png"), 2)
    assert two == "error: --reference-image: QwenImageEditPipeline takes 1 reference image, not 2"
    assert "--init-image" in one_error_line(generate(edit, "--init-image", tmp_path / "ref.png"), 2)
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    masked = one_error_line(generate(edit, "--init-image", tmp_path / "ref.png", "--mask", tmp_path / "mask.png"), 2)
    assert masked.startswith("error: --mask: QwenImageEditPipeline is not inpainted by sdcli yet")


@pytest.fixture
def small_edit_areas(monkeypatch):
    """diffusers' editing pipelines size their inputs by pixel areas made for 1024x1024 models (minutes on the CPU
    for a tiny one); a thousandth of each area (32x32 at least), for sdcli's run and plain diffusers' alike."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit, pipeline_qwenimage_edit_plus as plus

    for module in (edit, plus):
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, full=module.calculate_dimensions: full(max(area // 1024, 32 * 32), ratio))


@pytest.mark.parametrize("model,count", [("qwenimage-edit", 1), ("qwenimage-edit-plus", 2)])
def test_qwen_image_edit_is_diffusers_edit_with_its_reference_images(model, count, small_edit_areas):
    import torch

    from sdcli.generation.engine import Engine
    from sdcli.generation.settings import Settings
    from sdcli.testing import build_tiny_new_flow_pipeline

    pipe = build_tiny_new_flow_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    images = [Image.new("RGB", (40, 32), colour) for colour in ("red", "blue")[:count]]
    engine = Engine.around(pipe, Settings(model=model, device="cpu"), family="qwenimage")
    (made,) = engine.generate("a red circle", seeds=[3], steps=2, reference_images=images, guidance=[1.0])
    theirs = pipe(prompt="a red circle", image=images if count > 1 else images[0], num_inference_steps=2,
                  true_cfg_scale=1.0, width=32, height=32, output_type="np",
                  generator=[torch.Generator("cpu").manual_seed(3)]).images[0]
    assert made.image.size == (32, 32)
    assert np.abs(np.asarray(made.image, np.int16) - np.round(theirs * 255)).max() <= 1
    assert made.record["task"] == "edit" and len(made.record["reference_images"]) == count


def as_hub_processor(folder):
    """The processor folder as the Hub's Qwen-Image-Edit repos have it (transformers 4's layout): the image
    processor's settings flat in preprocessor_config.json, min_pixels/max_pixels, a video processor's config beside."""
    processor = folder / "processor"
    nested = json.loads((processor / "processor_config.json").read_text())["image_processor"]
    size = nested.pop("size")
    flat = {**nested, "min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"],
            "processor_class": "Qwen2_5_VLProcessor"}
    (processor / "preprocessor_config.json").write_text(json.dumps(flat))
    (processor / "video_preprocessor_config.json").write_text(json.dumps(
        {**flat, "video_processor_type": "Qwen2VLVideoProcessor"}))
    (processor / "processor_config.json").unlink()


# Edit as transformers 5 saves its processor, Edit-Plus as the Hub has it.
@pytest.mark.parametrize("model,count", [("qwenimage-edit", 1), ("qwenimage-edit-plus", 2)])
def test_a_qwen_image_edit_folder_edits_from_the_cli_without_torchvision(generate, small_edit_areas, model, count,
                                                                        monkeypatch, tmp_path):
    # diffusers' own loading builds Qwen2-VL's video processor, which needs torchvision; sdcli builds the processor
    # the editor calls without it, as it does wherever torchvision does not import.
    import torch

    from sdcli.families import qwenimage
    from sdcli.testing import build_tiny_new_flow_pipeline, save_tiny_new_flow_pipeline

    monkeypatch.setattr(qwenimage, "torchvision_works", lambda: False, raising=False)
    folder = save_tiny_new_flow_pipeline(tmp_path / model, model)
    if count > 1:
        as_hub_processor(folder)
    refs = []
    for i, colour in enumerate(("red", "blue")[:count]):
        refs += ["--reference-image", tmp_path / f"{colour}.png"]
        Image.new("RGB", (40, 32), colour).save(refs[-1])
    result = generate(folder, *SIZE, "-g", "1", *refs)
    assert result.exit_code == 0, result.output
    assert "warn" not in result.stderr.lower() and "torchvision" not in result.stderr
    pipe = build_tiny_new_flow_pipeline(model)  # the same pipeline in memory, its processor as built
    pipe.set_progress_bar_config(disable=True)
    images = [Image.open(path).convert("RGB") for path in refs[1::2]]
    theirs = pipe(prompt="a red circle", image=images if count > 1 else images[0], num_inference_steps=2,
                  true_cfg_scale=1.0, width=32, height=32, output_type="np",
                  generator=[torch.Generator("cpu").manual_seed(3)]).images[0]
    assert np.array_equal(pixels(paths_of(result)[0]), np.round(theirs * 255))
