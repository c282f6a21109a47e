"""`sdcli.memory`: a request that cannot fit is refused in one line before anything heavy loads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from sdcli import memory
from sdcli.families import arch_from_configs
from sdcli.memory import Arch, generation_need, largest_fit, strip_need, training_need
from conftest import one_error_line, paths_of
from conftest import png_header_only

GB = 1 << 30


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a pipeline fails the test: a refusal must come before the weights (and the allocation)."""
    import sdcli.pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(sdcli.pipeline, "load_pipeline", refuse)


def free(monkeypatch, nbytes):
    monkeypatch.setattr(memory, "available_bytes", lambda device: nbytes)


# ---------------------------------------------------------------- generate


def test_impossible_size_is_refused_in_one_line_before_loading(cli, tiny_sd, no_loading):
    t0 = time.perf_counter()
    result = cli("generate", "a red circle", "--model", tiny_sd, "--width", "100000", "--height", "100000",
                 "--seed", "1")
    seconds = time.perf_counter() - t0
    line = one_error_line(result, 1)
    assert line.startswith("error: generating 100000x100000 needs about ") and " TB of memory " in line
    assert " free; " in line and "fits as asked" in line and "SDCLI_MEMORY_CHECK=0" in line
    assert seconds < 30  # config files and arithmetic, not a 100000x100000 latent


def test_available_memory_decides(cli, tiny_sd, monkeypatch):
    args = ("generate", "a red circle", "--model", tiny_sd, "--steps", "1", "--seed", "1,2,3,4", "--batch-size", "4",
            "--device", "cpu")  # the message names the device
    free(monkeypatch, 1_000_000 * GB)
    assert len(paths_of(cli(*args, "--out", "plenty"))) == 4
    free(monkeypatch, 64 << 10)
    line = one_error_line(cli(*args, "--out", "tight"), 1)
    assert line.startswith("error: generating 16x16 x4 at once needs about ") and "cpu has 64 KB free" in line
    # A batch of four costs more than one at a time, so the batch size is named as a help.
    assert "--batch-size 1 needs " in line
    monkeypatch.setenv("SDCLI_MEMORY_CHECK", "0")
    assert len(paths_of(cli(*args, "--out", "anyway"))) == 4


def test_init_image_over_the_pixel_cap_is_refused_from_its_header_before_loading(cli, tiny_sd, tmp_path, no_loading):
    # 12000 x 12000 = 144 megapixels: over the 89,478,485-pixel cap, under twice it (where Pillow itself only warns).
    big = png_header_only(tmp_path / "big.png", 12_000, 12_000)
    line = one_error_line(cli("generate", "a cat", "--model", tiny_sd, "--init-image", big, "--width", "16",
                              "--height", "16"), 1)
    assert "big.png: refused: 12000x12000 pixels is over the 89,478,485-pixel limit" in line


def test_init_image_size_is_what_is_estimated(cli, tiny_sd, tmp_path, monkeypatch, no_loading):
    Image.new("RGB", (64, 32), "red").save(tmp_path / "init.png")
    free(monkeypatch, 64 << 10)
    line = one_error_line(cli("generate", "a cat", "--model", tiny_sd, "--init-image", tmp_path / "init.png"), 1)
    assert line.startswith("error: generating 64x32 needs about ")  # the init image's own size, with no --width


def test_a_request_that_fits_only_quantized_names_the_quantize_that_fits(cli, tiny_flow_models, monkeypatch, tmp_path):
    """A FLUX-size transformer (12 billion linear weights) read as the tiny Flux folder's: 20 GB free holds it in
    int8 (12 GB) but not in float32 (48 GB); with the --quantize named, the same request passes the check."""
    from sdcli.memory import Params

    flux = tiny_flow_models["flux"]
    real = memory.model_params
    monkeypatch.setattr(memory, "model_params", lambda model: {**real(model), "transformer": Params(12 * 10**9, 0)})
    free(monkeypatch, 20 * GB)
    args = ("generate", "a", "--model", flux, "--steps", "1", "-W", "16", "-H", "16", "--seed", "1")
    line = one_error_line(cli(*args, "-o", tmp_path / "a.png"), 1)
    assert "(the weights: 44.7 GB)" in line and "--quantize int8-weight needs 11." in line
    pytest.importorskip("torchao")
    assert len(paths_of(cli(*args, "--quantize", "int8-weight", "-o", tmp_path / "b.png"))) == 1


