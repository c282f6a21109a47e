"""Text-to-image (and image-to-image) generation on a diffusers pipeline.

The pipeline does the denoising; this module decides what to run (prompts ×
guidance values × seeds), validates it before anything heavy loads, makes the
classifier-free guidance formula hold for every scale, and watches the
reverse process through the scheduler so it can be shown.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sdcli import __version__, defaults
from sdcli.errors import DataError, ModelError, SdcliError, UsageError


@dataclass
class Settings:
    """Everything that decides what `generate` makes; recorded with every image."""

    prompts: list[str]
    negative_prompt: str = defaults.NEGATIVE_PROMPT
    model: str | None = None
    revision: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    steps: int = defaults.STEPS
    guidance: list[float] = field(default_factory=lambda: [defaults.GUIDANCE])
    guidance_rescale: list[float] = field(default_factory=lambda: [0.0])
    scheduler: str | None = None
    timestep_spacing: str | None = None
    seeds: list[int] | None = None
    num_images: int = 1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    loras: list[tuple[str, float]] = field(default_factory=list)
    init_image: str | None = None
    strength: float = 0.75
    device: str = "auto"
    dtype: str = "auto"
    cpu_offload: bool = False
    vae_tiling: bool = False
    attention_slicing: bool = False
    compile: bool = False
    channels_last: bool | None = None  # None: on CUDA
    save_trajectory: bool = False


@dataclass
class Job:
    prompt: str
    seed: int
    guidance: float
    guidance_rescale: float
    index: int  # position in the whole run, for stable output order


@dataclass
class Generated:
    image: Any  # PIL.Image
    record: dict[str, Any]  # what the image's metadata holds
    job: Job
    trajectory: list[Any] = field(default_factory=list)  # PIL images of x̂_0, one per scheduler step


# 1. Parsing and validation: all before the model loads -----------------------------------------


def parse_floats(text: str, option: str) -> list[float]:
    """'1,3,7.5' -> [1.0, 3.0, 7.5]; a non-number names itself."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise UsageError(f"{option}: {part!r} is not a number") from None
        if not math.isfinite(value):
            raise UsageError(f"{option}: {part!r} is not a finite number")
        values.append(value)
    return values


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None or str(text).strip() == "":
        return None
    seeds = []
    for part in str(text).split(","):
        try:
            seed = int(part.strip())
        except ValueError:
            raise UsageError(f"--seed: {part.strip()!r} is not a whole number") from None
        if not 0 <= seed < 2**63:
            raise UsageError(f"--seed: {seed} is outside 0..2^63-1")
        seeds.append(seed)
    return seeds


