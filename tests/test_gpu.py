"""`generate`'s CUDA path, run only where a GPU is: half precision, channels-last, offload, compile, NaNs.

Skipped without CUDA (CI has none). On a GPU machine: `python -m pytest -m gpu -q`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _image(result):
    assert result.exit_code == 0, result.stderr
    path = result.stdout.split()[-1]
    return np.asarray(Image.open(path), np.int16), json.loads(Image.open(path).info["sdcli"])


def test_defaults_on_cuda_are_float16_and_channels_last_only_compiled(tiny_sd):
    from sdcli.generation import Engine, Settings

    loaded = Engine.load(Settings(prompts=["x"], model=tiny_sd))
    unet = loaded.pipe.unet
    assert loaded.device == "cuda" and unet.dtype == torch.float16
    assert unet.conv_in.weight.is_contiguous()  # eager: channels-last measured slower on an H100
    compiled = Engine.load(Settings(prompts=["x"], model=tiny_sd, compile=True)).pipe.unet._orig_mod
    assert compiled.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_offload_and_compile_keep_the_image(cli, tiny_sd, tmp_path):
    args = ("generate", "a red circle", "--model", tiny_sd, "--steps", "4", "--seed", "7", "--dtype", "float32")
    plain, record = _image(cli(*args, "--out", tmp_path / "a"))
    assert record["dtype"] == "float32"
    offloaded, _ = _image(cli(*args, "--out", tmp_path / "b", "--cpu-offload"))
    compiled, _ = _image(cli(*args, "--out", tmp_path / "c", "--compile"))
    both, _ = _image(cli(*args, "--out", tmp_path / "d", "--compile", "--cpu-offload"))  # compiled without CUDA graphs
    assert np.abs(plain - offloaded).max() <= 2  # the same kernels, moved at other times
    assert np.abs(plain - both).max() <= 8 and np.abs(plain - both).mean() < 1
    # Inductor may pick other (TF32) kernels than cuDNN's: close, not identical; a broken compile is off by 100s.
    assert np.abs(plain - compiled).max() <= 8 and np.abs(plain - compiled).mean() < 1


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_every_compile_mode_keeps_the_images(cli, tiny_sd, tmp_path, mode):
    # Two seeds in a row: with CUDA graphs (reduce-overhead, max-autotune) the second image's UNet calls
    # replay the recorded graph over the first one's buffers, which must not leak into either image.
    args = ("generate", "a red circle", "--model", tiny_sd, "--steps", "4", "--seed", "7,8", "--dtype", "float32")
    plain = cli(*args, "--out", tmp_path / "a")
    compiled = cli(*args, "--out", tmp_path / "b", "--compile", "--compile-mode", mode)
    assert plain.exit_code == 0 and compiled.exit_code == 0, compiled.stderr
    assert len(plain.stdout.split()) == len(compiled.stdout.split()) == 2
    for a, b in zip(plain.stdout.split(), compiled.stdout.split()):
        x, y = np.asarray(Image.open(a), np.int16), np.asarray(Image.open(b), np.int16)
        assert np.abs(x - y).max() <= 8 and np.abs(x - y).mean() < 1, (mode, a)


def test_cpu_offload_never_puts_the_whole_pipeline_on_the_gpu(tiny_sd):
    from sdcli.pipeline import load_pipeline

    loaded = load_pipeline(tiny_sd, cpu_offload=True)
    # Offloaded models wait in CPU memory and move to the GPU one at a time, when they run.
    assert loaded.pipe.unet.device.type == "cpu" and loaded.pipe.vae.device.type == "cpu"


def test_nan_in_float16_names_the_fix(tiny_sd):
    from sdcli.errors import SdcliError
    from sdcli.generation import Engine, Settings, plan_jobs

    s = Settings(prompts=["x"], model=tiny_sd, steps=1, seeds=[1])
    loaded = Engine.load(s)
    with torch.no_grad():
        loaded.pipe.vae.decoder.conv_out.bias.fill_(float("nan"))  # what a float16 overflow leaves behind
    assert loaded.dtype == torch.float16
    with pytest.raises(SdcliError, match="--dtype bfloat16 or float32"):
        list(loaded.images(s, plan_jobs(s, [1])))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_models_in_bfloat16_with_offload_fit_and_match(cli, tiny_flow_models, family, tmp_path):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this card has no bfloat16")
    args = ("generate", "a red circle", "--model", tiny_flow_models[family], "--steps", "3", "--seed", "2",
            "-W", "16", "-H", "16", "--dtype", "bfloat16")
    on_card, record = _image(cli(*args, "--out", tmp_path / "a"))
    offloaded, _ = _image(cli(*args, "--out", tmp_path / "b", "--cpu-offload"))
    assert record["dtype"] == "bfloat16" and record["model_family"] == family
    assert on_card.std() > 0 and np.abs(on_card - offloaded).max() <= 2


def test_hires_and_inpainting_run_in_float16(cli, tiny_sd, tmp_path):
    hires, record = _image(cli("generate", "a red circle", "--model", tiny_sd, "--steps", "3", "--seed", "1",
                               "--hires-scale", "2", "--out", tmp_path / "h"))
    assert hires.shape[:2] == (32, 32) and record["dtype"] == "float16"
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(init)
    m = Image.new("L", (16, 16), 0)
    m.paste(255, (8, 0, 16, 16))
    m.save(mask)
    painted, _ = _image(cli("generate", "a blue square", "--model", tiny_sd, "--steps", "3", "--seed", "1",
                            "--init-image", init, "--mask", mask, "--mask-blur", "0", "--out", tmp_path / "i"))
    original = np.asarray(Image.open(init), np.int16)
    assert np.array_equal(painted[:, :8], original[:, :8])  # outside the mask: the original, exactly


def test_prompt_editing_swaps_float16_embeddings_on_the_card(cli, tiny_sd, tmp_path):
    # The step callback hands the pipeline new embeddings mid-loop: on CUDA they must be on the card and in float16.
    def run(prompt, name):
        result = cli("generate", prompt, "a blue square", "--model", tiny_sd, "--steps", "3", "--seed", "1",
                     "--batch-size", "2", "--out", tmp_path / name)
        assert result.exit_code == 0, result.stderr
        return np.asarray(Image.open(result.stdout.split()[0]), np.int16)

    red, blue = run("a red circle", "red"), run("a blue circle", "blue")
    assert np.array_equal(run("a [red:blue:3] circle", "end"), red)
    assert np.array_equal(run("a [red:blue:0] circle", "start"), blue)
    middle = run("a [red:blue:0.5] circle", "middle")
    assert not np.array_equal(middle, red) and not np.array_equal(middle, blue)


# Big models on small cards: the CUDA-only modes of sdcli.quantize, on the tiny Flux (its linear layers are what they
# quantize); each must make the tiny model's image, close to the unquantized one, and record how it was made.


@pytest.mark.parametrize("extra,key,value", [
    (("--quantize", "nf4"), "quantize", "bitsandbytes:nf4"),
    (("--quantize", "int8"), "quantize", "bitsandbytes:int8"),
    (("--quantize", "fp8"), "quantize", "torchao:fp8"),
    (("--quantize", "int4-weight"), "quantize", "torchao:int4-weight"),
    (("--offload", "model"), "dtype", "bfloat16"),
    (("--offload", "sequential"), "dtype", "bfloat16"),
    (("--offload", "group"), "dtype", "bfloat16"),
])
def test_cuda_modes_make_the_image(cli, tiny_flow_models, tmp_path, extra, key, value):
    args = ("generate", "a red circle", "--model", tiny_flow_models["flux"], "--steps", "2", "-W", "16", "-H", "16",
            "--seed", "1", "--dtype", "bfloat16")
    plain, _ = _image(cli(*args, "--out", tmp_path / "a.png"))
    made, record = _image(cli(*args, *extra, "--out", tmp_path / "b.png"))
    assert record[key] == value
    assert np.abs(made - plain).max() <= 40
