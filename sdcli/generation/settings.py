"""Every `generate` setting, declared once: name, type, default, help and role.

The Typer options (`sdcli.commands.generate`), the record each image carries
(A1111 `parameters` and the JSON) and `--from-metadata` replay are derived from
these declarations (`sdcli.declare`). Adding a plain option means adding a field
here, the code that uses it, and its test.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from sdcli import defaults, options
from sdcli.declare import Range, Role, by_role, check_ranges, check_setting, declared, option
from sdcli.generation.embeddings import (
    a1111_hashes, embeddings_from_record, embeddings_to_record, file_sha256, parse_embedding, ti_hashes,
)
from sdcli.errors import DataError, ModelError, SdcliError, UsageError, about
from sdcli.generation.control import (
    Preprocess, a1111_units, controlnets_from_record, controlnets_to_record, parse_controlnet,
)
from sdcli.generation.tasks import CONTROL_TASK, EDIT_TASK, IMAGE_TASKS, MAX_SIDE, Upscaler
from sdcli.images import ImageInput, in_memory, open_image, pixels_sha256
from sdcli.generation.prompts import PromptSyntax, check_prompt_settings
from sdcli.generation.parsing import parse_float, parse_int, split_scale
from sdcli.quantize import Offload, StorageDtype, parse_cache, parse_quantize
from sdcli.schedule.samplers import sigmas_of

RECORDED, RUNTIME, SWEEP = Role.RECORDED, Role.RUNTIME, Role.SWEEP
# AUTOMATIC1111 writes these first, in this order; the rest follow in declaration order.
A1111_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model")


# 1. Parsing command-line text --------------------------------------------------------------------


def parse_floats(text: str, option_name: str) -> list[float]:
    """'1,3,7.5' -> [1.0, 3.0, 7.5]; a non-number names itself."""
    return [parse_float(part, option_name) for part in str(text).split(",")]


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None or str(text).strip() == "":
        return None
    return [parse_int(part, "--seed") for part in str(text).split(",")]  # their range: check_settings


def parse_lora(spec: str) -> tuple[str, float]:
    """'path/to/lora:0.8' -> ('path/to/lora', 0.8); without a scale, 1.0."""
    path, scale = split_scale(spec, "--lora")
    if not Path(path).expanduser().exists():
        raise ModelError(f"--lora: no such file or folder: {path}")
    return str(Path(path).expanduser()), scale


def read_prompt_file(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"--prompt-file: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"--prompt-file: cannot read {path}: {exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise DataError(f"--prompt-file: {path} holds no prompts")
    return prompts


def _model_reference(model: str) -> str:
    from sdcli.pipeline import model_reference

    return model_reference(model)


def lora_files(path: str | Path) -> list[Path]:
    """The weight files a LoRA is: the file, or a folder's top-level weight files (where diffusers looks)."""
    from sdcli.pipeline import PICKLE_SUFFIXES

    path = Path(path).expanduser()
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*") if p.is_file() and p.suffix.lower() in {".safetensors"} | PICKLE_SUFFIXES)


def lora_sha256(path: str | Path) -> str | None:
    """A LoRA file's sha256; a folder's, over its weight files' names and hashes (so a changed one shows).
    None for a folder with no weights yet (a fine-tuning run's validation images, made before it saves)."""
    files = lora_files(path)
    if not files:
        return None
    if files == [Path(path).expanduser()]:
        return file_sha256(path)
    import hashlib

    return hashlib.sha256("".join(f"{f.name}:{file_sha256(f)}\n" for f in files).encode()).hexdigest()


def check_lora_tensors(path: str) -> None:
    """A LoRA whose safetensors weights hold NaN or inf would make every image NaN: refuse it by name first."""
    import torch
    from safetensors import SafetensorError, safe_open

    for file in lora_files(path):
        if file.suffix.lower() != ".safetensors":
            continue  # pickled ones load only with --allow-pickle, and the NaN guard still catches them
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise DataError(f"--lora {file}: its tensor {key} holds NaN or infinite values",
                                        setting="loras")
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(f"--lora {file} is not a readable safetensors file: {' '.join(str(exc).split())[:200]}",
                            setting="loras") from None


def _loras_to_record(loras: list[tuple[str, float]]) -> list[dict[str, Any]]:
    from sdcli.pipeline import absolute_if_local

    out = []
    for path, scale in loras:
        digest = lora_sha256(path)
        out.append({"path": absolute_if_local(path), "scale": scale, **({"sha256": digest} if digest else {})})
    return out