def parse_lora(spec: str) -> tuple[str, float]:
    """'path/to/lora:0.8' -> ('path/to/lora', 0.8); without a scale, 1.0."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head and not tail.startswith(("/", "\\")):
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    if not Path(path).expanduser().exists():
        raise UsageError(f"--lora: no such file or folder: {path}")
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


def check_settings(s: Settings) -> None:
    """Raise UsageError naming the first bad value; cheap, needs no model weights."""
    if not s.prompts:
        raise UsageError("no prompt given: pass one or more prompts, --prompt-file or --from-metadata")
    if s.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {s.steps}")
    for g in s.guidance:
        if g < 0:
            raise UsageError(f"--guidance must be >= 0, got {g:g}")
    for r in s.guidance_rescale:
        if not 0 <= r <= 1:
            raise UsageError(f"--guidance-rescale must be between 0 and 1, got {r:g}")
    if s.num_images < 1:
        raise UsageError(f"--num-images must be at least 1, got {s.num_images}")
    if s.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {s.batch_size}")
    if s.seeds and len(s.seeds) > 1 and s.num_images > 1:
        raise UsageError("give either a list of seeds or --num-images, not both")
    if s.init_image is not None:
        if not 0 < s.strength <= 1:
            raise UsageError(f"--strength must be in (0, 1], got {s.strength:g}")
        if not Path(s.init_image).is_file():
            raise DataError(f"--init-image: no such file: {s.init_image}")
    if s.scheduler is not None:
        from sdcli.schedulers import get_spec

        get_spec(s.scheduler)
    for size, name in ((s.width, "--width"), (s.height, "--height")):
        if size is not None and size <= 0:
            raise UsageError(f"{name} must be positive, got {size}")


def check_size(s: Settings, factor: int) -> None:
    for size, name in ((s.width, "--width"), (s.height, "--height")):
        if size is not None and size % factor:
            lower, upper = size - size % factor, size - size % factor + factor
            raise UsageError(
                f"{name} {size} is not a multiple of {factor} (what this model's VAE and pipeline need); "
                f"try {lower or upper} or {upper}"
            )


def resolve_seeds(s: Settings) -> list[int]:
    """The seeds to use: the given list, or N consecutive from the given (or a random) seed."""
    if s.seeds and len(s.seeds) > 1:
        return list(s.seeds)
    start = s.seeds[0] if s.seeds else secrets.randbelow(2**32)
    return [start + i for i in range(s.num_images)]


def plan_jobs(s: Settings, seeds: list[int]) -> list[Job]:
    """Prompt, then guidance setting, then seed: jobs sharing a guidance scale batch together."""
    jobs = []
    for prompt in s.prompts:
        for g in s.guidance:
            for r in s.guidance_rescale:
                for seed in seeds:
                    jobs.append(Job(prompt, seed, g, r, len(jobs)))
    return jobs


# 2. Loading and preparing the pipeline ---------------------------------------------------------


def prepare_pipeline(s: Settings):
    """Load the model, set the sampler, load LoRAs and apply memory/speed options."""
    from sdcli.pipeline import apply_runtime_options, load_pipeline
    from sdcli.schedulers import make_scheduler

    loaded = load_pipeline(
        s.model, revision=s.revision, variant=s.variant, allow_pickle=s.allow_pickle, device=s.device, dtype=s.dtype,
        cpu_offload=s.cpu_offload,
    )
    pipe = loaded.pipe
    if s.scheduler is not None or s.timestep_spacing is not None:
        pipe.scheduler = make_scheduler(s.scheduler, pipe.scheduler.config, s.timestep_spacing)
    if s.loras:
        load_loras(pipe, s.loras)
    apply_runtime_options(
        pipe, device=loaded.device, vae_tiling=s.vae_tiling, attention_slicing=s.attention_slicing,
        compile=s.compile, channels_last=s.channels_last, has_lora=bool(s.loras),
    )
    use_formula_guidance(pipe)
    return loaded


def load_loras(pipe: Any, loras: list[tuple[str, float]]) -> None:
    names = []
    for i, (path, _scale) in enumerate(loras):
        name = f"lora{i}"
        try:
            pipe.load_lora_weights(path, adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - any failure here means the LoRA does not fit
            msg = " ".join(str(exc).split())[:300]
            raise ModelError(f"LoRA {path} does not fit this model: {msg}") from exc
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _path, scale in loras])


def use_formula_guidance(pipe: Any) -> None:
    """Make guidance follow ε = ε_uncond + g·(ε_cond − ε_uncond) for every g ≥ 0.

    diffusers skips the unconditional branch for g ≤ 1 (using ε_cond alone),
    which is right at g = 1 but not below it: g = 0 should give the model's
    unconditional prediction. We keep diffusers' shortcut only at exactly 1.
    """
    cls = type(pipe)
    if getattr(cls, "_sdcli_formula_guidance", False) or not hasattr(cls, "do_classifier_free_guidance"):
        return

    def do_cfg(self) -> bool:
        return self._guidance_scale != 1 and self.unet.config.time_cond_proj_dim is None

    pipe.__class__ = type(cls.__name__, (cls,), {"_sdcli_formula_guidance": True,
                                                 "do_classifier_free_guidance": property(do_cfg)})


def default_size(pipe: Any) -> tuple[int, int]:
    sample = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    sample = sample if isinstance(sample, int) else sample[0]
    return sample * pipe.vae_scale_factor, sample * pipe.vae_scale_factor


def dropped_words(tokenizer: Any, prompt: str) -> str | None:
    """The words a prompt loses to the text encoder's token limit, or None."""
    limit = tokenizer.model_max_length
    if not limit or limit > 100_000:
        return None
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
    if len(ids) <= limit:
        return None
    return tokenizer.decode(ids[limit - 1 : -1]).strip()


def unknown_words(tokenizer: Any, prompt: str) -> list[str]:
    """Words of ``prompt`` that are not whole tokens of ``tokenizer``'s vocabulary.

    Meaningful for a model whose vocabulary is its training captions' words
    (the bundled one); a real CLIP splits rare words into known pieces.
    """
    import re

    vocab = tokenizer.get_vocab()
    words = re.findall(r"[a-z0-9']+", prompt.lower())
    return list(dict.fromkeys(w for w in words if f"{w}</w>" not in vocab))


# 3. Running ------------------------------------------------------------------------------------


def load_init_image(path: str, width: int | None, height: int | None, factor: int):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            image = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"--init-image: not a readable image: {path} ({exc})") from None
    w = width or image.width - image.width % factor
    h = height or image.height - image.height % factor
    if w < factor or h < factor:
        raise DataError(f"--init-image: {path} is too small ({image.width}x{image.height})")
    return image.resize((w, h), Image.LANCZOS) if (w, h) != image.size else image


