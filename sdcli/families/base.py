"""What a model family is to sdcli: plain data and a few hook functions (`Family`), and the pieces families share.

A family module (`sd`, `sdxl`, `sd3`, `flux`) fills in one `Family`; the rest of sdcli asks it (through
`sdcli.families`) instead of testing class names or family names. Defaults are a UNet family's, so a family
states only where it differs. torch and diffusers are imported inside the hooks that need them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# The layouts of sdcli's own AUTOMATIC1111 prompt encoder (`sdcli.generation.prompts`): one CLIP's last layer
# (SD 1.x/2.x), or two CLIPs' penultimate layers side by side with the second one's pooled vector (SDXL).
ONE_CLIP = "one-clip"
TWO_CLIPS = "two-clips"


@dataclass(frozen=True)
class Rule:
    """A setting that does nothing on a family: ``given`` says whether these settings ask for it (the value to
    name, or something false), ``why`` completes "{flag}: ..." ({model} is the pipeline class, {given} the value)."""

    flag: str
    given: Callable[[Any], Any]
    why: str


@dataclass(frozen=True)
class KohyaLayout:
    """How kohya's sd-scripts name a LoRA of one model of the family (`sdcli.kohya`)."""

    version: str  # ss_base_model_version
    prefixes: Mapping[str, str]  # the model each LoRA part adapts ("unet", "text_encoder", ...) -> kohya's prefix
    sgm_unet: bool = False  # the UNet named by Stability's SGM blocks (SDXL), not by diffusers' module paths
    v_suffix: bool = True  # a v-prediction model's version gains "_v" (sd_v2_v)
    v2: bool = False  # ss_v2


def pipeline_default_size(pipe: Any) -> tuple[int, int]:
    """The pipeline's own default image size in pixels: its default sample size (the UNet's, where the pipeline
    does not say) times the VAE factor."""
    sample = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    sample = sample if isinstance(sample, int) else sample[0]
    return sample * pipe.vae_scale_factor, sample * pipe.vae_scale_factor


def unet_sizes(pipe: Any) -> tuple[int, int, int | None]:
    """Training sizes of a UNet: (native, multiple, largest or None) in pixels; every down level halves the side."""
    f = pipe.vae_scale_factor
    config = pipe.unet.config
    return config.sample_size * f, f * 2 ** (len(config.block_out_channels) - 1), None


def unet_conditioning(hidden: Any, pooled: Any, time_ids: Any) -> dict[str, Any]:
    return {"encoder_hidden_states": hidden}


def masked_conditioning(hidden: Any, mask: Any, time_ids: Any) -> dict[str, Any]:
    """A family whose ``encode`` gives the token mask beside the hidden states (``text_mask``)."""
    return {"encoder_hidden_states": hidden, "text_mask": mask}


def unet_arch(denoiser: Mapping[str, Any], vae: Mapping[str, Any]) -> Any:
    from sdcli.memory import unet_arch as arch

    return arch(dict(denoiser), dict(vae))


def vae_posterior(vae: Any, pixels: Any) -> tuple[Any, Any]:
    """Pixels (B, 3, H, W) in [−1, 1] -> the VAE's latent distribution, its mean and std (B, C, h, w), raw."""
    dist = vae.encode(pixels).latent_dist
    return dist.mean, dist.std


def vae_scale(vae: Any, z: Any) -> Any:
    """Raw VAE latents -> the latents the denoiser works on (`sdcli.latents.scale`)."""
    from sdcli.latents import scale

    return scale(vae, z)


def padded_tokens(embeds: list[Any]) -> tuple[Any, Any]:
    """Per-prompt token embeddings of different lengths (L_i, D) -> (B, L, D) padded with zeros after each
    prompt, and its token mask (B, L), true on the prompt's own tokens."""
    import torch

    longest = max(e.shape[0] for e in embeds)
    hidden = embeds[0].new_zeros(len(embeds), longest, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), longest, dtype=torch.bool, device=embeds[0].device)
    for i, e in enumerate(embeds):
        hidden[i, :e.shape[0]] = e
        mask[i, :e.shape[0]] = True
    return hidden, mask


def keep_latents(pipe: Any, latents: Any, size: tuple[int, int] | None) -> Any:
    return latents