def test_weights_per_mode():
    from sdcli.memory import Params, weights_bytes
    from sdcli.quantize import resolve

    params = {"transformer": Params(10**9, 10**7, castable=10**9), "text_encoder_2": Params(10**8, 0),
              "vae": Params(0, 10**7)}
    kw = dict(nbytes=2, denoiser="transformer", text_encoders=("text_encoder_2",))
    plain = weights_bytes(params, **kw)
    assert plain == 2 * (10**9 + 10**7 + 10**8 + 10**7)
    int8 = weights_bytes(params, quantize=resolve("int8-weight", "cpu"), **kw)
    nf4 = weights_bytes(params, quantize=resolve("nf4", "cuda"), **kw)
    assert int8 == pytest.approx(plain - 10**9, rel=0.01) and nf4 < int8 - 4 * 10**8
    both = weights_bytes(params, quantize=resolve("int8-weight", "cpu"), quantize_text_encoder=True, **kw)
    assert both == pytest.approx(int8 - 10**8, rel=0.01)
    assert weights_bytes(params, storage_float8=True, **kw) == pytest.approx(int8, rel=0.01)
    assert weights_bytes(params, denoiser_file_bytes=5 * 10**8, **kw) == plain - 2 * (10**9 + 10**7) + 5 * 10**8
    # A safetensors denoiser file loads in --dtype: --quantize (with --quantize-text-encoder) quantizes T5 alone.
    encoders_only = weights_bytes(params, quantize=resolve("int8-weight", "cpu"), quantize_text_encoder=True,
                                  denoiser_from_file=True, **kw)
    assert encoders_only == pytest.approx(plain - 10**8, rel=0.01)
    assert weights_bytes(params, offload="model", **kw) == 2 * (10**9 + 10**7)  # the largest model at a time
    assert weights_bytes(params, offload="sequential", **kw) == 0


def test_weights_are_counted_from_the_folders_headers(tiny_flow_models):
    import torch
    from diffusers import FluxTransformer2DModel

    found = memory.model_params(tiny_flow_models["flux"])
    model = FluxTransformer2DModel.from_pretrained(tiny_flow_models["flux"], subfolder="transformer")
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert found["transformer"].linear == linear
    assert found["transformer"].linear + found["transformer"].other == sum(p.numel() for p in model.parameters())
    assert set(found) >= {"transformer", "vae", "text_encoder", "text_encoder_2"}


# ---------------------------------------------------------------- inspect-schedule


def test_strip_too_large_is_refused_before_any_file_is_written(cli, tmp_path):
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    t0 = time.perf_counter()
    result = cli("inspect-schedule", "--preset", "cosine", "--image", tmp_path / "red.png", "--out", "strip.png",
                 "--plot", "plot.png", "--size", "100000")
    line = one_error_line(result, 1)
    assert line.startswith("error: --size 100000 (1 x 6 tiles of 100000x75000) needs about ")
    assert "--size " in line.split("free; ")[1] and "fewer --at timesteps than 6" in line
    assert not (tmp_path / "strip.png").exists() and not (tmp_path / "plot.png").exists()
    assert time.perf_counter() - t0 < 60


def test_strip_check_uses_the_vae_with_latent(cli, tiny_sd, tmp_path, monkeypatch):
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    args = ("inspect-schedule", "--preset", "cosine", "--image", tmp_path / "red.png", "--out", "strip.png",
            "--size", "64", "-q")
    pixels, _ = strip_need(64, 48, 6, 1, source_pixels=64 * 48)
    free(monkeypatch, pixels.total + 1)  # enough for the pixel-space strip, not for decoding six frames too
    assert cli(*args).exit_code == 0
    line = one_error_line(cli(*args, "--latent", "--model", tiny_sd, "--overwrite"), 1)
    assert "(the VAE decode: " in line


def test_strip_image_over_the_pixel_cap_is_refused(cli, tmp_path):
    big = png_header_only(tmp_path / "big.png", 12_000, 12_000)
    line = one_error_line(cli("inspect-schedule", "--preset", "cosine", "--image", big, "--out", "s.png"), 1)
    assert "--image" in line and "refused: 12000x12000 pixels" in line


# ---------------------------------------------------------------- the arithmetic


def test_four_times_the_pixels_is_at_least_four_times_the_memory():
    for options in ({}, {"streams": False}, {"vae_tiling": True}, {"attention_slicing": True}):
        small, large = generation_need(Arch(), 512, 512, **options), generation_need(Arch(), 1024, 1024, **options)
        assert large.terms["latents"] >= 4 * small.terms["latents"]
        assert large.terms["UNet activations"] >= 4 * small.terms["UNet activations"]
        if not options.get("vae_tiling"):  # tiling caps the VAE at one tile; everything else grows 4x or more
            assert large.total >= 4 * small.total
    # Materialised attention grows with the square of the tokens: 16x for 4x the pixels.
    assert (generation_need(Arch(), 1024, 1024, streams=False).terms["UNet attention scores"]
            == 16 * generation_need(Arch(), 512, 512, streams=False).terms["UNet attention scores"])


