"""The generic family: a diffusers text-to-image pipeline no family file claims (a tiny PixArt-α and a tiny Sana
here), driven through its own __call__: the same image as plain diffusers, a record that replays, and every setting
it cannot honour refused in one line before loading."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import as_other_pipeline, one_error_line, paths_of, pixels, strict_json


@pytest.fixture(scope="module")
def tiny_generics(tmp_path_factory):
    """Each kind of `sdcli.testing.GENERIC_KINDS` saved as a diffusers folder, by kind."""
    from sdcli.testing import GENERIC_KINDS, save_tiny_generic_pipeline

    root = tmp_path_factory.mktemp("generic")
    return {kind: str(save_tiny_generic_pipeline(root / kind, kind=kind)) for kind in GENERIC_KINDS}


@pytest.fixture(scope="module")
def tiny_generic(tiny_generics):
    return tiny_generics["pixart"]


@pytest.fixture(scope="module")
def sana_lora(tiny_generics, tmp_path_factory):
    from sdcli.testing import save_random_transformer_lora

    out = save_random_transformer_lora(tiny_generics["sana"], tmp_path_factory.mktemp("sana-lora"))
    return str(out / "pytorch_lora_weights.safetensors")


def diffusers_image(path, scheduler=None, lora=None, **kw):
    """The same request to plain diffusers: the pipeline's defaults for what sdcli does not pass; ``lora`` a
    (file, scale) through the pipeline's own LoRA loader."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora[0], adapter_name="lora")
        pipe.set_adapters("lora", lora[1])
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    image = pipe("a red circle", num_inference_steps=2, output_type="np",
                 generator=[torch.Generator("cpu").manual_seed(3)], **kw).images[0]
    return np.round(image * 255).astype(np.int16)


def generate(cli, model, out, *args):
    return cli("generate", "a red circle", "--model", model, "--steps", "2", "--seed", "3", "--out", out, *args)


@pytest.mark.parametrize("kind,args,theirs,scheduler", [
    ("pixart", [], {"guidance_scale": 4.5}, None),  # the pipeline's own default guidance and size
    ("pixart", ["-g", "3", "-n", "blurry", "-W", "256", "-H", "256"],
     {"guidance_scale": 3.0, "negative_prompt": "blurry", "width": 256, "height": 256}, None),
    ("pixart", ["-g", "1"], {"guidance_scale": 1.0}, None),
    ("pixart", ["-s", "euler"], {"guidance_scale": 4.5}, "EulerDiscreteScheduler"),  # its DPM-Solver is sdcli's
    # Sana's signature says 1024 for every Sana; sdcli makes the model's own size, its sample size times its VAE's
    # factor (32 here: 512, as Sana 512's), which Sana's 512-pixel bins also make.
    ("sana", [], {"guidance_scale": 4.5, "width": 512, "height": 512}, None),
    ("sana", ["-g", "3", "-n", "blurry", "-W", "256", "-H", "320"],  # made in its 512-pixel bins, then resized
     {"guidance_scale": 3.0, "negative_prompt": "blurry", "width": 256, "height": 320}, None),
    ("sana", ["-g", "1", "-W", "256", "-H", "256"], {"guidance_scale": 1.0, "width": 256, "height": 256}, None),
    ("sana", ["--lora", "LORA:0.5", "-W", "256", "-H", "256"],  # through Sana's own LoRA loader
     {"guidance_scale": 4.5, "width": 256, "height": 256, "lora": 0.5}, None),
])
def test_an_unknown_pipeline_generates_as_plain_diffusers_and_replays(cli, tiny_generics, request, tmp_path, kind,
                                                                     args, theirs, scheduler):
    model = tiny_generics[kind]
    if "lora" in theirs:
        lora = request.getfixturevalue("sana_lora")
        args = [a.replace("LORA", lora) for a in args]
        theirs = {**theirs, "lora": (lora, theirs["lora"])}
    (out,) = paths_of(generate(cli, model, tmp_path / "x.png", *args))
    assert np.array_equal(pixels(out), diffusers_image(model, scheduler, **theirs))
    record = json.loads(Image.open(out).info["sdcli"])
    assert record["model_family"] == "generic" and record["guidance"] == theirs["guidance_scale"]
    assert record["sampler"] == ("Euler" if scheduler else "DPM++ 2M")
    assert (record["width"], record["height"]) == (theirs.get("width", 256), theirs.get("height", 256))
    assert record["negative_prompt"] == theirs.get("negative_prompt", "")
    assert [(lora["path"], lora["scale"]) for lora in record["loras"]] == ([theirs["lora"]] if "lora" in theirs else [])
    (again,) = paths_of(cli("generate", "--from-metadata", out, "--out", tmp_path / "again.png"))
    assert np.array_equal(pixels(again), pixels(out))


