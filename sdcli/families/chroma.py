"""Chroma (Chroma1-HD, -Base, and their finetunes): Flux.1-schnell pruned to 8.9B and de-distilled, so a
transformer trained by flow matching on 2x2-packed latents of Flux's VAE, reading prompts through T5 alone (with
its attention mask), which diffusers' pipeline encodes.

Its guidance is real classifier-free guidance against the negative prompt, diffusers' ``guidance_scale``, run only
above 1 (diffusers' Chroma docs: 3, 40 steps). Its resolution-dependent shift is Flux's μ. diffusers has its
img2img pipeline (ChromaImg2ImgPipeline) outside AutoPipeline's tables, so the family names it.
"""

from __future__ import annotations

from typing import Any

from sdcli.families import rules
from sdcli.families.base import Family, Knob

KNOB = Knob("guidance_scale", default=3.0)
STEPS = 40  # diffusers' Chroma1-HD example


def unpack_latents(pipe: Any, latents: Any, size: tuple[int, int] | None) -> Any:
    """Packed latents (B, tokens, 4·C) back to (B, C, h, w), for an image of ``size`` (width, height) pixels."""
    if latents.ndim != 3:
        return latents
    width, height = size
    return type(pipe)._unpack_latents(latents, height, width, pipe.vae_scale_factor)


def arch(transformer: Any, vae: Any) -> Any:
    """Memory's figures were measured on SD 1.5's UNet; the transformer is estimated as that UNet until its own
    are measured (the VAE is its own)."""
    from sdcli.memory import unet_arch

    return unet_arch({}, dict(vae))


FAMILY = Family(
    name="chroma",
    pipelines=("Chroma",),
    single_file_markers=("distilled_guidance_layer.",),  # the small network that replaced Flux's modulation
    single_file_class="ChromaPipeline",
    denoiser="transformer",
    patch=2,
    flow=True,
    unpack_latents=unpack_latents,
    task_classes={"img2img": "ChromaImg2ImgPipeline"},
    guidance="own",
    knob=KNOB,
    defaults=lambda config: {"steps": STEPS},
    no_embeddings="Chroma reads prompts with T5 alone, and an embedding has no T5 vectors",
    ignores=(*rules.DIFFUSERS_ENCODES_PROMPTS, *rules.FLOW_SAMPLER, *rules.NO_GUIDANCE_RESCALE,
             *rules.OWN_GUIDANCE, *rules.IMG2IMG_ONLY),
    arch=arch,
)
