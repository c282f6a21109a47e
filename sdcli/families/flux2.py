"""FLUX.2 (dev) and FLUX.2 Klein: flow-matching transformers that see the VAE's latent patched 2x2 into channels
(packed to (B, tokens, 4·C), normalised by the VAE's batch-norm statistics), reading prompts through the hidden
states of a language model that diffusers' pipeline encodes: Mistral Small 3 (FLUX.2-dev) or Qwen3 (Klein).

Guidance, as each model has it: FLUX.2-dev has its guidance distilled into an input of the transformer
(``guidance_scale`` of Flux2Pipeline: sdcli's --distilled-guidance, no negative prompt); Klein's base models run
classifier-free guidance against a negative prompt (--guidance); its step-distilled models (``is_distilled``) take
none. Both take reference images (``image``: --reference-image), diffusers has no img2img for either; Klein
inpaints (Flux2KleinInpaintPipeline: --init-image with --mask or --outpaint).

Training follows diffusers' FLUX.2 and Klein LoRA scripts: the VAE's latent patched 2x2 into channels and
normalised by its batch-norm statistics, flow matching on the unshifted σ's (the shift depends on the image size
and the steps, applied at sampling), the prompt's stacked hidden states from the pipeline's own encode_prompt (at
its 512 tokens, padding included, as the pipeline feeds them), position ids for the image and text tokens, the
timestep on 0..1, and FLUX.2-dev's distilled guidance as an input (Klein has none). Dropped captions train "",
what Klein's guidance reads. ComfyUI runs FLUX.2 as its Flux model class, whose LoRA loader maps diffusers'
module paths under ``transformer.``; diffusers' FLUX.2 loader reads no alpha tensors, so that file carries
each LoRA's scale in its up-projection.
"""

from __future__ import annotations

from typing import Any, Mapping

from sdcli.families import rules
from sdcli.families.base import Family, Rule

KLEIN = "Flux2Klein"
# Flux2ImageProcessor.check_image_input's limits, checked before loading.
MIN_REFERENCE_SIDE = 64
MAX_REFERENCE_RATIO = 8
MAX_REFERENCES = 10


def is_klein(class_name: str | None) -> bool:
    return bool(class_name) and str(class_name).startswith(KLEIN)


def variant(pipe: Any) -> str:
    return "flux2-klein" if is_klein(type(pipe).__name__) else "flux2"


def guidance(config: Mapping[str, Any]) -> str:
    """From the transformer's config over the pipeline's model_index: a guidance input (dev), or Klein's CFG,
    none where Klein is step-distilled."""
    if config.get("guidance_embeds", True):
        return "distilled"
    return "none" if config.get("is_distilled") else "cfg"


def card_defaults(config: Mapping[str, Any]) -> dict[str, float]:
    """The model cards' settings: FLUX.2-dev 50 steps at guidance 4; Klein base 50 steps at CFG 4; step-
    distilled Klein 4 steps, unguided."""
    kind = guidance(config)
    if kind == "distilled":
        return {"steps": 50, "distilled_guidance": 4.0}
    if kind == "cfg":
        return {"steps": 50, "guidance": 4.0}
    return {"steps": 4}


