"""Qwen-Image (20B) and its editing models, Qwen-Image-Edit and -Edit-Plus: an MMDiT trained by flow matching on
2x2 patches of a Wan-style video VAE's latent (one frame, normalised by per-channel means and deviations rather
than a scale), reading prompts through Qwen2.5-VL, which diffusers' pipeline encodes (the editing models show it
their input images too).

Its guidance is real classifier-free guidance, diffusers' ``true_cfg_scale`` (model card: 4, 50 steps), run only
against a negative prompt: without one the model card passes " ", and so does sdcli. The editing models take
their input images as ``image`` (`--reference-image`: one for Edit, several for Edit-Plus) and run no img2img.

Training follows diffusers' Qwen-Image LoRA script: flow matching on the unshifted σ's (the shift is
resolution-dependent, applied at sampling), latents normalised by the VAE's per-channel means and deviations,
packed 2x2 with their shapes, Qwen2.5-VL's tokens with their mask, the timestep on 0..1. Dropped captions train
" ", what guidance reads without a negative prompt. ComfyUI's Qwen-Image has diffusers' module names, and its
LoRA loader reads them under ``diffusion_model.`` (diffusers' own loader converts that layout back).

The editing models' ``processor`` is Qwen2-VL's, whose ``from_pretrained`` also builds a video processor that
needs torchvision; where torchvision does not import, sdcli builds the processor from the folder's tokenizer and
image processor (transformers' PIL one) without the video part, which an image editor never calls.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Mapping

from sdcli.families import rules
from sdcli.families.base import Family, Knob, masked_conditioning, pipeline_default_size, unpack_packed

KNOB = Knob("true_cfg_scale", default=4.0, null_negative=" ")
STEPS = 50  # the model card's
EDIT = "QwenImageEdit"  # Edit and Edit-Plus (and their inpainting twin)


def references(class_name: str | None) -> int:
    """Edit reads one input image; Edit-Plus several (its model card shows up to 3, diffusers takes a list)."""
    if class_name.startswith(EDIT + "Plus"):
        return 3
    return 1 if class_name.startswith(EDIT) else 0


def decode(pipe: Any, latents: Any) -> Any:
    """As QwenImagePipeline decodes: undo the per-channel normalisation, decode, keep the one frame."""
    import torch

    vae = pipe.vae
    latents = latents.to(vae.device, vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents)
    with torch.no_grad():
        return vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]


def posterior(vae: Any, pixels: Any) -> tuple[Any, Any]:
    """The video VAE sees an image as one frame: (B, 3, H, W) -> the latent mean and std (B, C, h, w)."""
    dist = vae.encode(pixels.unsqueeze(2)).latent_dist
    return dist.mean[:, :, 0], dist.std[:, :, 0]


def scale_latents(vae: Any, z: Any) -> Any:
    """Raw latents normalised per channel by the VAE's means and deviations, as QwenImagePipeline does."""
    import torch

    shape = (1, vae.config.z_dim, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(z)
    std = torch.tensor(vae.config.latents_std).view(shape).to(z)
    return (z - mean) / std


def encode(pipe: Any, pairs: Any, prompts: list[str], device: Any) -> tuple[Any, Any]:
    """Qwen2.5-VL's tokens of the chat-formatted prompts, padded to the longest, and their mask."""
    import torch

    hidden, mask = pipe.encode_prompt(prompts, device=device)
    if mask is None:  # every prompt as long as the longest: the pipeline drops the all-true mask
        mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    return hidden, mask


def predict(pipe: Any, model: Any, noisy: Any, timesteps: Any, cond: dict[str, Any], guidance: Any) -> Any:
    """As QwenImagePipeline's loop: 2x2-packed latents with their shapes, the text cut to the batch's longest
    prompt with its mask (none where every token is real, as the pipeline passes it), the timestep on 0..1."""
    b, c, h, w = noisy.shape
    cls = type(pipe)
    mask = cond["text_mask"].bool()
    longest = int(mask.sum(dim=1).max())
    hidden, mask = cond["encoder_hidden_states"][:, :longest], mask[:, :longest]
    out = model(hidden_states=cls._pack_latents(noisy, b, c, h, w), timestep=timesteps.to(noisy.dtype) / 1000,
                guidance=None, encoder_hidden_states_mask=None if mask.all() else mask,
                encoder_hidden_states=hidden, img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    f = pipe.vae_scale_factor
    return cls._unpack_latents(out, h * f, w * f, f)[:, :, 0]


def sizes(pipe: Any) -> tuple[int, int, int | None]:
    f = pipe.vae_scale_factor
    return pipe.default_sample_size * f, f * 2, None  # 2x2 packing


def arch(transformer: Mapping[str, Any], vae: Mapping[str, Any]) -> Any:
    """Memory's figures were measured on SD 1.5's UNet; the transformer is estimated as that UNet until its own
    are measured, the VAE by its latent channels and factor."""
    from sdcli.memory import unet_arch

    levels = 1 + len(vae.get("temperal_downsample", [False, True, True]))
    base = vae.get("base_dim", 96)
    return unet_arch({}, {"latent_channels": vae.get("z_dim", 16), "block_out_channels": [base] * levels})


def call(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A guided batch without a negative prompt gets the model card's " " (Qwen-Image guides only against one)."""
    value = kwargs.get(KNOB.argument)
    if value is not None and KNOB.guides(value) and kwargs.get("negative_prompt") is None:
        kwargs = {**kwargs, "negative_prompt": [KNOB.null_negative] * len(kwargs["prompt"])}
    return kwargs


def edit_size(pipe: Any, images: list[Any], width: int | None, height: int | None) -> tuple[int, int]:
    """The size diffusers' Qwen-Image-Edit pipelines make where -W/-H leave it open: the last image's aspect ratio
    at the model's default area, rounded to 32 pixels."""
    import math

    dw, dh = pipeline_default_size(pipe)
    ratio = images[-1].width / images[-1].height
    wide = math.sqrt(dw * dh * ratio)
    return width or round(wide / 32) * 32, height or round((width or wide) / ratio / 32) * 32


PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")  # what an editing model's model_index.json names


def parts(where: str, index: Mapping[str, Any], revision: str | None) -> dict[str, Any]:
    """The processor diffusers cannot build where torchvision does not import (Qwen2-VL's video processor needs it):
    the same tokenizer and image processor from the model's processor/ folder, with no video processor. Where
    torchvision works, diffusers loads everything itself."""
    entry = index.get("processor") or [None, None]
    if entry[-1] not in PROCESSORS or torchvision_works():
        return {}
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    folder = {"subfolder": "processor", **({"revision": revision} if revision else {})}
    tokenizer = AutoTokenizer.from_pretrained(where, **folder)
    images = Qwen2VLImageProcessorPil.from_pretrained(where, **folder)
    return {"processor": images_only_processor(images, tokenizer, getattr(tokenizer, "chat_template", None))}


@cache
def torchvision_works() -> bool:
    """torchvision installed and importable (a wheel built for another torch is installed but fails to import)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to import is "not there" for transformers' video processors
        return False
    return True


def images_only_processor(image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> Any:
    """Qwen2-VL's processor over ``image_processor`` and ``tokenizer`` without a video processor, which transformers
    cannot make (nor even type-check) without torchvision: what the editing pipelines call runs as in the full one."""
    return _images_only_class()(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


@cache
def _images_only_class() -> type:
    from transformers import ProcessorMixin, Qwen2VLProcessor

    class ImagesOnlyQwen2VLProcessor(Qwen2VLProcessor):
        # ProcessorMixin takes its parts from __init__'s parameters: no video_processor here, so none is required.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # As Qwen2VLProcessor names its tokens: the tokenizer's own where it has them.
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id, self.video_token_id = tokenizer.convert_tokens_to_ids(
                [self.image_token, self.video_token])
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImagesOnlyQwen2VLProcessor


def check(s: Any, facts: Any, task: str, samplers: frozenset[str]) -> list[tuple[str, str]]:
    """An editing model starts from its reference images, not from --init-image (diffusers gives it no strength);
    diffusers' Qwen-Image-Edit inpainting renders at a megapixel of the picture's aspect ratio, whatever its size,
    so sdcli's composite over the picture would not fit it: not run yet."""
    for value, flag in ((s.mask, "--mask"), (s.outpaint, "--outpaint")):
        if value is not None and references(facts.class_name or ""):
            return [(flag, "is not inpainted by sdcli yet (diffusers' QwenImageEditInpaintPipeline renders at its own "
                           "megapixel size, not the picture's); inpaint with a Qwen-Image model")]
    if s.init_image is not None and references(facts.class_name or ""):
        return [("--init-image", "edits its --reference-image, and has no img2img (no strength); pass the picture "
                                 "as --reference-image")]
    return []


FAMILY = Family(
    name="qwenimage",
    pipelines=("QwenImage",),  # QwenImage21Pipeline is another model (a digit follows): the generic family's
    denoiser="transformer",
    patch=2,
    flow=True,
    unpack_latents=unpack_packed,
    decode=decode,
    references=references,
    edit_size=edit_size,
    guidance="own",
    knob=KNOB,
    defaults=lambda config: {"steps": STEPS},
    no_embeddings="Qwen-Image reads prompts with Qwen2.5-VL, and an embedding has vectors for CLIP encoders only",
    ignores=rules.OWN_GUIDANCE_FLOW,
    check=check,
    call=call,
    parts=parts,
    arch=arch,
    text_encoders=("text_encoder",),
    encode=encode,
    conditioning=masked_conditioning,
    predict=predict,
    sizes=sizes,
    peft_lora_names=True,
    text_mask=True,
    posterior=posterior,
    scale_latents=scale_latents,
    comfy_lora_prefix="diffusion_model.",
    gguf_markers=("txt_norm.",),  # its original names are diffusers'; no other family norms the text input
)
