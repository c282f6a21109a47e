"""Stable Diffusion XL: a UNet on DDPM's objective, conditioned on two CLIPs (CLIP-L and OpenCLIP-G) and on
the image's size and crop (time ids); its VAE decodes in float32 when it asks to (force_upcast)."""

from __future__ import annotations

from typing import Any

from sdcli.families.base import ONE_CLIP, TWO_CLIPS, Family, KohyaLayout


def a1111(pipe: Any) -> str | None:
    # The refiner has only the second encoder; a pipeline without it is read as SD's one CLIP.
    if getattr(pipe, "text_encoder_2", None) is not None:
        return TWO_CLIPS
    return ONE_CLIP if getattr(pipe, "text_encoder", None) is not None else None


def arch(unet, vae):
    from sdcli.memory import unet_arch

    return unet_arch(dict(unet), dict(vae), upcast=True)


def encode(pipe, pairs, prompts, device):
    """The penultimate layer of each encoder side by side; the pooled projection of the second one
    (as StableDiffusionXLPipeline.encode_prompt). Through ``pairs``, which may be accelerate-prepared."""
    import torch

    hidden, pooled = [], None
    for tokenizer, encoder in pairs:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        if out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def conditioning(hidden, pooled, time_ids):
    return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


FAMILY = Family(
    name="sdxl",
    pipelines=("StableDiffusionXL",),
    single_file_markers=("conditioner.embedders.1",),  # the second text encoder of Stability's SGM layout
    single_file_class="StableDiffusionXLPipeline",
    a1111=a1111,
    embedding_parts={"clip_l": "text_encoder", "clip_g": "text_encoder_2"},
    controlnet=True,
    arch=arch,
    text_encoders=("text_encoder", "text_encoder_2"),
    encode=encode,
    conditioning=conditioning,
    zeros_for_empty_prompt=True,
    kohya={"sdxl": KohyaLayout("sdxl_base_v1-0", {"unet": "lora_unet", "text_encoder": "lora_te1",
                                                  "text_encoder_2": "lora_te2"}, sgm_unet=True, v_suffix=False)},
    gguf_markers=("label_emb.", "add_embedding."),  # the pooled text and size conditioning
)