def _loras_from_record(value: list[dict[str, Any]] | None) -> list[tuple[str, float]]:
    """The recorded LoRAs, each checked to be the very file (or folder) the image was made with."""
    out = []
    for lo in value or []:
        path, scale = lo["path"], lo["scale"]
        if not isinstance(path, str) or isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError("each LoRA must be {path, scale, sha256}")
        if not Path(path).exists():
            raise DataError(f"--lora {path}: no such file or folder, and the image was made with it")
        if lo.get("sha256") and lora_sha256(path) != lo["sha256"]:
            raise DataError(f"--lora {path} has changed since the image was made (its sha256 differs from the "
                            "recorded one); restore that LoRA to remake the image")
        out.append((path, float(scale)))
    return out


def lora_hashes(value: list[dict[str, Any]] | None) -> str | None:
    """AUTOMATIC1111's `Lora hashes` field, named by file (a LoRA folder with no weights yet has no hash)."""
    return a1111_hashes([(Path(lo["path"]).stem, lo["sha256"]) for lo in value or [] if lo.get("sha256")])


def _absolute_if_local(path: str) -> str:
    from sdcli.pipeline import absolute_if_local

    return absolute_if_local(path)


def _file_to_record(source: ImageInput | None) -> dict[str, Any] | None:
    """An input image as a record holds it: where it was and what it held, so a replay can tell it changed.

    One given in memory (a PIL image, from Python) has no path: its record is ``{"path": null, "sha256":
    <hash of its size and RGB pixels as sdcli reads them>, "size": [width, height]}``, which says what it
    was but cannot be read back (`_file_from_record` asks for the image again).
    """
    if source is None:
        return None
    if in_memory(source):
        image = open_image(source)
        return {"path": None, "sha256": pixels_sha256(image), "size": [image.width, image.height]}
    return {"path": _absolute_if_local(str(source)), "sha256": file_sha256(source)}


def _file_from_record(value: dict[str, Any] | str | None, flag: str) -> str | None:
    """The recorded input's path, if the file there still holds what the image was made from."""
    if value is None or isinstance(value, str):  # records before sdcli kept a hash
        return value
    path, recorded_hash = value["path"], value["sha256"]
    if path is None:
        raise DataError(f"{flag}: the image was made from an image given in memory, not a file; pass {flag} "
                        "to remake it")
    if not Path(path).is_file():
        raise DataError(f"{flag} {path}: no such file, and the image was made from it")
    if file_sha256(path) != recorded_hash:
        raise DataError(f"{flag} {path} has changed since the image was made (its sha256 differs from the "
                        "recorded one); restore that file to remake the image")
    return path


