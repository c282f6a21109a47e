"""What training does differently for each model family, as data: one `TrainingFamily` per family.

SD 1.x/2.x and SDXL train a UNet on DDPM's objective (ε or v, as the scheduler says); SD3 and Flux
train a transformer by flow matching. A family names the pipeline attribute that trains, the text
encoders that feed it, how prompts become its conditioning (the pipeline's own `encode_prompt` for
SD3 and Flux, so training sees exactly what generation feeds the model), how one prediction is made
from noisy latents, what sizes it takes, and how its LoRA is saved. The rest of `sdcli.training`
asks the family instead of testing names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from sdcli.errors import ModelError


@dataclass(frozen=True)
class TrainingFamily:
    name: str
    denoiser: str  # the pipeline attribute that trains: "unet" or "transformer"
    flow: bool  # flow matching (x_t = (1 − σ)·x_0 + σ·ε, target ε − x_0) rather than DDPM (ε or v)
    text_encoders: tuple[str, ...]  # pipeline attributes, each with its tokenizer ("text_encoder_2" -> "tokenizer_2")
    # (pipe, [(tokenizer, encoder)], prompts, device) -> (hidden states (B, L, D), pooled (B, D') or None)
    encode: Callable[..., tuple[Any, Any]]
    # (hidden, pooled, time_ids) -> the denoiser's keyword arguments besides the latents and the timestep
    conditioning: Callable[..., dict[str, Any]]
    # (pipe, model, noisy latents, timesteps on the scheduler's 0..T axis, cond, guidance) -> prediction like noisy
    predict: Callable[..., Any] | None
    # pipe -> (native size, sizes must be multiples of this, largest size or None), in pixels
    sizes: Callable[[Any], tuple[int, int, int | None]]
    zeros_for_empty_prompt: bool = False  # honours the pipeline's force_zeros_for_empty_prompt (SDXL)
    peft_lora_names: bool = False  # save peft's key names, as diffusers' transformer LoRA scripts do
    guidance: str = "cfg"  # classifier-free guidance, or "distilled" into a model input (Flux-dev)

    def guidance_of(self, pipe: Any) -> str:
        """"cfg", "distilled" (the denoiser takes a guidance scale as an input: Flux-dev) or "none" (a distilled
        family's model without that input: Flux-schnell)."""
        if self.guidance != "distilled":
            return self.guidance
        return "distilled" if getattr(pipe, self.denoiser).config.get("guidance_embeds", False) else "none"

    def encoders(self, pipe: Any) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs the pipeline has, in the order the family uses them."""
        pairs = []
        for name in self.text_encoders:
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                pairs.append((getattr(pipe, name.replace("text_encoder", "tokenizer"), None), encoder))
        return pairs


# 1. Text: prompts to conditioning --------------------------------------------------------------------


def _encode_sd(pipe, pairs, prompts, device):
    tokenizer, encoder = pairs[0]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return encoder(ids, return_dict=False)[0], None


def _encode_sdxl(pipe, pairs, prompts, device):
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


def _encode_sd3(pipe, pairs, prompts, device):
    # Both CLIPs' penultimate layers beside T5's tokens, and both pooled projections, at the pipeline's own
    # max_sequence_length: exactly what generation feeds the transformer.
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False)
    return hidden, pooled


def _encode_flux(pipe, pairs, prompts, device):
    hidden, pooled, _text_ids = pipe.encode_prompt(prompts, None, device=device)  # text_ids are zeros; see below
    return hidden, pooled


def _cond_unet(hidden, pooled, time_ids):
    return {"encoder_hidden_states": hidden}


def _cond_sdxl(hidden, pooled, time_ids):
    return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def _cond_sd3(hidden, pooled, time_ids):
    return {"encoder_hidden_states": hidden, "pooled_projections": pooled}


def _cond_flux(hidden, pooled, time_ids):
    import torch

    # FluxPipeline.encode_prompt's text_ids: one all-zero position per text token.
    txt_ids = torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=hidden.dtype)
    return {"encoder_hidden_states": hidden, "pooled_projections": pooled, "txt_ids": txt_ids}


# 2. One prediction ----------------------------------------------------------------------------------


def _predict_sd3(pipe, model, noisy, timesteps, cond, guidance):
    # As StableDiffusion3Pipeline's loop: the timestep on the 0..1000 axis (σ·1000).
    return model(hidden_states=noisy, timestep=timesteps, return_dict=False, **cond)[0]


def _predict_flux(pipe, model, noisy, timesteps, cond, guidance):
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


# 3. Sizes -------------------------------------------------------------------------------------------


def _sizes_unet(pipe):
    f = pipe.vae_scale_factor
    config = pipe.unet.config
    return config.sample_size * f, f * 2 ** (len(config.block_out_channels) - 1), None


def _sizes_sd3(pipe):
    f = pipe.vae_scale_factor
    config = pipe.transformer.config
    # The transformer's position embedding covers pos_embed_max_size patches a side, and no more.
    largest = config.pos_embed_max_size * config.patch_size * f if config.pos_embed_max_size else None
    return pipe.default_sample_size * f, f * config.patch_size, largest


def _sizes_flux(pipe):
    f = pipe.vae_scale_factor
    return pipe.default_sample_size * f, f * 2, None  # 2x2 packing


_UNET = dict(denoiser="unet", flow=False, predict=None, sizes=_sizes_unet)
_SD = dict(_UNET, text_encoders=("text_encoder",), encode=_encode_sd, conditioning=_cond_unet)
_FLOW = dict(denoiser="transformer", flow=True, peft_lora_names=True)

FAMILIES = {
    "sd1": TrainingFamily("sd1", **_SD),
    "sd2": TrainingFamily("sd2", **_SD),
    "sdxl": TrainingFamily("sdxl", **_UNET, text_encoders=("text_encoder", "text_encoder_2"), encode=_encode_sdxl,
                           conditioning=_cond_sdxl, zeros_for_empty_prompt=True),
    "sd3": TrainingFamily("sd3", **_FLOW, text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
                          encode=_encode_sd3, conditioning=_cond_sd3, predict=_predict_sd3, sizes=_sizes_sd3),
    "flux": TrainingFamily("flux", **_FLOW, text_encoders=("text_encoder", "text_encoder_2"), encode=_encode_flux,
                           conditioning=_cond_flux, predict=_predict_flux, sizes=_sizes_flux, guidance="distilled"),
}
def family_of(pipe: Any, loaded_family: str | None = None) -> TrainingFamily:
    """The training family of a loaded pipeline; ModelError for one finetune cannot train."""
    from sdcli.pipeline import pipe_family

    name = type(pipe).__name__
    # The class decides every family but SD's, whose 1.x and 2.x only the loaded weights tell apart (sdcli.pipeline).
    spec = pipe_family(pipe)  # ModelError for a class of no family (Flux2Pipeline is not Flux.1)
    key = loaded_family if spec.name == "sd" else spec.name
    if key not in FAMILIES:
        raise ModelError(f"finetune supports Stable Diffusion 1.x, 2.x, XL, 3 and Flux pipelines; this model is a "
                         f"{loaded_family or name}")
    return FAMILIES[key]

