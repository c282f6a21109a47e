"""Z-Image (6B) and Z-Image-Turbo: a single-stream DiT trained by flow matching on 2x2 patches of Flux's VAE
latent, reading prompts through Qwen3 (chat-formatted), which diffusers' pipeline encodes.

Z-Image guides as its model defines it: diffusers' ``guidance_scale`` g extrapolates cond + g·(cond − uncond), so
0 is unguided and the negative prompt is read above 0 (model card: 4, 50 steps). Z-Image-Turbo is step-distilled
(model card: 9 steps, guidance 0) and takes no guidance; the two share every config but the scheduler's static
shift, 3 for Turbo against the base model's 6, which is how sdcli tells them apart.
"""

from __future__ import annotations

from typing import Any, Mapping

from sdcli.families import rules
from sdcli.families.base import Family, Knob

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


def arch(transformer: Any, vae: Any) -> Any:
    """Memory's figures were measured on SD 1.5's UNet; the transformer is estimated as that UNet until its own
    are measured (the VAE is its own)."""
    from sdcli.memory import unet_arch

    return unet_arch({}, dict(vae))


FAMILY = Family(
    name="zimage",
    pipelines=("ZImage",),
    single_file_markers=("layers.0.adaLN_modulation.0.",),  # as diffusers tells Z-Image from Lumina 2 (.1.)
    single_file_class="ZImagePipeline",
    denoiser="transformer",
    patch=2,
    flow=True,
    default_size=default_size,
    guidance="own",
    guidance_of_config=guidance,
    guidance_config="scheduler",
    knob=KNOB,
    defaults=lambda config: {"steps": TURBO_STEPS if guidance(config) == "none" else STEPS},
    no_embeddings="Z-Image reads prompts with Qwen3, and an embedding has vectors for CLIP encoders only",
    ignores=(*rules.DIFFUSERS_ENCODES_PROMPTS, *rules.FLOW_SAMPLER, *rules.NO_GUIDANCE_RESCALE,
             *rules.OWN_GUIDANCE, *rules.IMG2IMG_ONLY),
    arch=arch,
)