@pytest.mark.parametrize("args,flag", [
    (["--guidance-rescale", "0.5"], "--guidance-rescale"),
    (["-g", "0.5"], "--guidance 0.5"),
    (["-g", "1", "-n", "blurry"], "--negative-prompt"),
    (["--clip-skip", "2"], "--clip-skip"),
    (["--true-cfg", "-g", "3"], "--true-cfg"),
    (["--distilled-guidance", "2"], "--distilled-guidance"),
    (["--sigmas", "karras"], None),  # allowed: checked below as a control
    (["--lora", "LORA"], "--lora"),
    (["--hires-scale", "1.5"], "--hires-scale"),
    (["--init-image", "INIT"], "--init-image"),
    (["--init-image", "INIT", "--mask", "MASK"], "--mask"),
    (["--controlnet", "CN", "--control-image", "INIT"], "--controlnet"),
    (["--embedding", "EMB"], "--embedding"),
    (["--prompt-syntax", "a1111", "(red:1.3) circle"], "--prompt-syntax a1111"),
])
def test_a_setting_it_cannot_honour_is_one_line_before_loading(cli, tiny_generic, tmp_path, no_pipeline_loads,
                                                               args, flag):
    from safetensors.torch import save_file

    init = tmp_path / "init.png"
    Image.new("RGB", (256, 256), (200, 30, 30)).save(init)
    mask = tmp_path / "mask.png"
    Image.new("L", (256, 256), 255).save(mask)
    lora = tmp_path / "lora.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(4, 16)}, str(lora))
    emb = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, str(emb))
    cn = tmp_path / "cn"
    cn.mkdir()
    (cn / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    swap = {"INIT": init, "MASK": mask, "LORA": lora, "EMB": emb, "CN": cn}
    args = [swap.get(a, a) for a in args]
    prompt = [args.pop()] if flag == "--prompt-syntax a1111" else ["a red circle"]
    result = cli("generate", *prompt, "--model", tiny_generic, "--steps", "2", "--out", tmp_path / "o.png", *args)
    if flag is None:
        assert result.exit_code == 0 or "weights were loaded" in result.stderr  # got as far as loading
        return
    line = one_error_line(result, 2)
    assert line.startswith(f"error: {flag}: PixArtAlphaPipeline "), line
    assert no_pipeline_loads == [] and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("class_name,args,expected", [
    ("LatentConsistencyModelPipeline", ["-n", "blurry"], "--negative-prompt: LatentConsistencyModelPipeline takes no "
                                                         "negative prompt"),
    ("QwenImage21Pipeline", ["-n", "blurry"], "--negative-prompt: QwenImage21Pipeline reads its negative prompt "
                                              "through true_cfg_scale"),
    ("QwenImage21Pipeline", ["-g", "3"], "--guidance: QwenImage21Pipeline takes no guidance_scale"),
])
def test_what_another_class_s_signature_lacks_is_refused_by_its_option(cli, tiny_generic, tmp_path, no_pipeline_loads,
                                                                       class_name, args, expected):
    folder = as_other_pipeline(tiny_generic, tmp_path / "other", class_name)
    assert one_error_line(generate(cli, folder, tmp_path / "o.png", *args), 2).startswith(f"error: {expected}")
    assert no_pipeline_loads == []


@pytest.mark.parametrize("kind,scheduler,changes", [
    ("pixart", "LCMScheduler", {"_class_name": "LCMScheduler"}),  # not one of sdcli's samplers
    ("sana", "DPMSolverMultistepScheduler", {}),  # one of them, but on flow σ's, as the real Sana's
])
def test_scheduler_swaps_are_refused_where_its_scheduler_is_not_one_of_sdclis(cli, tiny_generics, tmp_path,
                                                                             no_pipeline_loads, kind, scheduler,
                                                                             changes):
    from sdcli.testing import GENERIC_KINDS

    folder = tmp_path / "other-scheduler"
    shutil.copytree(tiny_generics[kind], folder)
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    for args, flag in ((["-s", "euler"], "--scheduler"), (["--timestep-spacing", "trailing"], "--timestep-spacing"),
                       (["--sigmas", "karras"], "--sigmas"), (["--save-trajectory"], "--save-trajectory")):
        line = one_error_line(generate(cli, folder, tmp_path / "o.png", *args), 2)
        assert line.startswith(f"error: {flag}: {GENERIC_KINDS[kind]} samples with") and scheduler in line
    assert no_pipeline_loads == []


@pytest.mark.parametrize("class_name,lack", [
    ("HeliosPyramidPipeline", "takes no num_inference_steps, so sdcli cannot set --steps"),  # a real diffusers one
    ("NoSeedPipeline", "takes no generator, so sdcli cannot seed it"),
])
def test_a_text_to_image_class_lacking_what_sdcli_needs_is_one_line_naming_it(cli, tiny_generic, tmp_path,
                                                                              monkeypatch, no_pipeline_loads,
                                                                              class_name, lack):
    import diffusers
    from diffusers.pipelines import auto_pipeline

    class NoSeedPipeline(diffusers.DiffusionPipeline):
        def __call__(self, prompt=None, num_inference_steps=2, output_type="pil"):
            raise AssertionError("never run")

    # As diffusers would list a text-to-image class of its own.
    monkeypatch.setattr(diffusers, "NoSeedPipeline", NoSeedPipeline, raising=False)
    monkeypatch.setitem(auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING, "no-seed", NoSeedPipeline)
    folder = as_other_pipeline(tiny_generic, tmp_path / "other", class_name)
    line = one_error_line(generate(cli, folder, tmp_path / "o.png"), 1)
    assert line == f"error: --model {folder}: {class_name}'s __call__ {lack}"
    assert no_pipeline_loads == [] and not (tmp_path / "o.png").exists()


def test_finetune_refuses_it_in_one_line_before_loading(cli, tiny_generic, dataset, tmp_path, no_pipeline_loads):
    line = one_error_line(cli("finetune", "--data", dataset, "--model", tiny_generic, "--out", tmp_path / "out",
                              "--max-steps", "1"), 1)
    assert "PixArtAlphaPipeline, which sdcli generates with but cannot train" in line
    assert no_pipeline_loads == [] and not (tmp_path / "out").exists()


def test_inspect_schedule_shows_its_schedule_or_refuses_a_shift_only_its_pipeline_knows(cli, tiny_generics,
                                                                                     tiny_flow_models, tmp_path):
    result = cli("inspect-schedule", "--model", tiny_generics["pixart"], "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert strict_json(result.stdout)["name"] == "pixart"
    # Sana's DPM-Solver samples flow σ's: the β schedule its class carries is not the noise it adds.
    line = one_error_line(cli("inspect-schedule", "--model", tiny_generics["sana"], "--format", "json"), 1)
    assert "sana runs DPMSolverMultistepScheduler on flow-matching σ's (use_flow_sigmas)" in line, line
    # A flow-matching model whose σ's shift with the image size, as its own pipeline computes it.
    folder = as_other_pipeline(tiny_flow_models["flux"], tmp_path / "qwen", "QwenImage21Pipeline")
    line = one_error_line(cli("inspect-schedule", "--model", folder, "--format", "json"), 1)
    assert "QwenImage21Pipeline shifts its flow-matching schedule by the image size" in line
    result = cli("inspect-schedule", "--model", folder, "--shift", "3", "--format", "json")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("kind,flow,multiple", [
    ("pixart", False, 16),  # an AutoencoderKL's factor 8 times its 2x2 patches
    ("sana", True, 32),  # a deep-compression VAE, whose levels its config names encoder_block_out_channels
])
def test_its_facts_are_the_same_read_off_its_configs_and_off_the_loaded_pipeline(tiny_generics, kind, flow,
                                                                                 multiple):
    from diffusers import DiffusionPipeline

    from sdcli.families import facts_of, family_of, model_facts

    pipe = DiffusionPipeline.from_pretrained(tiny_generics[kind])
    assert family_of(pipe) == "generic"
    for facts in (model_facts(tiny_generics[kind]), facts_of(pipe)):
        assert facts.family.denoiser == "transformer" and facts.family.flow == flow
        assert facts.family.scheduler == "DPMSolverMultistepScheduler" and facts.size_multiple == multiple


@pytest.mark.parametrize("kind,multiple", [("pixart", 16), ("sana", 32)])
def test_a_size_off_its_vae_s_multiple_is_one_line_before_loading(cli, tiny_generics, tmp_path, no_pipeline_loads,
                                                                   kind, multiple):
    line = one_error_line(generate(cli, tiny_generics[kind], tmp_path / "o.png", "-W", str(256 + 8), "-H", "256"), 2)
    assert line.startswith(f"error: --width 264 is not a multiple of {multiple} "), line
    assert no_pipeline_loads == []


def test_its_trajectory_is_saved_where_its_sampler_is_one_of_sdclis(cli, tiny_generic, tmp_path):
    image, strip, gif = paths_of(generate(cli, tiny_generic, tmp_path / "t.png", "--save-trajectory"))
    assert strip.name == "t-trajectory.png" and gif.suffix == ".gif" and Image.open(strip).width > 256