def test_tiling_lowers_the_vae_term_only_past_one_tile():
    plain, tiled = generation_need(Arch(), 2048, 2048), generation_need(Arch(), 2048, 2048, vae_tiling=True)
    assert tiled.terms["VAE decode"] * 15 < plain.terms["VAE decode"]  # 512x512 tiles of a 2048x2048 image
    assert tiled.total < plain.total
    assert (generation_need(Arch(), 512, 512, vae_tiling=True).terms["VAE decode"]
            == generation_need(Arch(), 512, 512).terms["VAE decode"])  # one tile is the whole image


def test_attention_slicing_helps_only_where_sdpa_would_materialise():
    math_path = generation_need(Arch(), 1024, 1024, streams=False, batch=2)
    sliced = generation_need(Arch(), 1024, 1024, streams=False, batch=2, attention_slicing=True)
    streamed = generation_need(Arch(), 1024, 1024, batch=2)
    assert "UNet attention scores" not in streamed.terms
    # Half of one image's 8 heads at a time (4 rows), against every head of 2 images x 2 for guidance (32).
    assert sliced.terms["UNet attention scores"] * 8 == math_path.terms["UNet attention scores"]
    assert streamed.total < sliced.total < math_path.total


def test_guidance_batch_and_dtype_scale_the_unet():
    base = generation_need(Arch(), 512, 512, guidance=False)
    assert generation_need(Arch(), 512, 512).terms["UNet activations"] == 2 * base.terms["UNet activations"]
    assert generation_need(Arch(), 512, 512, guidance=False, batch=3).terms["UNet activations"] == \
        3 * base.terms["UNet activations"]
    assert generation_need(Arch(), 512, 512, guidance=False, nbytes=2).total < base.total


def test_arch_from_sdxl_like_configs():
    unet = {"block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "sample_size": 128}
    vae = {"block_out_channels": [128, 256, 512, 512], "sample_size": 1024, "force_upcast": True}
    arch = arch_from_configs(unet, vae, "StableDiffusionXLPipeline")
    assert (arch.attention_level, arch.attention_heads, arch.vae_factor, arch.vae_tile) == (1, 10, 8, 1024)
    assert arch.vae_upcast and not arch_from_configs(unet, vae, "StableDiffusionPipeline").vae_upcast
    # Level 1's tokens are a quarter of level 0's: 1024x1024 has 64x64 of them there, not 128x128.
    scores = generation_need(arch, 1024, 1024, streams=False, guidance=False).terms["UNet attention scores"]
    assert scores == 2 * 10 * (64 * 64) ** 2 * 4
    assert arch_from_configs({}, {}) == Arch()


@pytest.mark.parametrize("vae,factor", [
    ({"encoder_block_out_channels": [8, 8, 8, 8, 8, 8]}, 32),  # a deep-compression VAE (Sana's)
    ({"temperal_downsample": [False, True, True]}, 8),  # a Wan-style VAE (Qwen-Image's)
    ({"spatial_compression_ratio": 16}, 16),
])
def test_the_vae_factor_is_read_as_diffusers_reads_it(vae, factor):
    # The activations and the decode scale with the latent's size: a factor-32 VAE taken for 8 estimates 16x the
    # latent pixels.
    from sdcli.memory import unet_arch

    assert unet_arch({}, vae).vae_factor == factor


def test_tiny_model_arch_is_read_from_its_folder(tiny_sd):
    from sdcli.families import model_arch

    arch = model_arch(tiny_sd)
    config = json.loads((Path(tiny_sd) / "unet" / "config.json").read_text())
    assert arch.vae_factor == 2 and arch.unet_channels == config["block_out_channels"][0] == 16
    assert arch.attention_level == 1 and arch.sample_size == 8


def test_largest_fit_fits_and_one_step_more_does_not():
    need = lambda w, h: generation_need(Arch(), w, h).total  # noqa: E731
    budget = 6 * GB
    w, h = largest_fit(need, 4096, 2048, 8, budget)
    assert need(w, h) <= budget < need(w + 16, h + 8)
    assert abs(w / h - 2) < 0.05  # the same shape
    assert largest_fit(need, 4096, 2048, 8, 1) is None


def test_refusal_names_the_largest_part_and_the_helps():
    with pytest.raises(memory.ResourceError) as err:
        memory.refuse("generating 2048x2048", generation_need(Arch(), 2048, 2048), "cuda:0", 4 * GB,
                      ["--vae-tiling needs 3.8 GB"])
    text = str(err.value)
    assert "\n" not in text and err.value.exit_code == 1
    assert text.startswith("generating 2048x2048 needs about 16.1 GB of memory (the VAE decode: 16.0 GB), "
                           "and cuda:0 has 4.0 GB free; --vae-tiling needs 3.8 GB")


def test_ram_available_is_read_and_plausible():
    found = memory.ram_available()
    assert found is None or 0 < found < 1 << 50


# finetune: one step's memory and the outputs' disk space, estimated once the model is known and before anything
# is encoded or trained (`check_training`). `--resolution 16384` used to die in the VAE, `--rank 100000` to write
# gigabytes.

FINETUNE = ("--max-steps", "1", "--batch-size", "2", "--checkpoint-every", "0")


def test_training_need_grows_with_batch_and_area_and_checkpointing_lowers_it():
    arch = Arch()
    base = training_need(arch, 512, batch=1, trained=1_000, new=1_000)
    assert training_need(arch, 512, batch=4, trained=1_000, new=1_000).total > 3 * base.total
    assert training_need(arch, 1024, batch=1, trained=1_000, new=1_000).total > 3.5 * base.total
    lower = training_need(arch, 512, batch=1, trained=1_000, new=1_000, checkpointing=True)
    assert lower.terms["denoiser activations"] < base.terms["denoiser activations"] and lower.total <= base.total
    full = training_need(arch, 512, batch=1, trained=860_000_000, new=0)  # SD 1.5's UNet in full: ~10 GB beside it
    assert full.largest()[0] == "gradients and optimizer state" and full.total > 10e9
    # SD 1.5 at 16384 pixels: far past any machine.
    assert training_need(arch, 16384, batch=1, trained=1_000, new=1_000).total > 500 * 2**30


@pytest.mark.parametrize("args", [["--resolution", "4096"], ["--resolution", "1024", "--batch-size", "8"],
                                  ["--resolution", "16384"]])
def test_finetune_that_cannot_fit_is_refused_in_one_line_before_training(cli, tiny_sd, dataset, tmp_path,
                                                                          monkeypatch, args):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 << 20)
    out = tmp_path / "out"
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *FINETUNE, *args)
    line = one_error_line_after_notes(result, 1)
    assert "needs about" in line and "(the " in line and "64.0 MB free" in line
    assert "--resolution" in line and "fits" in line
    assert not (out / "pytorch_lora_weights.safetensors").exists() and not (out / "loss.csv").exists()


