"""Model loading: Hub ids from the local cache, families, devices and dtypes, the NaN guard."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from sdcli.errors import ModelError, SdcliError, UsageError
from sdcli.pipeline import local_kind, resolve_dtype

from conftest import OTHER_PIPELINES, as_other_pipeline


def test_hub_id_loads_from_the_local_cache_offline(tiny_sd, tmp_path):
    # The layout huggingface_hub keeps: models--owner--name/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_sd, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "sdcli", "generate", "x", "--model", "someone/tiny-sd", "--steps", "1",
                          "--seed", "1", "--json", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         env=env)
    assert res.returncode == 0, res.stderr
    assert '"model_name": "someone/tiny-sd"' in res.stdout
    missing = subprocess.run([sys.executable, "-m", "sdcli", "generate", "x", "--model", "someone/other"],
                             capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and "not found in the local Hugging Face cache" in missing.stderr


def test_local_kind_tells_paths_from_hub_ids(tmp_path):
    assert local_kind(str(tmp_path)) == "folder"
    assert local_kind("someone/model") == "hub"
    for typo in ("./models/sd", "models/sd/v1", "model.safetensors", "~/nothing-here"):
        with pytest.raises(ModelError, match="no such model file or folder"):
            local_kind(typo)


def test_dtype_defaults_and_refusals():
    import torch

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16
    with pytest.raises(UsageError, match="float16 is not supported on CPU"):
        resolve_dtype("float16", "cpu")


def test_bfloat16_on_cpu_is_recorded(cli, tiny_sd):
    import json

    from PIL import Image

    result = cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--seed", "1", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.stderr
    assert json.loads(Image.open(result.stdout.strip()).info["sdcli"])["dtype"] == "bfloat16"


def test_nan_output_is_reported_not_saved_as_black(tiny_sd):
    import torch

    from sdcli.generation import Engine, Settings, plan_jobs

    s = Settings(prompts=["x"], model=tiny_sd, steps=1, seeds=[1])
    loaded = Engine.load(s)
    with torch.no_grad():
        loaded.pipe.vae.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(SdcliError, match="NaN"):
        list(loaded.images(s, plan_jobs(s, [1])))


def test_bfloat16_on_a_card_without_it_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla T4")
    with pytest.raises(UsageError, match="Tesla T4 does not support it"):
        resolve_dtype("bfloat16", "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("bfloat16", "cuda") == torch.bfloat16


def test_cpu_offload_is_refused_before_any_weights_load(tiny_sd, monkeypatch):
    import diffusers

    from sdcli.pipeline import load_pipeline

    def loads(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", loads)
    with pytest.raises(UsageError, match="--cpu-offload needs a CUDA device"):
        load_pipeline(tiny_sd, device="cpu", cpu_offload=True)


@pytest.mark.parametrize("class_name", OTHER_PIPELINES)
def test_a_pipeline_class_of_no_family_is_refused_by_name_before_its_weights_load(tiny_sd, tmp_path,
                                                                                 no_pipeline_loads, class_name):
    from sdcli.families import model_facts
    from sdcli.pipeline import load_pipeline

    folder = as_other_pipeline(tiny_sd, tmp_path / "other", class_name)
    for call in (lambda: model_facts(str(folder)), lambda: load_pipeline(str(folder), device="cpu")):
        with pytest.raises(ModelError, match="^" + re.escape(f"--model {folder} is a {class_name}; sdcli works with "
                                                             "Stable Diffusion 1.x/2.x, SDXL, SD3, Flux.1, FLUX.2, Chroma")):
            call()
    assert no_pipeline_loads == []


@pytest.mark.parametrize("class_name,family", [
    (None, "sd"),  # no model_index.json: a single-file checkpoint, loaded as an SD-family class
    ("StableDiffusionPipeline", "sd"), ("StableDiffusionImg2ImgPipeline", "sd"),
    ("StableDiffusionControlNetInpaintPipeline", "sd"), ("StableDiffusionXLPipeline", "sdxl"),
    ("StableDiffusionXLControlNetImg2ImgPipeline", "sdxl"), ("StableDiffusion3Pipeline", "sd3"),
    ("StableDiffusion3InpaintPipeline", "sd3"), ("FluxPipeline", "flux"), ("FluxImg2ImgPipeline", "flux"),
    ("FluxKontextPipeline", "flux"), ("Flux2Pipeline", "flux2"), ("Flux2KleinPipeline", "flux2"),
])
def test_each_task_class_of_a_family_keeps_its_family(class_name, family):
    from sdcli.families import family_spec

    assert family_spec(class_name).name == family


def test_a_loaded_pipeline_of_no_family_is_refused_and_a_subclass_of_a_family_is_not(tiny_sd):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from sdcli.families import denoiser, facts_of, family_of, pipe_family

    sd = StableDiffusionPipeline.from_pretrained(tiny_sd)

    class MyOwnPipeline(DiffusionPipeline):
        def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
            super().__init__()
            self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                  scheduler=scheduler)

    class MySD(StableDiffusionPipeline):
        pass

    mine = MyOwnPipeline(sd.vae, sd.text_encoder, sd.tokenizer, sd.unet, sd.scheduler)
    for call in (facts_of, family_of, denoiser, pipe_family):
        with pytest.raises(ModelError, match="^the pipeline is a MyOwnPipeline; sdcli works with"):
            call(mine)
    assert family_of(MySD(**sd.components)) == "sd1" and denoiser(MySD(**sd.components)) is sd.unet
    # A library caller handing generate such a pipeline gets the same line, before any image is made.
    from sdcli.generation import Engine, Settings

    with pytest.raises(ModelError, match="^the pipeline is a MyOwnPipeline; sdcli works with"):
        Engine.around(mine, Settings(prompts=["x"], model=tiny_sd, device="cpu"), family="sd1")


def test_each_compile_mode_sets_its_inductor_options_and_only_those(tiny_sd, monkeypatch):
    # The CUDA branch's settings, checked without a GPU: torch.compile is lazy, so nothing compiles here.
    import torch._inductor.config as inductor

    from sdcli.options import CompileMode
    from sdcli.pipeline import COMPILE_MODES

    assert set(COMPILE_MODES) == {m.value for m in CompileMode}  # every --compile-mode choice is declared
    # Restored by hand at the end: monkeypatch would delete them on undo (it reads a module's own __dict__, where
    # torch keeps no config values), which hides them from every later compile in this process.
    own = {key: getattr(inductor, key) for key in COMPILE_MODES["max-autotune"]["inductor"]}
    # What sdcli takes for inductor's own values is read when it first sets them; an earlier test's import may
    # have changed them since (torchao sets some), so it reads them afresh here.
    import sdcli.pipeline

    monkeypatch.setattr(sdcli.pipeline, "_INDUCTOR_DEFAULTS", {})
    try:
        _check_compile_modes(tiny_sd, monkeypatch, own)
    finally:
        for key, value in own.items():
            setattr(inductor, key, value)


def _check_compile_modes(tiny_sd, monkeypatch, own):
    import torch
    import torch._inductor.config as inductor
    from diffusers import StableDiffusionPipeline

    from sdcli.pipeline import COMPILE_MODES, apply_runtime_options

    modes = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net, mode: modes.append(mode) or real_compile(net, mode=mode))
    expected = {"max-autotune": ("max-autotune", "max-autotune-no-cudagraphs"), "default": ("default", "default"),
                "max-autotune-no-cudagraphs": ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
                "reduce-overhead": ("reduce-overhead", "default")}
    for mode, (plain, offloaded) in expected.items():
        for cpu_offload, used in ((False, plain), (True, offloaded)):
            pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
            apply_runtime_options(pipe, device="cuda", compile=True, compile_mode=mode, channels_last=False,
                                  cpu_offload=cpu_offload)
            assert pipe.unet.__class__.__name__ == "OptimizedModule"
            # CUDA graphs (reduce-overhead, max-autotune) replay fixed addresses: not with offloaded weights.
            assert modes[-1] == used, (mode, cpu_offload)
            # An autotuned compile's options do not leak into a later default or reduce-overhead one.
            assert {key: getattr(inductor, key) for key in own} == {**own, **COMPILE_MODES[used]["inductor"]}, mode