def parse_outpaint(text: str) -> list[int]:
    """'32,32,0,0' -> [32, 32, 0, 0]: pixels to add left, right, top and bottom."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4 or not all(re.fullmatch("[0-9]+", p) for p in parts):  # ASCII: '²'.isdigit() is True
        raise UsageError(f"--outpaint {text!r}: give LEFT,RIGHT,TOP,BOTTOM as four whole numbers of pixels, "
                         "e.g. 32,32,0,0")
    sides = [int(p) for p in parts]
    for side in sides:  # the declared range before "a multiple of 8", which would suggest a side past it
        check_setting(Settings, "outpaint", side)
    if not any(sides):
        raise UsageError(f"--outpaint {text!r} adds nothing: give at least one side a width")
    for side in sides:
        if side % 8:
            lower = side - side % 8
            raise UsageError(f"--outpaint: {side} is not a multiple of 8 (the VAE's factor); try {lower or 8} "
                             f"or {lower + 8}")
    return sides


# 2. The declarations -----------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything that decides what `generate` makes and how it runs."""

    prompts: list[str] = option([], help="One or more prompts.", argument=True, role=SWEEP, record="prompt",
                                show_default=False)
    negative_prompt: str = option(defaults.NEGATIVE_PROMPT, help="What to steer away from.",
                                  flags=("--negative-prompt", "-n"), show_default=False)
    prompt_syntax: str = option(
        "a1111", help="How prompts are read: a1111 weights (red:1.3), editing [red:blue:0.5] and [red|blue], BREAK and "
        "prompts past 75 tokens; plain text as diffusers reads it.", cli_type=PromptSyntax, unrecorded="plain")
    clip_skip: int = option(1, help="Text encoder layer to use, counted from the end: 1 the last, 2 the penultimate.",
                            a1111="Clip skip", to_a1111=lambda n: n if n > 1 else None,
                            range=Range(1, why="1 is the last layer"))
    embeddings: list[tuple[str, str]] = option(
        [], help="Textual-inversion embedding as PATH[:TOKEN] (A1111 .pt/.safetensors or diffusers "
        "learned_embeds; TOKEN defaults to the file's name); repeatable.", flags=("--embedding",),
        cli_type=list[str], parse=lambda specs: [parse_embedding(s) for s in specs],
        to_record=embeddings_to_record, from_record=embeddings_from_record, a1111="TI hashes", to_a1111=ti_hashes,
        show_default=False)
    model: Optional[str] = option(None, options.MODEL, at_load=True, to_record=lambda m: m and _model_reference(m))
    revision: Optional[str] = option(None, options.REVISION, at_load=True)
    variant: Optional[str] = option(None, options.VARIANT, at_load=True)
    allow_pickle: bool = option(False, options.ALLOW_PICKLE)
    steps: Optional[int] = option(
        None, help=f"Denoising steps. Default: the model card's (FLUX.2 50, FLUX.2 Klein distilled 4), else "
        f"{defaults.STEPS}.", a1111="Steps", range=Range(1), show_default=False)
    guidance: list[float] = option(
        [], help="Classifier-free guidance scale, or a comma list to sweep (1,3,7.5,12). Default: 7.5 (FLUX.2 Klein "
        "base 4); on Flux 1 and FLUX.2-dev (their guidance is distilled: see --distilled-guidance).",
        flags=("--guidance", "-g", "--cfg"), role=SWEEP, cli_type=str, parse=lambda t: parse_floats(t, "--guidance"),
        a1111="CFG scale", label="g", show_default=False, range=Range(0, 1000))
    guidance_rescale: list[float] = option(
        [0.0], help="Guidance rescale φ in [0, 1] (Lin et al. 2023), or a comma list.", role=SWEEP, cli_type=str,
        parse=lambda t: parse_floats(t, "--guidance-rescale"), a1111="CFG Rescale phi", label="r", range=Range(0, 1))
    distilled_guidance: Optional[float] = option(
        None, help="Flux-dev, Kontext and FLUX.2-dev: the guidance it was distilled with, an input of the model rather "
        f"than classifier-free guidance. Default: {defaults.DISTILLED_GUIDANCE:g} (Kontext 2.5, FLUX.2 4).", a1111="Distilled CFG Scale", show_default=False,
        range=Range(0, 1000))
    true_cfg: bool = option(
        False, help="Flux: real classifier-free guidance at --guidance, against the negative prompt (two passes a "
        "step).", flags=("--true-cfg",), a1111="True CFG", to_a1111=lambda on: "True" if on else None)
    scheduler: Optional[str] = option(None, options.SCHEDULER)
    eta: float = option(0.0, help="DDIM's η: 0 is deterministic DDIM, 1 draws as much fresh noise each step as DDPM "
                        "(samplers that take it: ddim).", a1111="Eta DDIM", range=Range(0, 1))
    timestep_spacing: Optional[str] = option(None, options.SPACING, a1111="Timestep spacing")
    seeds: Optional[list[int]] = option(
        None, help="Seed, or a comma list of seeds. Default: random, printed.", flags=("--seed",), role=SWEEP,
        cli_type=str, parse=parse_seeds, record="seed", a1111="Seed", range=Range(0, 2**63 - 1))
    num_images: int = option(1, help="Images per prompt and guidance value (consecutive seeds).", role=RUNTIME,
                             range=Range(1))
    # Sizes past memory are refused by the memory estimate (sdcli.memory), which says how much they need.
    width: Optional[int] = option(None, help="Width in pixels. Default: the model's.", flags=("--width", "-W"),
                                  range=Range(0, open=("low",)))
    height: Optional[int] = option(None, help="Height in pixels. Default: the model's.", flags=("--height", "-H"),
                                   range=Range(0, open=("low",)))
    batch_size: int = option(1, help="Images denoised together.", role=RUNTIME, range=Range(1))
    device: str = option("auto", options.DEVICE, at_load=True)
    dtype: str = option("auto", options.DTYPE, at_load=True)
    threads: Optional[int] = option(None, options.THREADS, at_load=True)
    cpu_offload: bool = option(False, help="Keep idle models in CPU memory (CUDA only).", role=RUNTIME,
                               at_load=True)
    vae_tiling: bool = option(False, help="Decode in tiles, for large images on small GPUs.", role=RUNTIME,
                              at_load=True)
    attention_slicing: bool = option(False, help="Compute attention in slices to save memory.", role=RUNTIME,
                                     at_load=True)
    compile: bool = option(False, help="torch.compile the UNet (slow first image).", flags=("--compile",), role=RUNTIME,
                           at_load=True)
    compile_mode: str = option(
        defaults.COMPILE_MODE, help="With --compile, on CUDA: torch.compile's mode (reduce-overhead adds CUDA graphs; "
        "max-autotune tries kernels for minutes first).", cli_type=options.CompileMode, role=RUNTIME, at_load=True)
    channels_last: Optional[bool] = option(None, options.CHANNELS_LAST, at_load=True)
    # Big models on small cards (sdcli.quantize): the record keeps --quantize with its backend named.
    quantize: Optional[str] = option(None, options.QUANTIZE, parse=parse_quantize, at_load=True, a1111="Quantization")
    quantize_text_encoder: bool = option(False, options.QUANTIZE_TEXT_ENCODER, at_load=True)
    denoiser_file: Optional[str] = option(
        None, help="The denoiser from this file instead of --model's: a transformer/UNet-only .safetensors (ComfyUI's "
        "diffusion_models files: original or diffusers names, bf16 or fp8) or a GGUF file (Q8_0, Q4_K, ...); --model "
        "is the base pipeline it goes into.", flags=("--transformer", "--unet"),
        cli_type=Path, parse=lambda p: str(Path(p).expanduser()), to_record=lambda v: v and _absolute_if_local(v),
        a1111="Denoiser file", to_a1111=lambda v: Path(v).name, at_load=True, show_default=False)
    storage_dtype: Optional[str] = option(
        None, help="Store the denoiser's weights in float8, each layer cast up to --dtype only while it runs "
        "(about half the weight memory of bfloat16).", cli_type=StorageDtype, a1111="Storage dtype", at_load=True,
        show_default=False)
    offload: Optional[str] = option(
        None, help="CUDA: keep weights in CPU memory, moving each model (model), each layer (sequential: least "
        "memory, slowest) or groups of layers on a stream (group) to the GPU as they run.", cli_type=Offload,
        role=RUNTIME, at_load=True, show_default=False)
    step_cache: Optional[str] = option(
        None, help="Reuse the denoiser's work between steps: first-block[:THRESHOLD] (default 0.05), taylorseer or "
        "mag; faster, slightly different images (Flux).", flags=("--cache",), parse=parse_cache, a1111="Step cache",
        show_default=False)
    # The range of a (path, scale) setting is its scales': past ±100 a LoRA is a typo that overflows the weights.
    loras: list[tuple[str, float]] = option(
        [], help="LoRA weights as PATH[:SCALE] (diffusers format); repeatable.", flags=("--lora",),
        cli_type=list[str], parse=lambda specs: [parse_lora(s) for s in specs], to_record=_loras_to_record,
        from_record=_loras_from_record, show_default=False, range=Range(-100, 100))
    init_image: Optional[ImageInput] = option(
        None, help="Start from this image (img2img; with --mask or --outpaint, inpainting).", cli_type=Path, parse=str,
        task=IMAGE_TASKS, to_record=_file_to_record, from_record=lambda v: _file_from_record(v, "--init-image"))
    strength: float = option(0.75, help="img2img and inpainting: how far to noise the init image, 0..1.",
                             task=IMAGE_TASKS, a1111="Denoising strength", range=Range(0, 1, open=("low",)))
    mask: Optional[ImageInput] = option(
        None, help="Inpainting: repaint where this image is white (any mode; resized to --init-image).", cli_type=Path,
        parse=str, task="inpaint", to_record=_file_to_record, from_record=lambda v: _file_from_record(v, "--mask"))
    mask_blur: int = option(4, help="Inpainting: feather the mask's edge by this many pixels (Gaussian σ).",
                            task=("inpaint", "outpaint"), a1111="Mask blur", range=Range(0))
    outpaint: Optional[list[int]] = option(
        None, help="Outpainting: grow the canvas by LEFT,RIGHT,TOP,BOTTOM pixels and paint only the new border.",
        cli_type=str, parse=parse_outpaint, task="outpaint", a1111="Outpaint",
        to_a1111=lambda sides: " ".join(f"{name}{n}" for name, n in zip("LRTB", sides)), range=Range(0, MAX_SIDE))
    hires_scale: Optional[float] = option(
        None, help="Hires fix: upscale the image by this factor (> 1) and refine it with a second img2img pass.",
        task="hires", a1111="Hires upscale", range=Range(1, 8, open=("low",)))
    hires_upscaler: str = option("lanczos", help="Hires fix: upscale the pixels (lanczos) or the latents (latent).",
                                 cli_type=Upscaler, task="hires", a1111="Hires upscaler", to_a1111=str.capitalize)
    hires_strength: float = option(0.5, help="Hires fix: strength of the second pass, 0..1.", task="hires",
                                   a1111="Denoising strength", range=Range(0, 1, open=("low",)))
    hires_steps: Optional[int] = option(None, help="Hires fix: steps of the second pass. Default: --steps.",
                                        task="hires", a1111="Hires steps", range=Range(1))
    vae: Optional[str] = option(
        None, help="Replace the model's VAE: a VAE folder or Hub id (or a pipeline's, whose vae/ is used).",
        to_record=lambda v: v and _absolute_if_local(v), a1111="VAE", to_a1111=lambda v: Path(v).name, at_load=True)
    # Recorded as "sigmas"; AUTOMATIC1111's "Schedule type" is read off the scheduler that ran (base_record).
    sigmas: str = option(
        "default", help="σ spacing, for the samplers that have one (euler, heun, lms, dpm, unipc): default, karras, "
        "exponential, beta; or ComfyUI's timestep schedules normal, simple, sgm_uniform, ddim_uniform. "
        "AUTOMATIC1111's schedule types (Automatic, Karras, SGM Uniform, ...) name them too.",
        cli_type=str, parse=sigmas_of, from_record=sigmas_of)
    controlnets: list[tuple[str, float]] = option(
        [], help="ControlNet as PATH_OR_HUB_ID[:SCALE] (a diffusers ControlNet folder or Hub id); repeatable, one "
        "--control-image each.", flags=("--controlnet",), cli_type=list[str],
        parse=lambda specs: [parse_controlnet(s) for s in specs], task=CONTROL_TASK, to_record=controlnets_to_record,
        from_record=controlnets_from_record, show_default=False, range=Range(0, 100))  # the scales, as --lora's
    control_images: list[ImageInput] = option(
        [], help="ControlNet: the control image of each --controlnet, in order (resized to the output; without "
        "-W/-H the first sets its size).", flags=("--control-image",), cli_type=list[Path],
        parse=lambda paths: [str(p) for p in paths], task=CONTROL_TASK,
        to_record=lambda paths: [_file_to_record(p) for p in paths],
        from_record=lambda values: [_file_from_record(v, "--control-image") for v in values], show_default=False)
    control_preprocess: list[str] = option(
        [], help="ControlNet: make each control image its map: none (use it as given, the default) or canny "
        "(its edges); one for all, or one per --controlnet.", cli_type=list[Preprocess],
        parse=lambda values: [getattr(v, "value", v) for v in values], task=CONTROL_TASK, show_default=False)
    control_start: float = option(0.0, help="ControlNet: the fraction of the steps done before it starts to act.",
                                  task=CONTROL_TASK, range=Range(0, 1, why="a fraction of the steps"))
    control_end: float = option(1.0, help="ControlNet: the fraction of the steps done when it stops acting.",
                                task=CONTROL_TASK, range=Range(0, 1, why="a fraction of the steps"))
    reference_images: list[ImageInput] = option(
        [], help="An editing model's image to edit or follow (FLUX.1 Kontext: one; FLUX.2: several; Qwen-Image-Edit: "
        "one, -Edit-Plus: up to three); repeatable. Without -W/-H they set the size.", flags=("--reference-image",),
        cli_type=list[Path], parse=lambda paths: [str(p) for p in paths], task=EDIT_TASK,
        to_record=lambda paths: [_file_to_record(p) for p in paths],
        from_record=lambda values: [_file_from_record(v, "--reference-image") for v in values], show_default=False)
    save_trajectory: bool = option(
        False, help="Also save the predicted clean image at every step (strip PNG + GIF).", role=RUNTIME)

    def a1111_prompt(self) -> str | None:
        """The first prompt (or the negative prompt) that AUTOMATIC1111's syntax reads otherwise than plain text
        (a weight, BREAK or an escape), under --prompt-syntax a1111; None where there is none. A family whose
        prompts diffusers encodes refuses such a prompt (`sdcli.families.rules`)."""
        from sdcli.generation.prompts import parse_weights

        if self.prompt_syntax != "a1111":
            return None
        for prompt in [*self.prompts, self.negative_prompt]:
            parsed = parse_weights(prompt) if prompt else None
            if parsed and (parsed.text != prompt or any(p is None or p[1] != 1 for p in parsed.pieces)):
                return prompt
        return None