def test_finetune_rank_past_the_layers_sizes_is_refused(cli, tiny_sd, dataset, tmp_path):
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "o", *FINETUNE,
                 "--rank", "100000")
    line = one_error_line_after_notes(result, 2)
    assert "--rank 100000 is larger than the" in line and "use at most" in line


def test_finetune_whose_weights_cannot_fit_on_disk_is_refused(cli, tiny_sd, dataset, tmp_path, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "o", *FINETUNE,
                 "--checkpoint-every", "1")
    line = one_error_line_after_notes(result, 1)
    assert "--out" in line and "need about" in line and "1 KB free" in line


def one_error_line_after_notes(result, code):
    """finetune's set-up notes come first; then one error line and nothing else."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    return errors[0]


@pytest.mark.parametrize("env, shards", [({}, 1), ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, 2),
                                         ({"ACCELERATE_USE_DEEPSPEED": "true"}, 2)],
                         ids=["data-parallel", "fsdp2", "deepspeed"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_finetune_memory_counts_one_shard_of_what_trains_under_fsdp(tiny_sd, tmp_path, monkeypatch, env, shards,
                                                                    lora):
    """accelerate's FSDP2 config on 2 processes: each holds half of the trained weights, gradients and Adam state,
    so the step estimate counts half (a full fine-tune that fits only sharded is not refused)."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline

    from sdcli.families import training_family

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    family = training_family(pipe)
    cfg = SimpleNamespace(lora=lora, lora_targets=["to_k", "to_q", "to_v", "to_out.0"], rank=4,
                          train_text_encoder=False, lora_format="diffusers", checkpoint_every=0, keep_checkpoints=1,
                          out=tmp_path / "out", batch_size=1, gradient_checkpointing=False, mixed_precision="no",
                          use_8bit_adam=False, ema=False, resolutions=(16,))
    seen = []
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 50)
    monkeypatch.setattr(memory, "training_need", lambda *a, **kw: seen.append(kw) or memory.Need(0, {}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    memory.check_training(cfg, pipe, family, "cpu")
    whole = (sum(4 * (i + o) for _, i, o in memory.lora_layers(pipe.unet, tuple(cfg.lora_targets))) if lora
             else sum(p.numel() for p in pipe.unet.parameters()))
    assert seen[0]["trained"] == -(-whole // shards)
