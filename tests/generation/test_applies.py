"""Every generate option either shapes the image on the model's family and task, or is refused before loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line, paths_of, pixels

# The settings a model family ignores are refused by tests/families/test_families.py, family by family.


def refused(cli, model, args, tmp_path):
    args = [str(tmp_path / "emb.safetensors") if a == "EMBEDDING" else a for a in args]
    (tmp_path / "emb.safetensors").write_bytes(b"")
    prompt = [] if "--" in args else ["a red circle"]
    result = cli("generate", *prompt, "--model", model, "--steps", "2", "-W", "16", "-H", "16", "--out",
                 tmp_path / "o.png", *args)
    line = one_error_line(result, 2)  # one line on stderr: no "loaded ..." before it
    assert not (tmp_path / "o.png").exists()
    return line


@pytest.mark.parametrize("family,args,expected", [
    ("flux", ["-n", "blurry"], "--negative-prompt"),  # distilled guidance reads no negative prompt
    ("flux", ["--true-cfg", "-g", "0.5,3", "-n", "blurry"], "--guidance 0.5"),  # diffusers' true CFG is off below 1
    ("flux-schnell", ["-n", "blurry"], "--negative-prompt"),
])
def test_flux_options_without_effect_are_refused(cli, tiny_flow_models, tmp_path, family, args, expected):
    assert expected in refused(cli, tiny_flow_models[family], args, tmp_path)


@pytest.mark.parametrize("args,expected", [
    (["-n", "blurry", "-g", "1"], "--negative-prompt"),  # no unconditional pass at guidance 1
    (["--strength", "0.5"], "--strength does nothing without --init-image"),
    (["--mask-blur", "9"], "--mask-blur does nothing without --mask or --outpaint"),
    (["--hires-steps", "3"], "--hires-steps does nothing without --hires-scale"),
    (["--hires-strength", "0.3"], "--hires-strength does nothing without --hires-scale"),
    (["--hires-upscaler", "latent"], "--hires-upscaler does nothing without --hires-scale"),
    (["--init-image", "INIT", "--guidance-rescale", "0.5"], "has no guidance rescale"),  # refused before loading now
])
def test_an_option_its_task_or_guidance_would_ignore_is_refused_before_loading(cli, tiny_sd, tmp_path, args,
                                                                             expected):
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "init.png")
    args = [str(tmp_path / "init.png") if a == "INIT" else a for a in args]
    assert expected in refused(cli, tiny_sd, args, tmp_path)


def image(cli, model, tmp_path, name, *args, steps="4"):
    result = cli("generate", "a red circle", "--model", model, "--steps", steps, "--seed", "3", "-W", "16", "-H",
                 "16", "--out", tmp_path / name, *args)
    return paths_of(result)[0]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sigma_spacing_shapes_a_flow_image_and_is_recorded(cli, tiny_flow_models, tmp_path, family):
    plain = image(cli, tiny_flow_models[family], tmp_path, "plain.png")
    karras = image(cli, tiny_flow_models[family], tmp_path, "karras.png", "--sigmas", "karras")
    assert np.abs(pixels(karras) - pixels(plain)).max() > 0
    assert "Schedule type: Karras" in Image.open(karras).info["parameters"]


def test_true_cfg_without_a_negative_prompt_guides_against_the_empty_one(cli, tiny_flow_models, tmp_path):
    model = tiny_flow_models["flux"]
    plain = image(cli, model, tmp_path, "plain.png", steps="2")
    guided = image(cli, model, tmp_path, "cfg.png", "--true-cfg", "-g", "4", steps="2")
    assert np.abs(pixels(guided) - pixels(plain)).max() > 2  # diffusers skipped true CFG without a negative prompt
    assert json.loads(Image.open(guided).info["sdcli"])["true_cfg"] is True


def test_sd3_negative_prompt_shapes_the_image(cli, tiny_flow_models, tmp_path):
    plain = image(cli, tiny_flow_models["sd3"], tmp_path, "plain.png", steps="2")
    negative = image(cli, tiny_flow_models["sd3"], tmp_path, "neg.png", "-n", "blue square", steps="2")
    assert np.abs(pixels(negative) - pixels(plain)).max() > 2


def test_flux_img2img_keeps_the_init_image_size(cli, tiny_flow_models, tmp_path):
    Image.new("RGB", (24, 16), (200, 30, 30)).save(tmp_path / "init.png")
    result = cli("generate", "a red circle", "--model", tiny_flow_models["flux"], "--steps", "2", "--seed", "1",
                 "--init-image", tmp_path / "init.png", "--out", tmp_path / "o.png")
    assert Image.open(paths_of(result)[0]).size == (24, 16)  # not the model's default size


def test_a_sweep_records_the_negative_prompt_only_where_a_pass_read_it(cli, tiny_sd, tmp_path):
    result = cli("generate", "a red circle", "--model", tiny_sd, "--steps", "1", "--seed", "1", "-g", "1,5", "-n",
                 "blue", "--out", tmp_path)
    infos = [Image.open(p).info for p in paths_of(result)]
    records = {r["guidance"]: r for r in (json.loads(i["sdcli"]) for i in infos if "sdcli" in i)}  # not the sheet
    assert records[5.0]["negative_prompt"] == "blue" and records[1.0]["negative_prompt"] == ""