RUNTIME_FIELDS = tuple(d.name for d in by_role(Settings, RUNTIME))


def at_load() -> list[str]:
    """The settings decided when the model loads (`sdcli.generation.engine.Engine.load`), not per request."""
    return [d.name for d in declared(Settings) if d.opt.at_load]


# 3. Checks that need no weights ------------------------------------------------------------------


def check_settings(s: Settings) -> None:
    """Raise UsageError naming the first bad value; cheap, needs no model weights.

    Every number first, typed or replayed, against the `Range` its setting declares (`check_ranges`):
    guidance sweeps item by item, each --lora/--controlnet PATH:SCALE's scale. The checks below are
    the ones a range cannot say: combinations of settings.
    """
    check_ranges(s)
    if not s.prompts:
        raise UsageError("no prompt given: pass one or more prompts, --prompt-file or --from-metadata",
                         setting="prompts")
    if s.seeds and len(s.seeds) > 1 and s.num_images > 1:
        raise UsageError("give either a list of seeds or --num-images, not both", setting="num_images")
    if s.seeds and s.seeds[0] + s.num_images - 1 >= 2**63:
        raise UsageError(f"--seed {s.seeds[0]} with --num-images {s.num_images} runs past the largest seed, 2^63-1",
                         setting="seeds")
    from sdcli.schedule.samplers import check_spacings, get_spec, settle

    # AUTOMATIC1111's and ComfyUI's names become sdcli's, so a record says "euler-ancestral" however it was asked.
    s.scheduler, s.sigmas = settle(s.scheduler, s.sigmas)
    if s.scheduler is not None:
        get_spec(s.scheduler)
    check_spacings(s.sigmas, s.timestep_spacing)
    if not s.allow_pickle:
        from sdcli.pipeline import pickled_only

        for path, _scale in s.loras:
            if pickled_only(path):
                raise ModelError(f"--lora {path} holds pickled weights, which can run code when loaded; "
                                 "convert it to .safetensors or pass --allow-pickle if you trust it", setting="loras")
    check_prompt_settings(s)