def unpack_latents(pipe: Any, latents: Any, size: tuple[int, int] | None) -> Any:
    """Packed latents (B, tokens, 4·C) of a ``size`` (width, height) image back to the VAE's raw latents
    (B, C, h, w): the token grid, the batch-norm statistics undone, the 2x2 patches unfolded, as the pipeline
    does before decoding."""
    import torch

    if latents.ndim != 3:
        return latents
    width, height = size
    side = pipe.vae_scale_factor * 2
    b, _tokens, c = latents.shape
    grid = latents.permute(0, 2, 1).reshape(b, c, height // side, width // side)
    bn = pipe.vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(grid.device, grid.dtype)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(grid.device, grid.dtype)
    return type(pipe)._unpatchify_latents(grid * std + mean)


def posterior(vae: Any, pixels: Any) -> tuple[Any, Any]:
    """The latent distribution with its 2x2 patches folded into channels (B, 4·C, h/2, w/2), as the pipelines
    patchify before normalising: a latent pixel of the denoiser is one token, so a loss mask is one per token."""
    from diffusers import Flux2Pipeline

    dist = vae.encode(pixels).latent_dist
    return Flux2Pipeline._patchify_latents(dist.mean), Flux2Pipeline._patchify_latents(dist.std)


def scale_latents(vae: Any, z: Any) -> Any:
    """Patchified latents normalised by the VAE's batch-norm running statistics, as the pipelines do."""
    import torch

    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
    return (z - mean) / std


def encode(pipe: Any, pairs: Any, prompts: list[str], device: Any) -> tuple[Any, None]:
    """The text encoder's stacked hidden states at the pipeline's 512 tokens (Mistral Small 3's with its system
    message on FLUX.2-dev, Qwen3's chat-formatted on Klein); no pooled vector, no mask (the pipeline has none)."""
    hidden, _text_ids = pipe.encode_prompt(prompts, device=device)
    return hidden, None


def predict(pipe: Any, model: Any, noisy: Any, timesteps: Any, cond: dict[str, Any], guidance: Any) -> Any:
    """As the FLUX.2 pipelines' loop: the patchified latent as tokens with their (t, h, w, l) positions, the text
    tokens' positions, the timestep on 0..1, and FLUX.2-dev's guidance input (None on Klein)."""
    import torch

    cls = type(pipe)
    b = noisy.shape[0]
    hidden = cond["encoder_hidden_states"]
    img_ids = cls._prepare_latent_ids(noisy).to(noisy.device)
    g = None if guidance is None else torch.full((b,), float(guidance), device=noisy.device, dtype=torch.float32)
    out = model(hidden_states=cls._pack_latents(noisy), timestep=timesteps.to(noisy.dtype) / 1000, guidance=g,
                encoder_hidden_states=hidden, txt_ids=cls._prepare_text_ids(hidden).to(noisy.device),
                img_ids=img_ids, return_dict=False)[0]
    return cls._unpack_latents_with_ids(out, img_ids)  # FLUX.2-dev's takes no size


def sizes(pipe: Any) -> tuple[int, int, int | None]:
    f = pipe.vae_scale_factor
    return pipe.default_sample_size * f, f * 2, None  # 2x2 patches


def schedule_shift(config: Mapping[str, Any], tokens: int, steps: int) -> tuple[float, list[float]]:
    """μ as the FLUX.2 pipelines compute it (an empirical fit in the token count and the number of steps, not
    Flux.1's line in the token count), and the σ's they give the sampler: 1 down to 1/steps, evenly."""
    import numpy as np

    from sdcli.progress import quiet_libraries

    quiet_libraries()  # the pipeline module imports transformers' image processors, which chatter
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    return compute_empirical_mu(image_seq_len=tokens, num_steps=steps), list(np.linspace(1.0, 1 / steps, steps))


def arch(transformer: Mapping[str, Any], vae: Mapping[str, Any]) -> Any:
    """Memory's figures were measured on SD 1.5's UNet; the transformer is estimated as a UNet whose first level
    has its width per latent pixel (a token covers 2x2 of them) and attends there with its heads."""
    import dataclasses

    from sdcli.memory import unet_arch

    heads = int(transformer.get("num_attention_heads", 48))
    width = heads * int(transformer.get("attention_head_dim", 128))
    return dataclasses.replace(unet_arch({}, dict(vae)), unet_channels=max(1, width // 4), attention_level=1,
                               attention_heads=heads, sample_size=128)


def references(class_name: str | None) -> int:
    """How many --reference-image the pipelines take: up to 10, Black Forest Labs' limit for FLUX.2 (each is
    another image's worth of tokens; the pipeline caps each one's area at a megapixel)."""
    return MAX_REFERENCES


def check(s: Any, facts: Any, task: str, samplers: frozenset[str]) -> list[tuple[str, str]]:
    """Inpainting on FLUX.2-dev, an init image without a mask (img2img), a negative prompt on FLUX.2-dev, and
    reference images the pipeline would reject (Flux2ImageProcessor.check_image_input, a DataError), refused by
    name before loading."""
    from sdcli.errors import DataError
    from sdcli.images import image_size, named

    klein = is_klein(facts.class_name)
    for value, flag in ((s.mask, "--mask"), (s.outpaint, "--outpaint")):
        if value is not None and not klein:
            return [(flag, "has no inpainting in diffusers (FLUX.2 Klein has: Flux2KleinInpaintPipeline)")]
    if s.init_image is not None and s.mask is None and s.outpaint is None:
        return [("--init-image", "has no img2img in diffusers: its input images are references to follow, not a "
                                 "start to denoise from; pass them with --reference-image"
                                 + (" (or inpaint: --init-image with --mask or --outpaint)" if klein else ""))]
    if s.negative_prompt and facts.guidance == "distilled":
        return [("--negative-prompt", "has its guidance distilled into the model (--distilled-guidance), which "
                                      "reads no negative prompt")]
    for source in s.reference_images:
        w, h = image_size(source, what="--reference-image", setting="reference_images")
        if min(w, h) < MIN_REFERENCE_SIDE:
            raise DataError(f"--reference-image {named(source)} is {w}x{h}; {facts.class_name} needs both sides "
                            f"at least {MIN_REFERENCE_SIDE} pixels", setting="reference_images")
        if max(w / h, h / w) > MAX_REFERENCE_RATIO:
            raise DataError(f"--reference-image {named(source)} is {w}x{h}; {facts.class_name} takes aspect ratios "
                            f"up to {MAX_REFERENCE_RATIO}:1", setting="reference_images")
    return []


def call(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The batch's call as the FLUX.2 pipelines take it: FLUX.2-dev has no negative prompt (sdcli refused one);
    Klein takes its negative prompt as embeddings only, which its own encoder makes here (its default is "")."""
    out = dict(kwargs)
    negative = out.pop("negative_prompt", None)
    if negative and type(pipe).__name__.startswith(KLEIN) and out.get("guidance_scale", 1) != 1:
        out["negative_prompt_embeds"] = pipe.encode_prompt(negative, device=pipe._execution_device)[0]
    return out


FAMILY = Family(
    name="flux2",
    pipelines=("Flux2",),
    single_file_markers=("single_stream_modulation.",),  # FLUX.2's shared modulation (Flux.1 has none)
    single_file_class="",  # diffusers loads only its transformer from one file, not the pipeline
    variants=("flux2", "flux2-klein"),
    variant=variant,
    denoiser="transformer",
    patch=2,
    flow=True,
    unpack_latents=unpack_latents,
    task_classes={"inpaint": "Flux2KleinInpaintPipeline"},  # FLUX.2-dev has none (`check` refuses it)
    guidance="distilled",
    guidance_of_config=guidance,
    defaults=card_defaults,
    no_embeddings="FLUX.2 reads prompts through a language model's hidden states, which take no embeddings",
    ignores=(
        *rules.DIFFUSERS_ENCODES_PROMPTS,
        *rules.FLOW_SAMPLER,
        *rules.NO_GUIDANCE_RESCALE,
        Rule("--true-cfg", lambda s: s.true_cfg,
             "{model} has no true classifier-free guidance in diffusers; FLUX.2-dev's guidance is distilled "
             "(--distilled-guidance), FLUX.2 Klein base's is --guidance"),
        Rule("--hires-scale", lambda s: s.hires_scale is not None,
             "{model} has no img2img in diffusers, which hires fix's second pass needs"),
    ),
    check=check,
    call=call,
    schedule_shift=schedule_shift,
    references=references,
    arch=arch,
    text_encoders=("text_encoder",),
    encode=encode,
    predict=predict,
    sizes=sizes,
    posterior=posterior,
    scale_latents=scale_latents,
    peft_lora_names=True,
    references_optional=True,
    comfy_lora_prefix="transformer.",
    comfy_lora_alpha=False,
    gguf_markers=("single_stream_modulation.",),  # in the original names and diffusers'
)
