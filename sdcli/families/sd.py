"""Stable Diffusion 1.x and 2.x: a UNet on DDPM's objective (ε for 1.x, v for 2.x-768), one CLIP text encoder.

diffusers' StableDiffusion* classes (every task); a single-file checkpoint with no other family's marker loads as
one. 1.x and 2.x share every class, so only the loaded weights tell them apart (`variant`).
"""

from __future__ import annotations

from typing import Any

from sdcli.families.base import ONE_CLIP, Family, KohyaLayout


def variant(pipe: Any) -> str:
    """sd2 for OpenCLIP's 1024-wide conditioning or a v-prediction scheduler, sd1 otherwise."""
    unet = pipe.unet.config
    if unet.get("cross_attention_dim") == 1024 or pipe.scheduler.config.get("prediction_type") == "v_prediction":
        return "sd2"
    return "sd1"


def a1111(pipe: Any) -> str | None:
    return ONE_CLIP if getattr(pipe, "text_encoder", None) is not None else None


def encode(pipe, pairs, prompts, device):
    tokenizer, encoder = pairs[0]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return encoder(ids, return_dict=False)[0], None


_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}

FAMILY = Family(
    name="sd",
    pipelines=("StableDiffusion",),
    single_file_class="StableDiffusionPipeline",
    variants=("sd1", "sd2"),
    variant=variant,
    a1111=a1111,
    embedding_parts={"": "text_encoder"},
    controlnet=True,
    text_encoders=("text_encoder",),
    encode=encode,
    kohya={"sd1": KohyaLayout("sd_v1", _PREFIXES), "sd2": KohyaLayout("sd_v2", _PREFIXES, v2=True)},
    # After SDXL, whose UNet has them too; a time embedding, which a VAE's down_blocks lack
    gguf_markers=("input_blocks.", "time_embedding.linear_1."),
)