def check_size(s: Settings, factor: int) -> None:
    for size, name in ((s.width, "width"), (s.height, "height")):
        if size is not None and size % factor:
            lower, upper = size - size % factor, size - size % factor + factor
            raise UsageError(
                f"--{name} {size} is not a multiple of {factor} (what this model's VAE and pipeline need); "
                f"try {lower or upper} or {upper}", setting=name
            )
    for side in s.outpaint or ():  # the canvas too (parse_outpaint checked the 8 every VAE needs)
        if side % factor:
            lower, upper = side - side % factor, side - side % factor + factor
            raise UsageError(f"--outpaint: {side} is not a multiple of {factor} (what this model's VAE and pipeline "
                             f"need); try {lower} or {upper}", setting="outpaint")  # 0: no border there


def check_positions(s: Settings, facts: Any) -> None:
    """Refuse a size past the positions the model's denoiser has (``facts.largest``: SD3's position embedding,
    Z-Image's RoPE table), which would fail inside the transformer: -W/-H as asked, else the init image's own size,
    then an outpainted canvas and hires fix's enlargement, each naming the setting that made it. (Hires fix at the
    model's default size is checked as it prepares, `sdcli.generation.tasks.HiresFix`.)"""
    if facts.largest is None:
        return
    from functools import partial

    from sdcli.generation.tasks import refuse_past_positions
    from sdcli.images import image_size, named

    refuse = partial(refuse_past_positions, facts)

    refuse(s.width or 0, 0, f"--width {s.width}", "width")
    refuse(0, s.height or 0, f"--height {s.height}", "height")
    w, h = s.width, s.height
    if s.init_image is not None and not (w and h):
        iw, ih = image_size(s.init_image, what="--init-image", setting="init_image")
        w, h = w or iw, h or ih
        refuse(w, h, f"--init-image {named(s.init_image)} is {iw}x{ih}", "init_image", "; pass -W/-H to resize it")
    if s.outpaint is not None and w and h:
        left, right, top, bottom = s.outpaint
        w, h = w + left + right, h + top + bottom
        refuse(w, h, f"--outpaint {','.join(map(str, s.outpaint))} makes a {w}x{h} canvas", "outpaint")
    if s.hires_scale is not None and w and h:
        w, h = int(w * s.hires_scale), int(h * s.hires_scale)
        refuse(w, h, f"--hires-scale {s.hires_scale:g} makes {w}x{h}", "hires_scale")


