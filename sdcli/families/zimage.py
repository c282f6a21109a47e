"""Z-Image (6B) and Z-Image-Turbo: a single-stream DiT trained by flow matching on 2x2 patches of Flux's VAE
latent, reading prompts through Qwen3 (chat-formatted), which diffusers' pipeline encodes.

Z-Image guides as its model defines it: diffusers' ``guidance_scale`` g extrapolates cond + g·(cond − uncond), so
0 is unguided and the negative prompt is read above 0 (model card: 4, 50 steps). Z-Image-Turbo is step-distilled
(model card: 9 steps, guidance 0) and takes no guidance; the two share every config but the scheduler's static
shift, 3 for Turbo against the base model's 6, which is how sdcli tells them apart.

Training follows diffusers' Z-Image LoRA script: flow matching on the scheduler's σ's, which carry its static
shift; the transformer sees each latent as a one-frame list entry, each prompt's own tokens, and the reversed
timestep (1 − σ), and predicts x_0 − ε, so its output is negated. ComfyUI runs Z-Image as its Lumina 2 model,
whose LoRA loader maps diffusers' module paths (to_q/to_k/to_v into its fused qkv) under ``diffusion_model.``.
"""

from __future__ import annotations

from typing import Any, Mapping

from sdcli.families import rules
from sdcli.families.base import Family, Knob, masked_conditioning, padded_tokens, transformer_as_unet_arch

KNOB = Knob("guidance_scale", default=4.0, unguided=0.0)
STEPS = 50  # the base model's card
TURBO_STEPS = 9  # Turbo's card: 9 steps, 8 evaluations of the model
TURBO_SHIFT = 3.0


def guidance(scheduler: Mapping[str, Any]) -> str:
    """"none" for Turbo (its scheduler's shift 3), "own" for the base model (6) and anything else."""
    return "none" if float(scheduler.get("shift", 1.0)) == TURBO_SHIFT else "own"


def default_size(pipe: Any) -> tuple[int, int]:
    # ZImagePipeline's own: 1024 a side, whatever its configs say.
    return 1024, 1024


def encode(pipe: Any, pairs: Any, prompts: list[str], device: Any) -> tuple[Any, Any]:
    """Qwen3's tokens of each chat-formatted prompt, as long as that prompt (padded to the longest, masked)."""
    embeds, _ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
    return padded_tokens(embeds)


def predict(pipe: Any, model: Any, noisy: Any, timesteps: Any, cond: dict[str, Any], guidance: Any) -> Any:
    """As ZImagePipeline's loop: lists of one-frame latents and of each prompt's own tokens, the timestep as
    (1000 − t) / 1000, and the output negated (the model predicts x_0 − ε)."""
    import torch

    tokens = [h[m] for h, m in zip(cond["encoder_hidden_states"], cond["text_mask"].bool())]
    latents = list(noisy.unsqueeze(2).unbind(dim=0))
    out = model(latents, (1000 - timesteps.to(noisy.dtype)) / 1000, tokens, return_dict=False)[0]
    return -torch.stack([o.float() for o in out], dim=0).squeeze(2).to(noisy.dtype)


def positions(transformer: Mapping[str, Any], factor: int) -> tuple[int, int]:
    """Z-Image's RoPE is a table of ``axes_lens`` positions per axis (caption/frame, height, width), one per patch:
    an image with more patches a side than its axis has positions fails inside the transformer (an IndexError)."""
    _frames, rows, columns = transformer.get("axes_lens", (1024, 512, 512))  # diffusers' defaults
    patch = transformer.get("all_patch_size", (2,))[0] * factor
    return columns * patch, rows * patch


def sizes(pipe: Any) -> tuple[int, int, int | None]:
    largest = min(positions(pipe.transformer.config, pipe.vae_scale_factor))
    return default_size(pipe)[0], pipe.vae_scale_factor * 2, largest  # 2x2 patches


FAMILY = Family(
    name="zimage",
    pipelines=("ZImage",),
    single_file_markers=("layers.0.adaLN_modulation.0.",),  # as diffusers tells Z-Image from Lumina 2 (.1.)
    single_file_class="ZImagePipeline",
    denoiser="transformer",
    patch=2,
    flow=True,
    default_size=default_size,
    positions=positions,
    guidance="own",
    guidance_of_config=guidance,
    guidance_config="scheduler",
    knob=KNOB,
    defaults=lambda config: {"steps": TURBO_STEPS if guidance(config) == "none" else STEPS},
    no_embeddings="Z-Image reads prompts with Qwen3, and an embedding has vectors for CLIP encoders only",
    ignores=rules.OWN_GUIDANCE_FLOW,
    arch=transformer_as_unet_arch,
    text_encoders=("text_encoder",),
    encode=encode,
    conditioning=masked_conditioning,
    predict=predict,
    sizes=sizes,
    peft_lora_names=True,
    text_mask=True,
    comfy_lora_prefix="diffusion_model.",
    gguf_markers=("layers.0.adaLN_modulation.0.",),  # both namings; Lumina 2's is .1. (original) or norm1
)
