"""Bad input to `sdcli generate`: one clear line, a non-zero exit, nothing written. And LoRAs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import OTHER_PIPELINES, as_other_pipeline, one_error_line, paths_of, pixels


@pytest.mark.parametrize("args,expected", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--guidance", "-2"], "--guidance must be between 0 and 1000, got -2"),
    (["--guidance", "7,high"], "'high' is not a number"),
    (["--width", "20"], "--width 20 is not a multiple of 8"),
    (["--scheduler", "eulerr"], "unknown scheduler 'eulerr'"),
    (["--seed", "x"], "'x' is not a whole number"),
    (["--lora", "missing-lora"], "no such file or folder: missing-lora"),
    (["--init-image", "nope.png"], "no such file: nope.png"),
    (["--steps", "1001"], "trained on 1000 timesteps"),
    (["--seed", str(2**63 - 1), "--num-images", "2"], "runs past the largest seed"),
    (["--init-image", "init.png", "--strength", "0.001"], "leaves no denoising step"),
])
def test_bad_options_are_refused_before_work(cli, tiny_sd, args, expected):
    Image.new("RGB", (16, 16)).save("init.png")
    result = cli("generate", "x", "--model", tiny_sd, "--out", "o", *args)
    assert expected in one_error_line(result)
    assert not Path("o").exists() or not any(Path("o").iterdir())


@pytest.mark.parametrize("args,expected", [
    (["--sampler", "dpmpp_sde"], "error: unknown scheduler 'dpmpp_sde'; choose from: ddim,"),
    (["-s", "DPM++ SDE Karras"], "error: unknown scheduler 'DPM++ SDE Karras'"),
    (["--sigmas", "kl_optimal"], "error: --sigmas 'kl_optimal': diffusers has no such schedule"),
    (["--sigmas", "Align Your Steps"], "error: --sigmas 'Align Your Steps': diffusers has no such schedule"),
    (["--sigmas", "normal", "--timestep-spacing", "trailing"],
     "error: --sigmas normal spaces the timesteps as --timestep-spacing linspace does, not trailing"),
])
def test_sampler_names_no_diffusers_sampler_has_are_one_usage_line_before_loading(cli, tiny_sd, no_pipeline_loads,
                                                                                   args, expected):
    assert one_error_line(cli("generate", "x", "--model", tiny_sd, *args), 2).startswith(expected)
    assert no_pipeline_loads == []


def test_out_with_another_image_suffix_is_refused_not_made_a_folder(cli, tiny_sd):
    assert "sdcli writes PNG files" in one_error_line(cli("generate", "x", "--model", tiny_sd, "--out", "pic.jpg"))
    assert not Path("pic.jpg").exists()


@pytest.mark.parametrize("sampler", [["-s", "dpm++2m-karras"], ["-s", "dpm++2m", "--sigmas", "karras"],
                                     ["-s", "euler", "--sigmas", "karras"], ["-s", "unipc", "--sigmas", "exponential"]])
def test_karras_sigmas_on_the_zero_terminal_snr_bundled_model_make_the_image(cli, monkeypatch, sampler):
    # Refused until the last σ was made large and finite as ComfyUI does
    # (sdcli.schedule.samplers.finite_terminal_betas); diffusers' own stand-in repeated t = 999 and ran a step past
    # the end ("DPM++ 2M Karras", users' first pick).
    monkeypatch.delenv("SDCLI_MODEL", raising=False)
    args = ("generate", "a red circle on a white background", "--seed", "1", "--steps", "20")
    spaced = paths_of(cli(*args, *sampler, "--out", "spaced"))
    plain = paths_of(cli(*args, "--out", "plain"))  # the model's own sampler (DDIM) and spacing
    # The same picture, not noise or a blank: a few levels of 255 apart on average (1-3 measured).
    assert np.abs(pixels(spaced[0]) - pixels(plain[0])).mean() < 10
    assert pixels(spaced[0]).std() > 20


def test_beta_sigmas_on_a_zero_terminal_snr_model_are_refused_in_one_line(cli, monkeypatch):
    # Beta quantiles are linear in σ: from σ_max ≈ 4519 every step but the last is pure noise (a black image).
    monkeypatch.delenv("SDCLI_MODEL", raising=False)
    line = one_error_line(cli("generate", "x", "--steps", "2", "-s", "dpm++2m", "--sigmas", "beta"), 2)
    assert "--sigmas beta" in line and "karras or exponential" in line


def test_two_runs_into_one_folder_get_their_own_numbers(tmp_path):
    from sdcli.generation.outputs import reserve_numbers

    (tmp_path / "00004-1.png").write_bytes(b"")
    # Run A reserves three numbers and has written nothing yet; run B must not reuse them.
    assert reserve_numbers(tmp_path, 3) == 5
    assert reserve_numbers(tmp_path, 2) == 8
    assert reserve_numbers(tmp_path, 1) == 10


def test_unknown_model_and_wrong_folders(cli, tmp_path, tiny_sd):
    assert "no such model file or folder" in one_error_line(cli("generate", "x", "--model", "./typo/model"))
    assert "not found" in one_error_line(cli("generate", "x", "--model", "nobody/no-such-model"))
    (tmp_path / "empty").mkdir()
    assert "not a diffusers pipeline folder" in one_error_line(cli("generate", "x", "--model", tmp_path / "empty"))
    assert "single model component" in one_error_line(cli("generate", "x", "--model", Path(tiny_sd) / "unet"))


@pytest.mark.parametrize("class_name", OTHER_PIPELINES)
def test_a_pipeline_class_of_no_family_is_one_line_before_its_weights_load(cli, tiny_sd, tmp_path,
                                                                          no_pipeline_loads, class_name):
    folder = as_other_pipeline(tiny_sd, tmp_path / "other", class_name)
    line = one_error_line(cli("generate", "x", "--model", folder, "--steps", "1", "--out", tmp_path / "out"), 1)
    assert f"--model {folder} is a {class_name}; sdcli works with Stable Diffusion" in line
    assert no_pipeline_loads == [] and not (tmp_path / "out").exists()


def test_corrupt_weights_file(cli, tiny_sd, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = one_error_line(cli("generate", "x", "--model", broken, "--steps", "1"))
    assert "broken" in line


def test_no_model_at_all(cli, monkeypatch, tmp_path):
    from sdcli import defaults

    monkeypatch.setattr(defaults, "BUNDLED_MODEL", tmp_path / "not-installed")  # as if the package shipped none
    assert "no model given" in one_error_line(cli("generate", "x"))


def test_pickled_weights_are_refused_without_allow_pickle(cli, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    assert "--allow-pickle" in one_error_line(cli("generate", "x", "--model", ckpt))


def test_pickle_only_folder_is_refused(cli, tiny_sd, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_sd, folder)
    for st in folder.rglob("*.safetensors"):
        name = "pytorch_model.bin" if st.name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(load_file(st), st.with_name(name))
        st.unlink()
    assert "--allow-pickle" in one_error_line(cli("generate", "x", "--model", folder, "--steps", "1"))
    ok = cli("generate", "x", "--model", folder, "--steps", "1", "--seed", "1", "--allow-pickle")
    assert ok.exit_code == 0, ok.stderr


def test_unwritable_output_folder(cli, tiny_sd, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/sdcli-out"  # root can write anywhere a chmod would forbid
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "out")
    assert "cannot write to" in one_error_line(cli("generate", "x", "--model", tiny_sd, "--out", target))


def test_out_png_with_many_images_is_refused(cli, tiny_sd):
    line = one_error_line(cli("generate", "a", "b", "--model", tiny_sd, "--out", "one.png"))
    assert "names one file but 2 images" in line


@pytest.fixture(scope="module")
def loras(tiny_models, tmp_path_factory):
    from sdcli.testing import save_random_lora

    root = tmp_path_factory.mktemp("loras")
    return {fam: str(save_random_lora(tiny_models[fam], root / fam)) for fam in ("sd1", "sdxl")}


def test_lora_scale_zero_is_the_base_model_and_one_changes_it(cli, tiny_sd, loras, tmp_path):
    def image(*extra):
        result = cli("generate", "x", "--model", tiny_sd, "--steps", "2", "--seed", "1", "--out", tmp_path, *extra)
        assert result.exit_code == 0, result.stderr
        return np.asarray(Image.open(result.stdout.split()[-1]), np.int16), result.stdout.split()[-1]

    base, _ = image()
    off, _ = image("--lora", f"{loras['sd1']}:0")
    on, path = image("--lora", loras["sd1"])
    assert np.abs(base - off).max() <= 1
    assert np.abs(base - on).max() > 2
    record = json.loads(Image.open(path).info["sdcli"])
    from sdcli.generation.settings import lora_sha256

    assert record["loras"] == [{"path": str(Path(loras["sd1"]).resolve()), "scale": 1.0,
                                "sha256": lora_sha256(loras["sd1"])}]


def test_lora_matches_plain_diffusers(cli, tiny_sd, loras, tmp_path):
    import torch
    from diffusers import DiffusionPipeline

    result = cli("generate", "x", "--model", tiny_sd, "--steps", "2", "--seed", "3", "-g", "5", "--lora",
                 f"{loras['sd1']}:0.7", "--out", tmp_path)
    ours = np.asarray(Image.open(result.stdout.split()[-1]), np.int16)
    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(loras["sd1"], adapter_name="a")
    pipe.set_adapters(["a"], adapter_weights=[0.7])
    theirs = pipe("x", num_inference_steps=2, guidance_scale=5, height=16, width=16,
                  generator=torch.Generator("cpu").manual_seed(3)).images[0]
    assert np.abs(ours - np.asarray(theirs, np.int16)).max() <= 1


def test_lora_for_another_architecture_does_not_fit(cli, tiny_sd, loras):
    line = one_error_line(cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--lora", loras["sdxl"]))
    assert "does not fit this model" in line


def test_a_lora_for_another_model_is_sdclis_one_line_not_the_libraries_log(tiny_sd, loras, tmp_path):
    # diffusers logged 66 lines of its own before sdcli's one line (its handler writes to the real stderr, so only
    # a process of its own shows them); SDCLI_DEBUG=1 lets them through with the traceback.
    import os
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "sdcli", "generate", "x", "--model", tiny_sd, "--steps", "1",
                          "--lora", loras["sdxl"], "--out", str(tmp_path)], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "SDCLI_DEBUG": ""})
    assert res.returncode == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: LoRA {loras['sdxl']} does not fit this model"), res.stderr


def test_memory_options_keep_the_image(cli, tiny_sd, tmp_path):
    def image(*extra):
        result = cli("generate", "x", "--model", tiny_sd, "--steps", "2", "--seed", "5", "--out", tmp_path, *extra)
        assert result.exit_code == 0, result.stderr
        return np.asarray(Image.open(result.stdout.split()[-1]), np.int16)

    assert np.abs(image() - image("--attention-slicing", "--vae-tiling", "--channels-last")).max() <= 1


def test_memory_options_take_effect(tiny_sd):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    from sdcli.generation import Engine, Settings

    def pipe(**kw):
        return Engine.load(Settings(prompts=["x"], model=tiny_sd, **kw)).pipe

    plain, small = pipe(), pipe(vae_tiling=True, attention_slicing=True)
    assert small.vae.use_tiling and small.vae.use_slicing
    assert not plain.vae.use_tiling and not plain.vae.use_slicing
    assert all(isinstance(p, SlicedAttnProcessor) for p in small.unet.attn_processors.values())
    assert not any(isinstance(p, SlicedAttnProcessor) for p in plain.unet.attn_processors.values())


def test_guidance_rescale_changes_the_image_and_matches_diffusers(cli, tiny_sd, tmp_path):
    import torch
    from diffusers import DiffusionPipeline

    def ours(phi):
        result = cli("generate", "a red circle", "--model", tiny_sd, "--steps", "3", "--seed", "4",
                     "--guidance-rescale", phi, "--out", tmp_path / f"r{phi}.png")
        assert result.exit_code == 0, result.stderr
        return np.asarray(Image.open(tmp_path / f"r{phi}.png"), np.int16)

    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red circle", num_inference_steps=3, guidance_scale=7.5, guidance_rescale=0.7,
                  generator=torch.Generator("cpu").manual_seed(4), output_type="np").images[0]
    rescaled = ours("0.7")
    assert np.abs(rescaled - np.round(theirs * 255)).max() <= 1
    assert np.abs(rescaled - ours("0")).max() > 2


def test_channels_last_is_applied_on_request_and_by_default_only_compiled_on_cuda(tiny_sd):
    import torch
    from diffusers import StableDiffusionPipeline

    from sdcli.generation import Engine, Settings
    from sdcli.pipeline import apply_runtime_options

    def channels_last(unet):
        unet = getattr(unet, "_orig_mod", unet)
        return unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    def layout(**kw):
        return channels_last(Engine.load(Settings(prompts=["x"], model=tiny_sd, **kw)).pipe.unet)

    assert layout(channels_last=True) and not layout(channels_last=False)
    assert not layout()  # eager: the default layout, on every device
    for compile in (False, True):  # what CUDA would get (torch.compile is lazy: nothing compiles here)
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
        apply_runtime_options(pipe, device="cuda", compile=compile)
        assert channels_last(pipe.unet) is compile


def test_compile_fuses_attention_projections_but_not_under_a_lora(tiny_sd, loras):
    from sdcli.generation import Engine, Settings

    def fused(**kw):
        unet = Engine.load(Settings(prompts=["x"], model=tiny_sd, compile=True, **kw)).pipe.unet
        return {type(p).__name__ for p in unet._orig_mod.attn_processors.values()} == {"FusedAttnProcessor2_0"}

    assert fused()
    assert not fused(loras=[(loras["sd1"], 1.0)])  # a fused to_qkv would silently drop the adapters


@pytest.mark.slow
def test_compile_makes_the_same_images_and_reports_the_compile_apart(cli, tiny_sd, tmp_path):
    args = ("generate", "a red circle", "--model", tiny_sd, "--steps", "2", "--seed", "3,4")
    plain = cli(*args, "--out", tmp_path / "plain")
    compiled = cli(*args, "--out", tmp_path / "compiled", "--compile")
    assert plain.exit_code == 0 and compiled.exit_code == 0, compiled.stderr
    assert "(includes torch.compile), then" in compiled.stderr
    for a, b in zip(plain.stdout.split(), compiled.stdout.split()):
        assert np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max() <= 1


def test_cpu_offload_without_cuda_is_refused(cli, tiny_sd):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert "--cpu-offload needs a CUDA device" in one_error_line(
        cli("generate", "x", "--model", tiny_sd, "--steps", "1", "--cpu-offload"))


def test_single_file_checkpoints_fail_clearly_when_corrupt_or_offline(cli, tmp_path):
    import torch
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    assert "corrupt weights" in one_error_line(cli("generate", "x", "--model", garbage))
    single = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, single)
    assert "needs its model family's config" in one_error_line(cli("generate", "x", "--model", single))
