"""Stable Diffusion 3 and 3.5: an MMDiT transformer trained by flow matching on 2x2 patches of the latent,
reading prompts through two CLIPs and T5, which diffusers' pipeline encodes (sdcli's prompt syntax does not
reach it)."""

from __future__ import annotations

from sdcli.families import rules
from sdcli.families.base import Family, transformer_as_unet_arch


def encode(pipe, pairs, prompts, device):
    # Both CLIPs' penultimate layers beside T5's tokens, and both pooled projections, at the pipeline's own
    # max_sequence_length: exactly what generation feeds the transformer.
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False)
    return hidden, pooled


def conditioning(hidden, pooled, time_ids):
    return {"encoder_hidden_states": hidden, "pooled_projections": pooled}


def predict(pipe, model, noisy, timesteps, cond, guidance):
    # As StableDiffusion3Pipeline's loop: the timestep on the 0..1000 axis (σ·1000).
    return model(hidden_states=noisy, timestep=timesteps, return_dict=False, **cond)[0]


def positions(transformer, factor):
    """The transformer's position embedding covers pos_embed_max_size patches a side, and no more (diffusers'
    PatchEmbed raises past it)."""
    most = transformer.get("pos_embed_max_size")
    side = most * transformer.get("patch_size", 2) * factor if most else None
    return (side, side) if side else None


def sizes(pipe):
    f = pipe.vae_scale_factor
    config = pipe.transformer.config
    largest = positions(config, f)
    return pipe.default_sample_size * f, f * config.patch_size, largest[0] if largest else None


FAMILY = Family(
    name="sd3",
    pipelines=("StableDiffusion3",),
    single_file_markers=("joint_blocks.",),  # the MMDiT's joint blocks
    single_file_class="StableDiffusion3Pipeline",
    denoiser="transformer",
    patch=2,
    flow=True,
    positions=positions,
    no_embeddings=("Stable Diffusion 3 reads prompts with three text encoders (two CLIPs and T5) and an embedding "
                   "has vectors for at most the two CLIPs"),
    ignores=(*rules.DIFFUSERS_ENCODES_PROMPTS, *rules.FLOW_SAMPLER, *rules.NO_GUIDANCE_RESCALE),
    arch=transformer_as_unet_arch,
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    encode=encode,
    conditioning=conditioning,
    predict=predict,
    sizes=sizes,
    peft_lora_names=True,
    gguf_markers=("joint_blocks.", "pos_embed.proj."),  # before Flux, whose diffusers names share the rest
)
