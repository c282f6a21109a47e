"""The kohya-layout LoRA file a finetune run writes for AUTOMATIC1111 and ComfyUI, read back by plain diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdcli import kohya

QUICK = ("--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "0", "--lr", "1e-2")
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def _render(model, lora=None, text_encoders_by_peft=False):
    """A 16x16 image from plain diffusers, with ``lora`` (a folder or file) loaded by `load_lora_weights`."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        if text_encoders_by_peft:
            for name in ("text_encoder", "text_encoder_2"):
                if getattr(pipe, name, None) is not None:
                    _load_adapter_by_peft(getattr(pipe, name))
        pipe.load_lora_weights(str(lora))
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    return (image * 255).round().astype(np.int16), pipe


def _load_adapter_by_peft(encoder):
    """transformers 5 refuses peft < 0.22 in `load_adapter`, which diffusers calls for text encoders.

    Do what it does with peft's own calls, so everything diffusers does before (reading the file,
    renaming kohya keys, alphas, the rank) still runs; a key that fits no layer fails the test.
    """
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    def load_adapter(adapter_name=None, adapter_state_dict=None, peft_config=None, **_kwargs):
        inject_adapter_in_model(peft_config, encoder, adapter_name)
        result = set_peft_model_state_dict(encoder, adapter_state_dict, adapter_name)
        assert not result.unexpected_keys, result.unexpected_keys

    encoder.load_adapter = load_adapter


def _lora_layers(model):
    return sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A"))


def _assert_every_layer_complete(tensors, meta, rank, alpha):
    suffixes = (".lora_down.weight", ".lora_up.weight", ".alpha")
    layers: dict[str, set[str]] = {}
    for key in tensors:
        suffix = [s for s in suffixes if key.endswith(s)]
        assert suffix, key
        layers.setdefault(key.removesuffix(suffix[0]), set()).add(suffix[0])
    assert layers and all(found == set(suffixes) for found in layers.values())
    for name in layers:
        assert tensors[f"{name}.alpha"].ndim == 0 and tensors[f"{name}.alpha"].item() == alpha
        assert tensors[f"{name}.lora_down.weight"].shape[0] == rank == tensors[f"{name}.lora_up.weight"].shape[1]
    assert meta["ss_network_dim"] == str(rank) and float(meta["ss_network_alpha"]) == alpha
    assert meta["ss_network_module"] == "networks.lora"


# 1. A finetune run, read back by diffusers --------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_kohya_file_gives_the_diffusers_files_image(cli, tiny_models, dataset, tmp_path, family):
    out = tmp_path / "my-lora"
    result = cli("finetune", "--data", dataset, "--model", tiny_models[family], "--out", out, *QUICK,
                 "--rank", "4", "--lora-alpha", "2")
    assert result.exit_code == 0, result.stderr
    kohya_file = out / "my-lora.safetensors"
    assert (out / "pytorch_lora_weights.safetensors").is_file() and kohya_file.is_file()

    tensors, meta = kohya.read(kohya_file)
    _assert_every_layer_complete(tensors, meta, rank=4, alpha=2.0)
    names = {k.split(".")[0] for k in tensors}
    assert all(n.startswith("lora_unet_") for n in names)  # no text encoder was trained
    # kohya's own naming per family: SDXL's SGM blocks, SD 1.x/2.x's diffusers-shaped UNet.
    blocks = ("input_blocks_", "middle_block_", "output_blocks_") if family == "sdxl" else (
        "down_blocks_", "mid_block_", "up_blocks_")
    assert {next(b for b in blocks if n.startswith("lora_unet_" + b)) for n in names} == set(blocks)
    expected_version = {"sd1": "sd_v1", "sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}[family]
    assert meta["ss_base_model_version"] == expected_version and meta["ss_v2"] == str(family == "sd2")
    assert meta["ss_output_name"] == "my-lora" and meta["ss_sd_model_name"] == family
    assert meta["ss_max_train_steps"] == "2" and meta["ss_learning_rate"] == "0.01"

    base, _ = _render(tiny_models[family])
    from_diffusers, _ = _render(tiny_models[family], out)  # the folder: diffusers picks pytorch_lora_weights
    from_kohya, pipe = _render(tiny_models[family], kohya_file)
    assert _lora_layers(pipe.unet)  # the kohya file did load into the UNet
    assert np.abs(from_diffusers - base).max() >= 4  # two steps at this rate visibly change the picture
    assert np.abs(from_kohya - from_diffusers).max() <= 1


def test_lora_format_diffusers_writes_one_file_and_overwrite_removes_the_old_kohya_file(cli, tiny_sd, dataset,
                                                                                        tmp_path):
    out = tmp_path / "run"
    assert cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *QUICK).exit_code == 0
    assert (out / "run.safetensors").is_file()
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *QUICK, "--overwrite",
                 "--lora-format", "diffusers")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["pytorch_lora_weights.safetensors"]
    bad = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "x", "--lora-format", "kohya")
    assert bad.exit_code == 2 and "--lora-format" in bad.stderr