# 4. Records and replay ---------------------------------------------------------------------------


def recorded(task: str) -> list[Any]:
    """The declared settings an image made by ``task`` records (sweep axes are per image)."""
    names = set(task.split("+"))  # a task steered by ControlNets ("img2img+controlnet") records both
    return [d for d in by_role(Settings, RECORDED) if not d.tasks or names & set(d.tasks)]


def settings_record(s: Settings, task: str) -> dict[str, Any]:
    """The recorded settings of a run as JSON-ready values, keyed as the record names them."""
    out = {}
    for d in recorded(task):
        value = getattr(s, d.name)
        out[d.record_key] = d.opt.to_record(value) if d.opt.to_record else value
    return out


def sweep_axes() -> list[Any]:
    return by_role(Settings, SWEEP)


def a1111_fields(record: dict[str, Any]) -> list[tuple[str, Any]]:
    """(key, value) pairs of AUTOMATIC1111's settings line, from the declarations and the record."""
    found: dict[str, Any] = {
        "Sampler": record.get("sampler"),
        "Schedule type": record.get("schedule_type", "Automatic"),
        "Size": f"{record['width']}x{record['height']}",
        "Model": record.get("model_name"),
    }
    for d in declared(Settings):
        key, value = d.opt.a1111, record.get(d.record_key)
        if d.opt.to_a1111 is not None and value is not None:
            value = d.opt.to_a1111(value)
        if key and value is not None and (key in A1111_ORDER or (value != 0 and value != "")):
            found[key] = f"{value:g}" if isinstance(value, float) else value
    for i, unit in enumerate(a1111_units(record)):
        found[f"ControlNet {i}"] = unit
    for lora in record.get("loras") or []:
        found[f"Lora {Path(lora['path']).name}"] = f"{lora['scale']:g}"
    if hashes := lora_hashes(record.get("loras")):
        found["Lora hashes"] = hashes
    found["Version"] = f"sdcli {record['sdcli_version']}"
    head = [(k, found[k]) for k in A1111_ORDER if found.get(k) is not None]
    return head + [(k, v) for k, v in found.items() if k not in A1111_ORDER]