def unpack_packed(pipe: Any, latents: Any, size: tuple[int, int] | None) -> Any:
    """Latents packed 2x2 into tokens (B, tokens, 4·C), as Flux's pipelines and their kind keep them, back to the
    pipeline's own latent layout for an image of ``size`` (width, height), by the pipeline's own `_unpack_latents`."""
    if latents.ndim != 3:
        return latents
    width, height = size
    return type(pipe)._unpack_latents(latents, height, width, pipe.vae_scale_factor)


def transformer_as_unet_arch(transformer: Mapping[str, Any], vae: Mapping[str, Any]) -> Any:
    """Memory's figures were measured on SD 1.5's UNet; a transformer is estimated as that UNet until its own are
    measured (the VAE is its own)."""
    from sdcli.memory import unet_arch

    return unet_arch({}, dict(vae))


def vae_decode(pipe: Any, latents: Any) -> Any:
    """Latents (B, C, h, w) as the denoiser sees them -> pixels (B, 3, H, W) in about [−1, 1]."""
    from sdcli.latents import decode

    return decode(pipe.vae, latents)


def block_factor(vae: Mapping[str, Any]) -> int:
    """The VAE's downsampling factor from its config (`sdcli.configs.vae_factor`)."""
    from sdcli.configs import vae_factor

    return vae_factor(vae)


def no_references(class_name: str | None) -> int:
    return 0


@dataclass(frozen=True)
class Knob:
    """A pipeline's own guidance argument, which --guidance sets as the model defines it (guidance kind "own").

    At or below ``unguided`` the pipeline runs one pass a step and reads no negative prompt; above it, it
    guides against the negative prompt. ``null_negative`` is what a guided pass is given where the user gave
    no negative prompt: the model card's, for a pipeline that guides only with one (Qwen-Image's " ").
    """

    argument: str  # the __call__ argument: guidance_scale, true_cfg_scale
    default: float  # the model card's value
    unguided: float = 1.0
    null_negative: str | None = None

    def guides(self, value: float) -> bool:
        return value > self.unguided