def test_text_encoder_lora_run_when_peft_allows_it(cli, tiny_models, dataset, tmp_path):
    out = tmp_path / "te"
    result = cli("finetune", "--data", dataset, "--model", tiny_models["sdxl"], "--out", out, *QUICK,
                 "--train-text-encoder")
    if result.exit_code == 2 and "do not work together" in result.stderr:
        pytest.skip("this transformers refuses this peft for text-encoder LoRA (see the hand-made test below)")
    assert result.exit_code == 0, result.stderr
    tensors, meta = kohya.read(out / "te.safetensors")
    _assert_every_layer_complete(tensors, meta, rank=4, alpha=4.0)
    assert {k.split("_")[1] for k in tensors} == {"unet", "te1", "te2"}
    from_diffusers, _ = _render(tiny_models["sdxl"], out)
    from_kohya, pipe = _render(tiny_models["sdxl"], out / "te.safetensors")
    assert _lora_layers(pipe.text_encoder) and _lora_layers(pipe.text_encoder_2)
    assert np.abs(from_kohya - from_diffusers).max() <= 1


# 2. Text encoders, by hand: LoRA adapters put on with peft and saved as finetune saves them -----------------


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_text_encoder_layers_load_in_diffusers_to_the_same_image(tiny_models, tmp_path, family):
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model

    from sdcli.training import outputs
    from sdcli.training.config import TEXT_ENCODER_LORA_TARGETS
    from sdcli.families import BY_NAME as FAMILIES

    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    torch.manual_seed(0)
    # Non-zero up weights (init_lora_weights=False), so every layer changes what it computes.
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=UNET_TARGETS))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for encoder in encoders:  # transformers' own add_adapter refuses peft < 0.22
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, init_lora_weights=False,
                                           target_modules=[*TEXT_ENCODER_LORA_TARGETS, "fc1", "fc2"]), encoder)
    out = tmp_path / "hand"
    outputs.save_lora(pipe, FAMILIES[family], pipe.unet, encoders, out)

    tensors, meta = kohya.read(out / "hand.safetensors")
    _assert_every_layer_complete(tensors, meta, rank=4, alpha=2.0)
    prefixes = {"sd1": {"lora_unet", "lora_te"}, "sdxl": {"lora_unet", "lora_te1", "lora_te2"}}[family]
    assert {k.split("_text_model_")[0] if "_text_model_" in k else "lora_unet" for k in tensors} == prefixes
    te = "lora_te1" if family == "sdxl" else "lora_te"
    assert f"{te}_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert f"{te}_text_model_encoder_layers_1_mlp_fc2.alpha" in tensors

    from_diffusers, _ = _render(tiny_models[family], out, text_encoders_by_peft=True)
    from_kohya, loaded = _render(tiny_models[family], out / "hand.safetensors", text_encoders_by_peft=True)
    for encoder in ("text_encoder", "text_encoder_2")[: len(encoders)]:
        assert len(_lora_layers(getattr(loaded, encoder))) == 2 * 6  # two CLIP layers, six targets each
    assert np.abs(from_kohya - from_diffusers).max() <= 1
    # The text encoders' share alone changes the picture, so it cannot have been dropped on both sides.
    unet_only = tmp_path / "unet-only"
    outputs.save_lora(pipe, FAMILIES[family], pipe.unet, [], unet_only)
    without_text, _ = _render(tiny_models[family], unet_only)
    assert np.abs(without_text - from_kohya).max() >= 1


# 3. The names ------------------------------------------------------------------------------------------