# What a record must say for a replay to remake its image: without them the defaults would make another one.
# Each may come from the JSON, else from AUTOMATIC1111's `parameters` text (`sdcli.generation.metadata.read_record`).
ESSENTIAL = ("prompts", "model", "steps", "seeds", "guidance", "width", "height")
# What a record says about the run rather than what it asked for: read off the pipeline, never replayed, but
# text in every record sdcli writes; a record where one is not is not one to trust.
DERIVED = ("task", "sampler", "schedule_type", "prediction_type", "model_name", "model_family", "sdcli_version")


def settings_from_record(record: dict[str, Any], replaced: set[str] = frozenset()) -> Settings:
    """The Settings that regenerate the image a record describes (for --from-metadata).

    Runtime settings (device, dtype, batch size, ...) stay the command line's: "auto" picks the
    same on the same machine, and an image made in float16 on a GPU can still be remade on a CPU.
    The settings named in ``replaced`` are left at their defaults for the caller to set: a recorded
    input the user replaces (a new --mask) is not checked against its old file. Every value is
    checked for its declared type here, naming the field; its range is checked with the command
    line's (`check_settings`), as if it had been typed.
    """
    if not isinstance(record, dict) or "prompt" not in record:
        raise DataError("the sdcli record holds no prompt; it was not written by sdcli generate")
    for key in DERIVED:
        if key in record and not isinstance(record[key], str):
            raise DataError(f"the record's {key} is {_shown(record[key])}, not text; the record is malformed")
    check_weights_exist(record)
    s = Settings()
    for d in declared(Settings):
        if d.opt.role is RUNTIME or d.name in replaced:
            continue
        if d.record_key not in record:
            if d.name in ESSENTIAL:
                raise DataError(f"the record holds no {d.record_key} (nor does its parameters text), so the image "
                                f"cannot be remade; give {d.flag}", setting=d.name)
            if d.opt.unrecorded is not None:
                setattr(s, d.name, d.opt.unrecorded)
            continue
        try:
            value = _from_record(d, record[d.record_key])
        except SdcliError as exc:  # a reader names the flag; the error says which setting that is
            raise about(exc, d.name)
        setattr(s, d.name, [value] if d.opt.role is SWEEP else value)
    return s


