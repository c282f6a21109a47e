"""Chroma (Chroma1-HD, -Base, and their finetunes): Flux.1-schnell pruned to 8.9B and de-distilled, so a
transformer trained by flow matching on 2x2-packed latents of Flux's VAE, reading prompts through T5 alone (with
its attention mask), which diffusers' pipeline encodes.

Its guidance is real classifier-free guidance against the negative prompt, diffusers' ``guidance_scale``, run only
above 1 (diffusers' Chroma docs: 3, 40 steps). Its resolution-dependent shift is Flux's μ. diffusers has its
img2img pipeline (ChromaImg2ImgPipeline) outside AutoPipeline's tables, so the family names it.

Training (no diffusers script for Chroma; it is Flux's objective): flow matching on the unshifted σ's (the
shift is resolution-dependent, applied at sampling), the transformer called as ChromaPipeline calls it, T5's
tokens with their mask. ComfyUI's Chroma is its Flux model class, whose LoRA loader maps diffusers' module paths
under ``transformer.``.
"""

from __future__ import annotations

from typing import Any

from sdcli.families import rules
from sdcli.families.base import Family, Knob, masked_conditioning, transformer_as_unet_arch, unpack_packed

KNOB = Knob("guidance_scale", default=3.0)
STEPS = 40  # diffusers' Chroma1-HD example


def encode(pipe: Any, pairs: Any, prompts: list[str], device: Any) -> tuple[Any, Any]:
    """T5's tokens at the pipeline's 512 and their mask (the prompt and one padding token, as Chroma's own)."""
    hidden, _text_ids, mask, *_ = pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
    return hidden, mask


def predict(pipe: Any, model: Any, noisy: Any, timesteps: Any, cond: dict[str, Any], guidance: Any) -> Any:
    """As ChromaPipeline's loop: 2x2-packed latents with their positions, all-zero text positions, the text mask
    followed by the image tokens', and the timestep on 0..1."""
    import torch

    b, c, h, w = noisy.shape
    cls = type(pipe)
    packed = cls._pack_latents(noisy, b, c, h, w)
    img_ids = cls._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    hidden = cond["encoder_hidden_states"]
    txt_ids = torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=hidden.dtype)
    mask = pipe._prepare_attention_mask(b, packed.shape[1], hidden.dtype, cond["text_mask"].to(hidden.dtype))
    out = model(hidden_states=packed, timestep=timesteps.to(noisy.dtype) / 1000, encoder_hidden_states=hidden,
                txt_ids=txt_ids, img_ids=img_ids, attention_mask=mask, return_dict=False)[0]
    f = pipe.vae_scale_factor
    return cls._unpack_latents(out, h * f, w * f, f)


def call(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """ChromaInpaintPipeline reads ``guidance_embeds`` off the transformer's config, which Chroma1-HD's config.json
    carries (false: Chroma has no guidance input) but a config diffusers writes itself lacks; said so, it runs."""
    if "mask_image" in kwargs and "guidance_embeds" not in pipe.transformer.config:
        pipe.transformer.register_to_config(guidance_embeds=False)
    return kwargs


def sizes(pipe: Any) -> tuple[int, int, int | None]:
    f = pipe.vae_scale_factor
    return pipe.default_sample_size * f, f * 2, None  # 2x2 packing


FAMILY = Family(
    name="chroma",
    pipelines=("Chroma",),
    single_file_markers=("distilled_guidance_layer.",),  # the small network that replaced Flux's modulation
    single_file_class="ChromaPipeline",
    denoiser="transformer",
    patch=2,
    flow=True,
    unpack_latents=unpack_packed,
    task_classes={"img2img": "ChromaImg2ImgPipeline", "inpaint": "ChromaInpaintPipeline"},
    guidance="own",
    knob=KNOB,
    defaults=lambda config: {"steps": STEPS},
    no_embeddings="Chroma reads prompts with T5 alone, and an embedding has no T5 vectors",
    ignores=rules.OWN_GUIDANCE_FLOW,
    call=call,
    arch=transformer_as_unet_arch,
    text_encoders=("text_encoder",),
    encode=encode,
    conditioning=masked_conditioning,
    predict=predict,
    sizes=sizes,
    peft_lora_names=True,
    text_mask=True,
    comfy_lora_prefix="transformer.",
    gguf_markers=("distilled_guidance_layer.",),  # in both namings; Flux.1's blocks too, so before Flux
)