def _sdxl_shaped_unet():
    """SDXL's block layout (three levels, two layers per block, attention at levels 1-2, several transformer
    layers) with tiny widths, on the meta device: only its layer names are used."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(
            block_out_channels=(8, 16, 32), layers_per_block=2, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 3), cross_attention_dim=16, attention_head_dim=(2, 4, 8),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=16 + 6 * 4)


def test_sdxl_names_are_sgm_blocks_numbered_from_the_config(tiny_models):
    from diffusers import UNet2DConditionModel

    sdxl = _sdxl_shaped_unet().config  # SDXL's own numbers, as kohya's SDXL files have them
    for path, expected in {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.transformer_blocks.2.attn2.to_out.0": "input_blocks.8.1.transformer_blocks.2.attn2.to_out.0",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.2.1.transformer_blocks.0.ff.net.2",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.resnets.0.conv_shortcut": "output_blocks.3.0.skip_connection",
        "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
        "conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
    }.items():
        assert kohya.unet_name(path, sdxl) == expected, path
    # The tiny UNet: two levels of one layer each, so attention sits in input block 3, not SDXL's 4.
    tiny = UNet2DConditionModel.load_config(tiny_models["sdxl"], subfolder="unet")
    assert kohya.unet_name("down_blocks.1.attentions.0.proj_out", tiny) == "input_blocks.3.1.proj_out"
    assert kohya.unet_name("up_blocks.0.attentions.1.proj_out", tiny) == "output_blocks.1.1.proj_out"
    assert kohya.unet_name("up_blocks.0.upsamplers.0.conv", tiny) == "output_blocks.1.2.conv"
    assert kohya.unet_name("up_blocks.1.resnets.1.conv1", tiny) == "output_blocks.3.0.in_layers.2"
    with pytest.raises(ValueError, match="down_blocks.1.attentions.1.proj_in"):
        kohya.unet_name("down_blocks.1.attentions.1.proj_in", tiny)  # one layer per block: no second attention


@pytest.mark.parametrize("unet_of", ["sd1", "sd2", "sdxl", "sdxl-shaped"])
def test_every_unet_layer_comes_back_to_itself_through_diffusers_loader(tiny_models, unet_of):
    """Every Linear and Conv2d of the UNet (attention, ResBlocks, samplers, embeddings), not only the default
    targets: its kohya name, read by the pipeline class's own `lora_state_dict`, names the same layer."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_unet_state_dict_to_peft

    if unet_of == "sdxl-shaped":
        unet, family = _sdxl_shaped_unet(), "sdxl"
    else:
        unet, family = UNet2DConditionModel.from_pretrained(tiny_models[unet_of], subfolder="unet"), unet_of
    layers = [name for name, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    state = {f"{name}.lora_{half}.weight": torch.zeros(2, 2) for name in layers for half in "AB"}
    converted = kohya.convert({"unet": state}, {"unet": 1.0}, unet.config, family)
    assert len(converted) == 3 * len(layers)

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    read, alphas = cls.lora_state_dict(dict(converted), unet_config=unet.config)
    peft_names = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in read.items()})
    assert {k.rsplit(".lora_", 1)[0] for k in peft_names} == set(layers)
    assert set(alphas.values()) == {1.0} and len(alphas) == len(layers)


def test_text_encoder_names_sit_under_text_model_with_kohyas_prefixes():
    te = {"encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 3),  # transformers 5 CLIPTextModel
          "encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(3, 2)}
    te2 = {"text_model.encoder.layers.1.mlp.fc1.lora.down.weight": torch.ones(2, 3),  # diffusers' spelling
           "text_model.encoder.layers.1.mlp.fc1.lora.up.weight": torch.ones(3, 2)}
    sd = kohya.convert({"text_encoder": te}, {"text_encoder": 8}, {}, "sd2")
    assert sorted(sd) == [f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{p}"
                          for p in ("alpha", "lora_down.weight", "lora_up.weight")]
    assert sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"].dtype == torch.float32
    xl = kohya.convert({"text_encoder": te, "text_encoder_2": te2}, {"text_encoder": 4, "text_encoder_2": 4}, {},
                       "sdxl")
    assert {k.split(".")[0] for k in xl} == {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                             "lora_te2_text_model_encoder_layers_1_mlp_fc1"}


def test_convert_refuses_what_has_no_kohya_layout():
    half = {"encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 3)}
    with pytest.raises(ValueError, match="without its other half"):
        kohya.convert({"text_encoder": half}, {"text_encoder": 1}, {}, "sd1")
    with pytest.raises(ValueError, match="not a LoRA weight"):
        kohya.convert({"text_encoder": {"encoder.layers.0.weight": torch.ones(1)}}, {"text_encoder": 1}, {}, "sd1")
    with pytest.raises(ValueError, match="no kohya LoRA layout for 'flux'"):
        kohya.convert({}, {}, {}, "flux")
    with pytest.raises(ValueError, match="no 'text_encoder_2'"):
        kohya.convert({"text_encoder_2": {}}, {}, {}, "sd1")


def test_kohya_file_is_named_after_out(tmp_path):
    assert kohya.file_name(tmp_path / "my-style") == "my-style.safetensors"
    # A folder named like diffusers' file must not have that file replaced.
    assert kohya.file_name(tmp_path / "pytorch_lora_weights") == "pytorch_lora_weights-kohya.safetensors"


def test_bucket_and_caption_settings_are_in_kohyas_metadata(tmp_path):
    from sdcli.training import FinetuneConfig
    from sdcli.kohya import training_fields

    cfg = FinetuneConfig(data=tmp_path, out=tmp_path / "o", buckets=True, min_bucket=256, max_bucket=1024,
                         upscale=False, shuffle_captions=True, keep_tokens=1, caption_extension=".caption")
    fields = training_fields(cfg)
    assert fields["ss_enable_bucket"] is True and fields["ss_bucket_no_upscale"] is True
    assert (fields["ss_min_bucket_reso"], fields["ss_max_bucket_reso"]) == (256, 1024)
    assert fields["ss_shuffle_caption"] is True and fields["ss_keep_tokens"] == 1
    assert fields["ss_caption_extension"] == ".caption"
    square = training_fields(FinetuneConfig(data=tmp_path, out=tmp_path / "o", buckets=False))
    assert square["ss_enable_bucket"] is False and "ss_min_bucket_reso" not in square