@dataclass(frozen=True, eq=False)  # a family is itself: compared and hashed by identity
class Family:
    """One model family. The sections follow the issue's list of what a family owns."""

    # 1. Recognising the model
    name: str  # sd, sdxl, sd3, flux
    pipelines: tuple[str, ...]  # prefixes of its diffusers pipeline class names (every task)
    single_file_markers: tuple[str, ...] = ()  # keys only its single-file checkpoints have
    single_file_class: str = ""  # the pipeline class such a checkpoint loads as
    variants: tuple[str, ...] = ()  # what records call its models, where not just ``name`` (sd1, sd2)
    variant: Callable[[Any], str] | None = None  # pipe -> which of ``variants`` it is
    # (folder or Hub id, its model_index.json, revision) -> components the family builds itself and diffusers'
    # from_pretrained takes as given (Qwen-Image-Edit's processor where torchvision does not import); {}: none
    parts: Callable[[str, Mapping[str, Any], str | None], dict[str, Any]] | None = None

    # 2. Sizes and latents
    denoiser: str = "unet"  # the pipeline attribute that predicts the noise or velocity
    patch: int = 1  # sizes are multiples of the VAE factor times this (SD3's patches, Flux's 2x2 packing)
    default_size: Callable[[Any], tuple[int, int]] = pipeline_default_size  # pipe -> (width, height)
    flow: bool = False  # flow matching: x_t = (1 − σ)·x_0 + σ·ε, predicting ε − x_0 (else DDPM's ε or v)
    unpack_latents: Callable[..., Any] = keep_latents  # (pipe, latents, (width, height)) -> (B, C, h, w)
    decode: Callable[[Any, Any], Any] = vae_decode  # (pipe, unpacked latents) -> pixels, for trajectory frames
    vae_factor: Callable[[Mapping[str, Any]], int] = block_factor  # VAE config -> its downsampling factor
    # The diffusers class each task runs, where AutoPipeline's tables have none for the family ("img2img": ...)
    task_classes: Mapping[str, str] = field(default_factory=dict)
    # pipeline class name -> how many --reference-image it takes (editing models: FLUX.1 Kontext, FLUX.2,
    # Qwen-Image-Edit); 0: none
    references: Callable[[str | None], int] = no_references
    # (pipe, reference images, asked width, asked height) -> the size an edit makes where -W/-H leave it open, as the
    # family's pipeline computes it (None: the first reference's, shrunk to the model's default area)
    edit_size: Callable[..., tuple[int, int]] | None = None
    # (denoiser config, VAE factor) -> the largest (width, height) in pixels the denoiser has positions for, where
    # they come from a table of fixed length (SD3's position embedding, Z-Image's RoPE table); None: no such limit
    positions: Callable[[Mapping[str, Any], int], tuple[int, int] | None] | None = None

    # 3. Guidance
    # "cfg": classifier-free guidance; "distilled": a guidance input (Flux-dev); "own": the pipeline's ``knob``
    guidance: str = "cfg"
    # config -> "cfg"/"distilled"/"none"; config is ``guidance_config``'s (the denoiser's where "") over the
    # pipeline's (model_index.json), with the pipeline's class name as "pipeline_class"
    guidance_of_config: Callable[[Mapping[str, Any]], str] | None = None
    guidance_config: str = ""  # the component whose config guidance_of_config reads ("": the denoiser's)
    knob: Knob | None = None  # guidance "own": the pipeline's own guidance argument (`Knob`)
    # config (as above) -> the model card's defaults where they differ from sdcli's: "steps", "guidance",
    # "distilled_guidance" (`sdcli.generation.run.settle_defaults`, `sdcli.generation.guidance`)
    defaults: Callable[[Mapping[str, Any]], Mapping[str, float]] | None = None

    # 4. Prompts, embeddings, ControlNet
    a1111: Callable[[Any], str | None] | None = None  # pipe -> ONE_CLIP/TWO_CLIPS; None: diffusers encodes
    embedding_parts: Mapping[str, str] | None = None  # an embedding file's part -> the text encoder it goes to
    no_embeddings: str = ""  # why the family takes no textual-inversion embeddings (embedding_parts None)
    controlnet: bool = False  # sdcli runs diffusers' ControlNets on it

    # 5. Which settings do nothing on it: refused in one line before loading (`sdcli.generation.applies`)
    ignores: tuple[Rule, ...] = ()
    # (settings, facts, task name, sdcli's sampler class names) -> [(flag, why)]: the settings this model cannot
    # honour, where that depends on the model, not only the family (the generic family asks its pipeline's
    # __call__); ``why`` completes "{flag}: {model} ...". Checked before ``ignores``. What is wrong with an input file
    # rather than the command line it may raise itself (a DataError).
    check: Callable[[Any, Any, str, frozenset[str]], list[tuple[str, str]]] | None = None
    # (pipe, call kwargs) -> the kwargs its pipeline takes (the generic family drops what its __call__ lacks)
    call: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None
    # (model, facts, scheduler config, --shift) -> None or ModelError: a schedule inspect-schedule cannot show
    check_schedule: Callable[..., None] | None = None
    # (scheduler config, image tokens, steps) -> (μ, the σ's its pipeline gives the sampler): a resolution-dependent
    # shift its pipeline computes its own way (FLUX.2); None: Flux.1's, from the token count (`sdcli.schedule.core`)
    schedule_shift: Callable[[Mapping[str, Any], int, int], tuple[float, list[float] | None]] | None = None

    # 6. Memory: (denoiser config, VAE config) -> `sdcli.memory.Arch`
    arch: Callable[[Mapping[str, Any], Mapping[str, Any]], Any] = unet_arch

    # 7. Training (`sdcli.training`); a family without ``encode`` cannot be fine-tuned
    text_encoders: tuple[str, ...] = ()  # pipeline attributes, each with its tokenizer (text_encoder_2 -> tokenizer_2)
    # (pipe, [(tokenizer, encoder)], prompts, device) -> (hidden states (B, L, D), pooled (B, D') or None)
    encode: Callable[..., tuple[Any, Any]] | None = None
    # (hidden, pooled, time_ids) -> the denoiser's keyword arguments besides the latents and the timestep
    conditioning: Callable[..., dict[str, Any]] = unet_conditioning
    # (pipe, model, noisy latents, timesteps on the scheduler's 0..T axis, cond, guidance) -> prediction like noisy;
    # None: the UNet's own call
    predict: Callable[..., Any] | None = None
    sizes: Callable[[Any], tuple[int, int, int | None]] = unet_sizes  # pipe -> (native, multiple, largest or None)
    zeros_for_empty_prompt: bool = False  # honours the pipeline's force_zeros_for_empty_prompt (SDXL)
    peft_lora_names: bool = False  # save peft's key names, as diffusers' transformer LoRA scripts do
    # ``encode``'s second tensor is the prompt's token mask (B, L), not a pooled vector: its prompts encode to
    # different lengths, which a cache pads (masked) to its longest
    text_mask: bool = False
    posterior: Callable[[Any, Any], tuple[Any, Any]] = vae_posterior  # (VAE, pixels) -> latent mean, std (raw)
    scale_latents: Callable[[Any, Any], Any] = vae_scale  # (VAE, raw latents) -> the denoiser's latents
    # Its pipelines that take --reference-image make images from the prompt alone too (FLUX.2), so finetune
    # trains them text-to-image; else such a pipeline is an editing model, which finetune refuses
    references_optional: bool = False

    # 8. LoRA files: each variant's kohya layout (none: diffusers' format only)
    kohya: Mapping[str, KohyaLayout] = field(default_factory=dict)
    # Where ComfyUI reads LoRAs under diffusers' module paths: the prefix its loader maps them from for this
    # family ("diffusion_model.", "transformer."); finetune writes that file beside diffusers' ("": none)
    comfy_lora_prefix: str = ""
    # That file keeps kohya's ``.alpha`` per layer; False: a LoRA's alpha / rank folded into its up-projection
    # instead, for a family whose diffusers loader refuses alpha tensors (FLUX.2), so diffusers reads it too
    comfy_lora_alpha: bool = True

    # 9. Big models on small cards (`sdcli.quantize`): the step caches diffusers has hooks for on its denoiser
    # (--cache: first-block, taylorseer, mag), the name of diffusers' calibrated MagCache ratios for it
    # (`diffusers.hooks.mag_cache`), and the tensor names that mark its denoiser in a file of its own (GGUF or
    # safetensors: `sdcli.denoiser_file`), in diffusers' naming or the original one (none: no such file loads into it)
    caches: tuple[str, ...] = ()
    mag_ratios: str = ""
    gguf_markers: tuple[str, ...] = ()

    def claims(self, class_name: str) -> bool:
        """A class of the family: its prefix, then no version digit (Flux2Pipeline is another model than Flux.1)."""
        return any(class_name.startswith(prefix) and not class_name[len(prefix):][:1].isdigit()
                   for prefix in self.pipelines)

    @property
    def null_prompt(self) -> str:
        """What the model's unguided branch reads where no negative prompt is given: the model card's (the
        knob's ``null_negative``, Qwen-Image's " ") or the empty prompt. finetune drops captions to it."""
        from sdcli.defaults import NULL_PROMPT

        knob = self.knob
        return knob.null_negative if knob is not None and knob.null_negative is not None else NULL_PROMPT

    def record_name(self, pipe: Any) -> str:
        """What records and messages call this model: sd1 or sd2 for SD, the family's name otherwise."""
        return self.variant(pipe) if self.variant else self.name

    def guidance_for(self, config: Mapping[str, Any] | None) -> str:
        """"cfg", "distilled" or "none" (a distilled family's model without the input: Flux-schnell), from the
        denoiser's config where the family's guidance depends on it."""
        return self.guidance_of_config(config or {}) if self.guidance_of_config else self.guidance

    def guidance_of(self, pipe: Any) -> str:
        return self.guidance_for(self.config_of(pipe) if self.guidance_of_config else None)

    def config_of(self, pipe: Any) -> dict[str, Any]:
        """What ``guidance_of_config`` and ``defaults`` read, of a pipeline in memory: its ``guidance_config``
        component's config (the denoiser's) over its own (model_index.json's), with the pipeline's class name as
        ``pipeline_class``."""
        part = getattr(pipe, self.guidance_config or self.denoiser)
        return {**dict(pipe.config), **dict(part.config), "pipeline_class": type(pipe).__name__}

    def defaults_for(self, config: Mapping[str, Any] | None) -> dict[str, float]:
        return dict(self.defaults(config or {})) if self.defaults else {}

    def encoders(self, pipe: Any) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs the pipeline has, in the order the family uses them."""
        pairs = []
        for name in self.text_encoders:
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                pairs.append((getattr(pipe, name.replace("text_encoder", "tokenizer"), None), encoder))
        return pairs