def base_record(s: Settings, loaded: Any, width: int, height: int) -> dict[str, Any]:
    from sdcli.pipeline import absolute_if_local
    from sdcli.schedulers import spec_for

    spec = spec_for(loaded.pipe.scheduler)
    return {
        "negative_prompt": s.negative_prompt,
        "steps": s.steps,
        # What the user chose (None: the model's own), so --from-metadata makes the same choice.
        "scheduler": s.scheduler,
        "timestep_spacing": s.timestep_spacing,
        "sampler": spec.a1111,
        "schedule_type": spec.schedule_type,
        "prediction_type": loaded.prediction_type,
        "width": width,
        "height": height,
        "model": absolute_if_local(loaded.model),
        "model_name": loaded.model_name,
        "model_family": loaded.family,
        "revision": s.revision,
        "variant": s.variant,
        "loras": [{"path": absolute_if_local(p), "scale": sc} for p, sc in s.loras],
        "init_image": absolute_if_local(s.init_image) if s.init_image else None,
        "strength": s.strength if s.init_image else None,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "sdcli_version": __version__,
    }


def iter_images(
    s: Settings,
    loaded: Any,
    jobs: list[Job],
    on_step: Callable[[int], None] | None = None,
) -> Iterator[Generated]:
    """Run ``jobs`` in batches and yield each image with its record as soon as it exists."""
    import numpy as np
    import torch

    pipe = loaded.pipe
    width, height = s.width, s.height
    init = None
    if s.init_image:
        init = load_init_image(s.init_image, width, height, max(8, pipe.vae_scale_factor))
        width, height = init.size
        from diffusers import AutoPipelineForImage2Image

        run_pipe = AutoPipelineForImage2Image.from_pipe(pipe)
        run_pipe.set_progress_bar_config(disable=True)
        use_formula_guidance(run_pipe)
    else:
        dw, dh = default_size(pipe)
        width, height = width or dw, height or dh
        run_pipe = pipe
    base = base_record(s, loaded, width, height)

    def callback(_pipe, _i, _t, kwargs):
        if on_step:
            on_step(len(batch))
        return {}

    # Consecutive jobs with the same guidance settings share a batch.
    batches: list[list[Job]] = []
    for job in jobs:
        last = batches[-1] if batches else None
        if last and len(last) < s.batch_size and (last[0].guidance, last[0].guidance_rescale) == (
            job.guidance, job.guidance_rescale
        ):
            last.append(job)
        else:
            batches.append([job])

    for batch in batches:
        kwargs: dict[str, Any] = dict(
            prompt=[j.prompt for j in batch],
            negative_prompt=[s.negative_prompt] * len(batch) if s.negative_prompt else None,
            num_inference_steps=s.steps,
            guidance_scale=batch[0].guidance,
            guidance_rescale=batch[0].guidance_rescale,
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
            output_type="np",
            callback_on_step_end=callback,
        )
        if init is not None:
            kwargs.update(image=init, strength=s.strength)
        else:
            kwargs.update(width=width, height=height)
        from sdcli.trajectory import StepRecorder, decode_latents

        recorder = StepRecorder(run_pipe.scheduler)
        if s.save_trajectory:
            with recorder:
                arrays = run_pipe(**kwargs).images
        else:
            arrays = run_pipe(**kwargs).images
        if np.isnan(arrays).any():
            hint = " (float16 overflow: try --dtype bfloat16 or float32)" if loaded.dtype == torch.float16 else ""
            raise SdcliError(f"the model produced NaN values instead of an image{hint}")
        images = run_pipe.numpy_to_pil(arrays)
        frames_per_image: list[list[Any]] = [[] for _ in batch]
        if s.save_trajectory:
            for x0 in recorder.x0:
                for k, frame in enumerate(decode_latents(run_pipe, x0)):
                    frames_per_image[k].append(frame)
        for job, image, frames in zip(batch, images, frames_per_image):
            record = dict(base, prompt=job.prompt, seed=job.seed, guidance=job.guidance,
                          guidance_rescale=job.guidance_rescale)
            yield Generated(image=image, record=record, job=job, trajectory=frames)


def settings_from_record(record: dict[str, Any]) -> Settings:
    """The Settings that regenerate the image a record describes (for --from-metadata)."""
    s = Settings(prompts=[record["prompt"]])
    s.negative_prompt = record.get("negative_prompt", "")
    s.model = record.get("model")
    s.revision = record.get("revision")
    s.variant = record.get("variant")
    s.steps = int(record["steps"])
    s.guidance = [float(record["guidance"])]
    s.guidance_rescale = [float(record.get("guidance_rescale") or 0.0)]
    s.scheduler = record.get("scheduler")
    s.timestep_spacing = record.get("timestep_spacing")
    s.seeds = [int(record["seed"])]
    s.width, s.height = int(record["width"]), int(record["height"])
    s.loras = [(lo["path"], float(lo["scale"])) for lo in record.get("loras") or []]
    s.init_image = record.get("init_image")
    if s.init_image:
        s.strength = float(record["strength"])
    # dtype and device stay the command line's: "auto" picks the same on the same machine, and an
    # image made in float16 on a GPU can still be remade on a CPU.
    return s
