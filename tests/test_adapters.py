"""LoRA, DoRA, LoHa and LoKr: trained by finetune --adapter, saved in diffusers' and kohya's/LyCORIS's layouts,
loaded by generate --lora, and checked against plain diffusers and the lycoris-lora package's own application."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdcli import kohya

QUICK = ("--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "0", "--rank", "4", "--lora-alpha", "2")
PROMPT = "a red circle"


def _pipe(model):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    image = pipe(PROMPT, num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    return (image * 255).round().astype(np.int16)


def _sdcli_image(model, lora):
    """The image with ``lora`` loaded the way generate --lora loads it."""
    from sdcli.generation.engine import load_loras

    pipe = _pipe(model)
    load_loras(pipe, [(str(lora), 1.0)])
    return _image(pipe)


def _lycoris_image(model, file):
    """The image with ``file``'s UNet layers applied by the lycoris-lora package's own modules, found by kohya's
    names as its `create_network_from_weights` finds them (which builds a default network first, and that
    cannot be built on a diffusers UNet)."""
    from lycoris.kohya import get_module, make_module
    from safetensors.torch import load_file

    pipe = _pipe(model)
    weights = load_file(str(file))
    applied = 0
    for name, layer in list(pipe.unet.named_modules()):
        lora_name = f"lora_unet_{name}".replace(".", "_")
        if f"{lora_name}.alpha" in weights:
            kind, params = get_module(weights, lora_name)
            module = make_module(kind, params, lora_name, layer)
            module.multiplier = 1.0
            module.apply_to()
            applied += 1
    assert applied == len({key.split(".")[0] for key in weights})
    return _image(pipe)


def _finetune(cli, model, data, out, adapter, *extra):
    result = cli("finetune", "--data", data, "--model", model, "--out", out, "--adapter", adapter, *QUICK,
                 "--lr", "0.1", *extra)
    assert result.exit_code == 0, result.stderr
    return out


# 1. A run of each adapter on SD 1.x: its two files, plain diffusers, and LyCORIS's own reading of the kohya file


@pytest.mark.parametrize("adapter", ["dora", "loha", "lokr"])
def test_sd_adapter_files_give_one_image_in_sdcli_diffusers_and_lycoris(cli, tiny_sd, dataset, tmp_path, adapter):
    pytest.importorskip("lycoris")
    out = _finetune(cli, tiny_sd, dataset, tmp_path / "run", adapter)
    kohya_file = out / "run.safetensors"
    tensors, meta = kohya.read(kohya_file)
    wanted = {"dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
              "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
              "lokr": {"lokr_w1", "lokr_w2", "alpha"}}[adapter]
    assert {key.split(".", 1)[1] for key in tensors} == wanted and all(k.startswith("lora_unet_") for k in tensors)
    assert meta["ss_network_module"] == "lycoris.kohya" and adapter.removeprefix("do") in meta["ss_network_args"]

    base = _image(_pipe(tiny_sd))
    from_out = _sdcli_image(tiny_sd, out)  # the folder: pytorch_lora_weights.safetensors, diffusers' layout
    assert np.abs(from_out - base).max() >= 3  # what trained shows
    assert np.abs(_sdcli_image(tiny_sd, kohya_file) - from_out).max() <= 1
    # AUTOMATIC1111, Forge and ComfyUI apply LyCORIS files as the lycoris package does (alpha / dim, a LoKr
    # with whole factors at scale 1, dora_scale per output row).
    assert np.abs(_lycoris_image(tiny_sd, kohya_file) - from_out).max() <= 1

    plain = _pipe(tiny_sd)
    if adapter == "dora":
        plain.load_lora_weights(str(out))
    elif adapter == "lokr":  # diffusers reads LoKr through the model's loader only
        plain.unet.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    else:
        with pytest.raises(ValueError):  # diffusers has no LoHa loader: the README and model card say so
            plain.load_lora_weights(str(out))
        return
    assert np.abs(_image(plain) - from_out).max() <= 1


# 2. Files the lycoris-lora package made, as kohya's sd-scripts with --network_module lycoris.kohya makes them


@pytest.mark.parametrize("algo,args", [("loha", {}), ("lokr", {}), ("lokr", {"factor": 4}),
                                       ("lora", {"dora_wd": True})], ids=["loha", "lokr", "lokr-factor4", "dora"])
def test_lycoris_packages_file_loads_to_the_image_it_gives(tiny_sd, tmp_path, algo, args):
    pytest.importorskip("lycoris")
    from lycoris.kohya import create_network

    pipe = _pipe(tiny_sd)
    torch.manual_seed(0)
    network = create_network(1.0, 4, 2, pipe.vae, pipe.text_encoder, pipe.unet, algo=algo, preset="attn-mlp", **args)
    network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    with torch.no_grad():  # every factor non-zero (LyCORIS starts from a zero one)
        for name, param in network.named_parameters():
            param.copy_(param * (1 + 0.2 * torch.rand_like(param)) if "dora_scale" in name
                        else torch.randn_like(param) * 0.3)
    reference = _image(pipe)
    file = tmp_path / f"{algo}.safetensors"
    network.save_weights(str(file), torch.float32, {})
    assert any(key.startswith("lora_te_") for key in kohya.read(file)[0])  # the text encoder's layers too

    assert np.abs(reference - _image(_pipe(tiny_sd))).max() >= 10
    assert np.abs(_sdcli_image(tiny_sd, file) - reference).max() <= 1


def test_generate_cli_loads_a_loha_and_unloads_it_after(cli, tiny_sd, dataset, tmp_path):
    """Through the real command, twice in one engine: with the LoHa, then without (the adapter removed)."""
    from sdcli.generation import Engine, Settings

    out = _finetune(cli, tiny_sd, dataset, tmp_path / "run", "loha")
    result = cli("generate", "--model", tiny_sd, "--lora", out / "run.safetensors", PROMPT, "--steps", "2",
                 "--width", "16", "--height", "16", "--seed", "0", "-o", tmp_path / "x.png")
    assert result.exit_code == 0, result.stderr
    engine = Engine.load(Settings(prompts=[PROMPT], model=tiny_sd, device="cpu"))
    with_it = engine.generate(PROMPT, seeds=[0], steps=2, width=16, height=16, loras=[(str(out), 1.0)])
    without = engine.generate(PROMPT, seeds=[0], steps=2, width=16, height=16)
    assert not any("hada" in name for name, _ in engine.pipe.unet.named_parameters())
    assert np.asarray(with_it[0].image).tolist() != np.asarray(without[0].image).tolist()


# 3. Every family sdcli trains


@pytest.mark.parametrize("family,adapter", [("sdxl", "lokr"), ("sd2", "loha"), ("sd3", "dora"), ("flux", "loha")])
def test_each_family_trains_and_loads_its_adapter(cli, tiny_models, tiny_flow_models, dataset, tmp_path, family,
                                                  adapter):
    model = {**tiny_models, **tiny_flow_models}[family]
    out = _finetune(cli, model, dataset, tmp_path / "run", adapter)
    from_out = _sdcli_image(model, out)
    # Two steps of LoHa on the tiny Flux move few pixels (one factor starts at zero): any change shows it loaded.
    assert np.abs(from_out - _image(_pipe(model))).max() >= 1
    kohya_file = out / "run.safetensors"
    if family in ("sd3", "flux"):  # no kohya layout: diffusers' file only
        assert not kohya_file.exists()
    else:
        assert np.abs(_sdcli_image(model, kohya_file) - from_out).max() <= 1


def test_adapter_refusals_name_the_option(cli, tiny_sd, dataset, tmp_path, no_pipeline_loads):
    from conftest import one_error_line

    full = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "a", "--full",
               "--adapter", "loha")
    assert "--adapter loha" in one_error_line(full, 2) and "--full" in full.stderr
    unknown = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "b", "--adapter", "ia3")
    assert unknown.exit_code == 2 and "--adapter" in unknown.stderr
    assert not no_pipeline_loads