def _from_record(d: Any, value: Any) -> Any:
    """One declared setting's recorded value as the setting holds it; DataError naming its flag otherwise."""
    if d.opt.from_record is not None:
        try:
            return d.opt.from_record(value)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            # What failed inside the reader (a missing key, a str where a dict goes) is ours, not the user's.
            raise DataError(f"the record's {d.record_key} is {_shown(value)}, not in the form "
                            f"sdcli writes for {d.flag}; the record is malformed") from None
    element = _element_type(d.type) if d.opt.role is SWEEP else d.type
    value = _typed(value, element, d)
    choices = d.opt.cli_type
    if isinstance(choices, type) and issubclass(choices, Enum) and value is not None:
        if value not in {c.value for c in choices}:
            raise DataError(f"the record's {d.record_key} is {_shown(value)}, not one of "
                            f"{', '.join(c.value for c in choices)} ({d.flag})")
    return value


def _shown(value: Any) -> str:
    import json

    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _element_type(t: Any) -> Any:
    """list[float] -> float; Optional[list[int]] -> int (a sweep axis records one value per image)."""
    import typing

    args = [a for a in typing.get_args(t) if a is not type(None)]
    inner = args[0] if args else t
    return (typing.get_args(inner) or (inner,))[0]


def _typed(value: Any, t: Any, d: Any) -> Any:
    """``value`` from a record, if it is what the declaration's type ``t`` says; DataError naming the field."""
    import typing

    args = typing.get_args(t)
    if type(None) in args:
        if value is None:
            return None
        t = next(a for a in args if a is not type(None))
    origin = typing.get_origin(t)
    wrong = f"the record's {d.record_key} is {_shown(value)}"
    if t is bool:
        if not isinstance(value, bool):
            raise DataError(f"{wrong}, not true or false ({d.flag})")
    elif t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{wrong}, not a whole number ({d.flag})")
    elif t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{wrong}, not a number ({d.flag})")
        if not math.isfinite(value):
            raise DataError(f"{wrong}, not a finite number ({d.flag})")
        value = float(value)
    elif t is str:
        if not isinstance(value, str):
            raise DataError(f"{wrong}, not text ({d.flag})")
    elif origin is list:
        if not isinstance(value, list):
            raise DataError(f"{wrong}, not a list ({d.flag})")
        (inner,) = typing.get_args(t) or (Any,)
        value = [_typed(v, inner, d) for v in value] if inner in (int, float, str, bool) else value
    return value


def check_weights_exist(record: dict[str, Any]) -> None:
    """A finetune validation image can be remade only from the weights its run kept: the last step's."""
    import json

    made = record.get("finetune_validation")
    if not made:
        return
    try:
        out, step = Path(made["out"]), made["step"]
    except (KeyError, TypeError) as exc:
        raise DataError(f"the record's finetune_validation is malformed ({type(exc).__name__}): {_shown(made)}"
                        ) from None
    if isinstance(step, bool) or not isinstance(step, int):
        raise DataError(f"the record's finetune_validation step is {_shown(step)}, not a whole number")
    try:
        final = json.loads((out / "training_settings.json").read_text()).get("steps")
    except (OSError, ValueError):
        final = None
    if final is None:
        raise DataError(f"this is a validation image of the fine-tuning run in {out}, which has not finished "
                        "(no training_settings.json there), so its weights cannot be loaded")
    if final != step:
        raise DataError(f"this validation image was made at step {step} of the run in {out}, which kept only its "
                        f"final weights (step {final}); only the step-{final} images can be remade")
