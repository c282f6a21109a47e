"""Settings that do nothing on more than one family, as `Rule`s a family lists in its ``ignores``.

A setting the model would ignore must be refused, not recorded: an image's record names only what made it.
"""

from __future__ import annotations

from pathlib import Path

from sdcli.families.base import Rule

ENCODED_BY_SDCLI = "SD 1.x, 2.x and XL, whose prompts sdcli encodes itself"


# What only sdcli's own prompt encoder reads: nothing, on a family whose prompts diffusers encodes.
DIFFUSERS_ENCODES_PROMPTS = (
    Rule("--clip-skip", lambda s: s.clip_skip != 1,
         f"{{model}} reads its prompts through diffusers' own encoders; clip skip works on {ENCODED_BY_SDCLI}"),
    Rule("--prompt-syntax a1111", lambda s: s.a1111_prompt(),
         "{model} reads prompts as plain text, so the weights, BREAK or escapes of {given!r} would reach it as "
         f"literal characters (they work on {ENCODED_BY_SDCLI}); drop them, or pass --prompt-syntax plain to mean "
         "them as text"),
    Rule("--embedding", lambda s: ", ".join(Path(path).name for path, _token in s.embeddings),
         "{given}: textual-inversion embeddings need a Stable Diffusion 1.x, 2.x or XL model, whose CLIP encoders "
         "sdcli loads them into; {model} reads its prompts through diffusers' own encoders and would not read them"),
)

# sdcli's samplers and their spacing: nothing, on a family that samples with its own flow-matching Euler sampler.
FLOW_SAMPLER = (
    Rule("--scheduler", lambda s: s.scheduler,
         "sdcli's samplers are DDPM samplers (noise or v prediction); {model} is a flow-matching model and samples "
         "with its own flow-matching Euler sampler (--sigmas respaces it)"),
    Rule("--timestep-spacing", lambda s: s.timestep_spacing,
         "{model}'s flow-matching sampler has no timestep spacing (--sigmas respaces its σ's)"),
)

# Guidance rescale belongs to diffusers' UNet pipelines.
NO_GUIDANCE_RESCALE = (
    Rule("--guidance-rescale", lambda s: any(s.guidance_rescale),
         "{model} has no guidance rescale (it belongs to the UNet pipelines)"),
)

# Flux.1's guidance switches: nothing, on a family whose --guidance is its pipeline's own argument (`Knob`).
OWN_GUIDANCE = (
    Rule("--true-cfg", lambda s: s.true_cfg,
         "{model}'s --guidance is its own classifier-free guidance already (--true-cfg is Flux.1's)"),
    Rule("--distilled-guidance", lambda s: s.distilled_guidance is not None,
         "{model} has no distilled guidance input; its --guidance is its own classifier-free guidance"),
)

# The newer flow families' latents are packed or patched in their own ways, which sdcli does not enlarge (hires
# fix's lanczos pass, an img2img of the decoded enlargement, works on them).
NO_LATENT_UPSCALE = (
    Rule("--hires-upscaler latent", lambda s: s.hires_scale is not None and s.hires_upscaler == "latent",
         "sdcli does not enlarge {model}'s latents; use --hires-upscaler lanczos"),
)

# What a newer flow family with its own guidance argument ignores (Chroma, Z-Image, Qwen-Image): all of the above.
OWN_GUIDANCE_FLOW = (*DIFFUSERS_ENCODES_PROMPTS, *FLOW_SAMPLER, *NO_GUIDANCE_RESCALE, *OWN_GUIDANCE, *NO_LATENT_UPSCALE)
