"""Flux.1 (dev, schnell, Kontext, ...): a transformer trained by flow matching that sees 2x2 patches of the
latent as tokens (packed to (B, tokens, 4·C)), reading prompts through T5 and a CLIP's pooled vector, which
diffusers' pipeline encodes. Flux-dev has its guidance distilled into an input of the model (guidance_embeds);
Flux-schnell has none. Kontext (FluxKontextPipeline) edits one reference image (--reference-image); diffusers
has no img2img for it. Flux.2 is another architecture (Flux2Pipeline: `sdcli.families.flux2`)."""

from __future__ import annotations

from typing import Any, Mapping

from sdcli.families import rules
from sdcli.families.base import Family, Rule, transformer_as_unet_arch, unpack_packed

KONTEXT = "FluxKontext"


def guidance(transformer: Any) -> str:
    return "distilled" if transformer.get("guidance_embeds", True) else "none"


def is_kontext(class_name: str | None) -> bool:
    return bool(class_name) and str(class_name).startswith(KONTEXT)


def card_defaults(config: Mapping[str, Any]) -> dict[str, float]:
    """FLUX.1 Kontext [dev]'s card: 28 steps at distilled guidance 2.5 (the other Flux.1 models keep sdcli's)."""
    return {"steps": 28, "distilled_guidance": 2.5} if is_kontext(config.get("pipeline_class")) else {}


def references(class_name: str | None) -> int:
    """Kontext edits one reference image; the other Flux.1 pipelines take none."""
    return 1 if is_kontext(class_name) else 0


def check(s: Any, facts: Any, task: str, samplers: frozenset[str]) -> list[tuple[str, str]]:
    """Kontext's image input is its reference image; diffusers has no img2img (nor so a hires pass) for it, and
    sdcli runs no inpainting of it (a mask is refused by its own name, not as an img2img)."""
    if not is_kontext(facts.class_name):
        return []
    for value, flag in ((s.mask, "--mask"), (s.outpaint, "--outpaint")):
        if value is not None:
            return [(flag, "is not inpainted by sdcli (diffusers' FluxKontextInpaintPipeline is not run by it); edit "
                           "the whole picture, given as --reference-image, with the prompt")]
    return [(flag, "has no img2img in diffusers; give it the image to edit with --reference-image")
            for value, flag in ((s.init_image, "--init-image"), (s.hires_scale, "--hires-scale")) if value is not None]


def call(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Kontext rescales the asked size to ``max_area`` (a megapixel by default): asking for the size's own area
    makes the size asked for, the one the image records."""
    if is_kontext(type(pipe).__name__) and kwargs.get("width") and kwargs.get("height"):
        return {**kwargs, "max_area": kwargs["width"] * kwargs["height"]}
    return kwargs


def encode(pipe, pairs, prompts, device):
    hidden, pooled, _text_ids = pipe.encode_prompt(prompts, None, device=device)  # text_ids are zeros; see below
    return hidden, pooled


def conditioning(hidden, pooled, time_ids):
    import torch

    # FluxPipeline.encode_prompt's text_ids: one all-zero position per text token.
    txt_ids = torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=hidden.dtype)
    return {"encoder_hidden_states": hidden, "pooled_projections": pooled, "txt_ids": txt_ids}


def predict(pipe, model, noisy, timesteps, cond, guidance):
    """Flux sees 2x2 patches of the latent as tokens, with their (row, column) positions as img_ids, and
    takes the timestep divided by 1000 (that is, σ), as FluxPipeline's loop and diffusers' Flux script do."""
    import torch

    b, c, h, w = noisy.shape
    cls = type(pipe)
    packed = cls._pack_latents(noisy, b, c, h, w)
    img_ids = cls._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    # Guidance-distilled Flux (dev) takes the guidance scale as an input; schnell has none.
    g = None if guidance is None else torch.full((b,), float(guidance), device=noisy.device, dtype=torch.float32)
    out = model(hidden_states=packed, timestep=timesteps.to(noisy.dtype) / 1000, guidance=g, img_ids=img_ids,
                return_dict=False, **cond)[0]
    f = pipe.vae_scale_factor
    return cls._unpack_latents(out, h * f, w * f, f)


def sizes(pipe):
    f = pipe.vae_scale_factor
    return pipe.default_sample_size * f, f * 2, None  # 2x2 packing


FAMILY = Family(
    name="flux",
    pipelines=("Flux",),
    single_file_markers=("double_blocks.",),  # the double-stream blocks
    single_file_class="FluxPipeline",
    denoiser="transformer",
    patch=2,
    flow=True,
    unpack_latents=unpack_packed,
    guidance="distilled",
    guidance_of_config=guidance,
    defaults=card_defaults,
    references=references,
    no_embeddings="Flux reads prompts with T5 (and a CLIP for the pooled vector), and an embedding has no T5 vectors",
    ignores=(
        *rules.DIFFUSERS_ENCODES_PROMPTS,
        *rules.FLOW_SAMPLER,
        Rule("--hires-upscaler latent", lambda s: s.hires_scale is not None and s.hires_upscaler == "latent",
             "{model} packs its latents into 2x2 patches, which sdcli does not enlarge; use --hires-upscaler lanczos"),
        *rules.NO_GUIDANCE_RESCALE,
    ),
    check=check,
    call=call,
    arch=transformer_as_unet_arch,
    text_encoders=("text_encoder", "text_encoder_2"),
    encode=encode,
    conditioning=conditioning,
    predict=predict,
    sizes=sizes,
    peft_lora_names=True,
    caches=("first-block", "taylorseer", "mag"),
    mag_ratios="FLUX_MAG_RATIOS",
    gguf_markers=("double_blocks.", "single_transformer_blocks."),
)
