"""The generic family: any diffusers text-to-image pipeline that no family file claims, driven through its own
``__call__`` signature.

sdcli knows nothing of such a model's insides (its text encoders, latents, guidance formula), so it asks
diffusers: the class must be one of diffusers' text-to-image pipelines (AutoPipeline's table), and its
``__call__`` must take what sdcli needs to drive it (`NEEDS`). Every generate setting is then honoured
through the argument the signature names, or refused in one line before loading (`check`): a setting the
pipeline would ignore must not be recorded as if it had made the image. Guidance follows diffusers'
convention: ``--guidance`` is passed as ``guidance_scale`` (default: the pipeline's own), and a pipeline
that takes a negative prompt guides with it only above 1.

The rest of sdcli reaches it through the family's hooks (``check``, ``call``, ``default_size``,
``check_schedule``: `sdcli.families.base.Family`) and its guidance kind, "generic"
(`sdcli.generation.guidance`); `sdcli.families` falls back to it for a class no family file claims.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from sdcli.errors import ModelError, UsageError
from sdcli.families.base import Family

NAME = "generic"

# What sdcli cannot drive a pipeline without: the argument, and what sdcli could not do without it.
NEEDS = (
    ("prompt", "so sdcli cannot give it a prompt"),
    ("num_inference_steps", "so sdcli cannot set --steps"),
    ("generator", "so sdcli cannot seed it"),
    ("output_type", "so sdcli cannot read its images as arrays (output_type='np')"),
)


@dataclass(frozen=True, eq=False)
class GenericFamily(Family):
    """`Family` of one generic pipeline class; ``scheduler`` is its scheduler's class name where known (from the
    model's scheduler config, or the loaded scheduler)."""

    class_name: str = ""
    scheduler: str | None = None

    def completed(self, config: Callable[[str], dict[str, Any] | None]) -> "GenericFamily":
        """This family completed from the model's configs (`with_configs`)."""
        return with_configs(self, config)


def _diffusers_class(class_name: str) -> type | None:
    from sdcli.progress import quiet_libraries

    quiet_libraries()
    import diffusers

    try:
        cls = getattr(diffusers, class_name, None)
    except Exception:  # noqa: BLE001 - a class whose module fails to import (a missing extra) is not one we can run
        return None
    return cls if isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline) else None


def _text_to_image(cls: type) -> bool:
    """Whether diffusers lists ``cls`` as a text-to-image pipeline (AutoPipelineForText2Image's table): a
    signature alone cannot tell an image pipeline from an audio or video one."""
    from diffusers.pipelines import auto_pipeline

    return cls in auto_pipeline.AUTO_TEXT2IMAGE_PIPELINES_MAPPING.values()


def params(cls: type) -> dict[str, inspect.Parameter]:
    """The arguments ``cls.__call__`` takes, by name."""
    return dict(inspect.signature(cls.__call__).parameters)


def takes(cls: type, name: str) -> bool:
    return name in params(cls)


def lacks(cls: type) -> str | None:
    """Why sdcli cannot drive ``cls``, in words completing "{class}'s __call__ ...", or None."""
    taken = params(cls)
    for name, why in NEEDS:
        if name not in taken:
            return f"takes no {name}, {why}"
    required = [n for n, p in taken.items() if n not in ("self", "prompt") and p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        return f"needs {', '.join(required)}, which sdcli does not give a text-to-image pipeline"
    return None


@functools.lru_cache(maxsize=None)
def family(class_name: str, what: str = "the pipeline") -> GenericFamily | None:
    """The generic family of a diffusers text-to-image pipeline class no family file claims; None for a class
    that is not one (custom or remote code, an audio or video pipeline); ModelError, naming ``what`` and what
    the class lacks, for one whose ``__call__`` sdcli cannot drive."""
    cls = _diffusers_class(class_name)
    if cls is None or not _text_to_image(cls):
        return None
    why = lacks(cls)
    if why:
        raise ModelError(f"{what}: {class_name}'s __call__ {why}")
    init = inspect.signature(cls.__init__).parameters
    if "transformer" not in init and "unet" not in init:
        # Cascades (Würstchen, Stable Cascade) hold a prior and a decoder; --compile and the memory switches need one.
        raise ModelError(f"{what}: {class_name} keeps its denoiser in no unet or transformer, which sdcli drives")
    denoiser = "transformer" if "transformer" in init else "unet"
    return GenericFamily(NAME, (class_name,), denoiser=denoiser, guidance=NAME, class_name=class_name,
                         default_size=default_size, check=check, call=call_kwargs,
                         check_schedule=check_flow_schedule)


def with_configs(base: GenericFamily, config: Callable[[str], dict[str, Any] | None]) -> GenericFamily:
    """``base`` completed from the model's configs (no weights): the denoiser's patch size, whether its scheduler
    is flow matching, and the scheduler's class. ``config(name)`` reads one config file, None where absent."""
    import dataclasses

    index = config("model_index.json") or {}
    denoiser = "transformer" if "transformer" in index else "unet" if "unet" in index else base.denoiser
    net = config(f"{denoiser}/config.json") or {}
    patch = net.get("patch_size") or 1
    scheduler_config = config("scheduler/scheduler_config.json") or {}
    scheduler = scheduler_config.get("_class_name")
    return dataclasses.replace(base, denoiser=denoiser, patch=int(patch[0] if isinstance(patch, list) else patch),
                               flow=is_flow(scheduler, scheduler_config), scheduler=scheduler)


def is_flow(scheduler: str | None, config: Any) -> bool:
    """Flow matching: a FlowMatch* scheduler, or a DDPM-family class run on flow σ's (Sana's DPM-Solver)."""
    return (str(scheduler or "").startswith("FlowMatch") or bool(config.get("use_flow_sigmas"))
            or config.get("prediction_type") == "flow_prediction")


def pipe_family(pipe: Any) -> GenericFamily | None:
    """The generic family of a loaded pipeline (of its class, or of the first diffusers base class that is
    one); None where there is none."""
    import dataclasses

    for cls in type(pipe).__mro__:
        found = family(cls.__name__)
        if found is not None:
            denoiser = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
            net = getattr(pipe, denoiser, None)
            patch = (net.config.get("patch_size") if net is not None else None) or 1
            scheduler = type(getattr(pipe, "scheduler", None)).__name__
            flow = is_flow(scheduler, dict(getattr(pipe.scheduler, "config", {})))
            return dataclasses.replace(found, denoiser=denoiser, scheduler=scheduler, flow=flow,
                                       patch=int(patch[0] if isinstance(patch, (list, tuple)) else patch))
    return None


def is_generic(family_or_facts: Any) -> bool:
    family = getattr(family_or_facts, "family", family_or_facts)
    return getattr(family, "name", None) == NAME


# Settings, checked before loading ------------------------------------------------------------------------


def _sampler_swaps(fam: GenericFamily, samplers: frozenset[str]) -> bool:
    """Whether sdcli's samplers may replace this pipeline's scheduler: only where it already runs one of them.

    Then the pipeline was built for a DDPM-family (β-schedule) sampler behind diffusers' common scheduler calls,
    and sdcli's replacement keeps the model's β schedule and prediction type (`make_scheduler`). A flow-matching,
    consistency or custom scheduler has no β schedule for a DDPM sampler to take over, and its pipeline may
    compute its own σ's or shifts: a swap would run the model wrongly. So would a DDPM-family class run on flow
    σ's (Sana's DPM-Solver with use_flow_sigmas): sdcli's samplers take noise or v predictions.
    """
    return not fam.flow and fam.scheduler in samplers


def _trajectory_readable(fam: GenericFamily, samplers: frozenset[str]) -> bool:
    """x̂0 at each step is read off the scheduler in closed form from its ᾱ's (`closed_form_x0`): sound for
    sdcli's own samplers, on latents the VAE decodes as they are (a transformer's patches packed into tokens
    are not)."""
    return _sampler_swaps(fam, samplers)


def check(s: Any, facts: Any, task_name: str, samplers: frozenset[str]) -> list[tuple[str, str]]:
    """(flag, why) for each setting given that this pipeline cannot honour, in the order the checks run.
    ``why`` completes "{flag}: {model} ..."; ``samplers`` are the classes of sdcli's samplers."""
    fam = facts.family
    cls = _diffusers_class(fam.class_name)
    take = params(cls)
    out: list[tuple[str, str]] = []

    def refuse(flag: str, given: Any, why: str) -> None:
        if given:
            out.append((flag, why))

    # 1. What the pipeline's __call__ has no argument for.
    refuse("--negative-prompt", s.negative_prompt and "negative_prompt" not in take, "takes no negative prompt")
    refuse("--negative-prompt", s.negative_prompt and "true_cfg_scale" in take,
           "reads its negative prompt through true_cfg_scale, which sdcli does not drive on the generic family")
    # Without one it records guidance 1 (unguided, as Flux-schnell does), which its replay passes back.
    refuse("--guidance", any(g != 1 for g in s.guidance) and "guidance_scale" not in take, "takes no guidance_scale")
    refuse("--width", s.width and "width" not in take, "takes no width: it makes images at its own size")
    refuse("--height", s.height and "height" not in take, "takes no height: it makes images at its own size")
    refuse("--eta", s.eta and "eta" not in take, "takes no eta")
    refuse("--guidance-rescale", any(s.guidance_rescale) and "guidance_rescale" not in take,
           "has no guidance rescale")
    bad = next((g for g in s.guidance if g < 1), None)
    refuse(f"--guidance {bad:g}" if bad is not None else "--guidance", bad is not None and "negative_prompt" in take,
           "guides only above 1, as diffusers' pipelines do (at or below 1 it runs unguided, the same image as "
           "--guidance 1)")
    # 2. What sdcli does with its own prompt encoding, which knows only the CLIP families.
    plain = "reads its prompts through diffusers' own encoders; it works on SD 1.x, 2.x and XL, whose prompts sdcli " \
            "encodes itself"
    refuse("--clip-skip", s.clip_skip != 1, plain)
    refuse("--embedding", s.embeddings, "reads its prompts through diffusers' own encoders, which take no "
           "textual-inversion embeddings (they need SD 1.x, 2.x or XL)")
    syntax = s.a1111_prompt()  # the same test the flow families refuse with (`sdcli.families.rules`)
    refuse("--prompt-syntax a1111", syntax,
           f"reads prompts as plain text, so the weights, BREAK or escapes of {syntax!r} would reach it as literal "
           "characters (they work on SD 1.x, 2.x and XL); drop them, or pass --prompt-syntax plain to mean them as "
           "text")
    # 3. Samplers, and what the sampler's x̂0 shows.
    swaps = _sampler_swaps(fam, samplers)
    own = f"samples with its own {fam.scheduler or 'scheduler'}, which sdcli's samplers do not replace"
    refuse("--scheduler", s.scheduler and not swaps, own)
    refuse("--timestep-spacing", s.timestep_spacing and not swaps, own)
    refuse("--sigmas", s.sigmas != "default" and not swaps, own)
    refuse("--save-trajectory", s.save_trajectory and not _trajectory_readable(fam, samplers),
           f"samples with {fam.scheduler or 'a scheduler'}, whose estimate of the clean image sdcli cannot read")
    # 4. Guidance of the families sdcli knows, and tasks the pipeline has no diffusers twin for.
    refuse("--true-cfg", s.true_cfg, "is driven through its own guidance_scale (--guidance); sdcli's --true-cfg is "
           "Flux.1's")
    refuse("--distilled-guidance", s.distilled_guidance is not None,
           "is driven through its own guidance_scale (--guidance); --distilled-guidance is Flux.1's")
    refuse("--lora", s.loras and not hasattr(cls, "load_lora_weights"), "has no LoRA loader in diffusers")
    refuse("--controlnet", s.controlnets, "runs no ControlNet in sdcli (it runs them on SD 1.x, 2.x and XL)")
    refuse("--hires-scale", s.hires_scale is not None, "has no hires fix in sdcli (it needs the family's latents)")
    inner = task_name.partition("+")[0]
    if inner != "txt2img":
        from sdcli.families import task_pipeline_class

        flag = {"inpaint": "--mask", "outpaint": "--outpaint"}.get(inner, "--init-image")
        refuse(flag, inner in ("img2img", "inpaint", "outpaint") and task_pipeline_class(fam.class_name, inner) is None,
               f"has no {inner} pipeline in diffusers' AutoPipeline tables")
    return out


def settle_guidance(s: Any, facts: Any) -> None:
    """Fill in the guidance default: the pipeline's own ``guidance_scale`` default, else 1 (unguided)."""
    if not s.guidance:
        default = params(_diffusers_class(facts.class_name)).get("guidance_scale")
        value = getattr(default, "default", None)
        s.guidance = [float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0]
    if s.negative_prompt and not any(negative_applies(g) for g in s.guidance):
        raise UsageError(f"--negative-prompt: {facts.class_name} guides only above --guidance 1, so at "
                         f"{', '.join(f'{g:g}' for g in s.guidance)} nothing reads a negative prompt")


def negative_applies(guidance: float) -> bool:
    """diffusers' pipelines run classifier-free guidance, and read the negative prompt, only above 1."""
    return guidance > 1


# Generating ------------------------------------------------------------------------------------------------


def guidance_kwargs(pipe: Any, values: dict[str, Any]) -> dict[str, Any]:
    """A batch's guidance arguments: ``guidance_scale`` (and ``guidance_rescale``) where the pipeline takes them."""
    take = params(type(pipe))
    out: dict[str, Any] = {}
    if "guidance_scale" in take:
        out["guidance_scale"] = values["guidance"]
    if "guidance_rescale" in take:
        out["guidance_rescale"] = values["guidance_rescale"]
    return out


def call_kwargs(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` as ``pipe.__call__`` takes them: what it has no argument for is left out (`check` refused every
    such setting the user gave, so only sdcli's own defaults go), so is None (sdcli's "not given": the pipeline's
    own default applies, PixArt's negative prompt is "" and None breaks it), and progress goes through the older
    per-step ``callback`` where the pipeline has no ``callback_on_step_end``."""
    take = params(type(pipe))
    anything = any(p.kind == p.VAR_KEYWORD for p in take.values())
    step_end = kwargs.get("callback_on_step_end")
    out = {k: v for k, v in kwargs.items() if (anything or k in take) and v is not None}
    if step_end is not None and "callback_on_step_end" not in take and "callback" in take:
        out["callback"] = lambda i, t, latents: step_end(pipe, i, t, {"latents": latents})
        if "callback_steps" in take:
            out["callback_steps"] = 1
    return out


def default_size(pipe: Any) -> tuple[int, int]:
    """The pipeline's own default size: ``default_sample_size`` latents, or its denoiser's ``sample_size``, times
    the VAE's factor."""
    sample = getattr(pipe, "default_sample_size", None)
    if not sample:
        net = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        sample = net.config.get("sample_size") if net is not None else None
    if not sample:
        raise ModelError(f"{type(pipe).__name__} names no default size: pass --width and --height")
    sample = sample if isinstance(sample, int) else sample[0]
    factor = getattr(pipe, "vae_scale_factor", 8)
    return sample * factor, sample * factor


def check_flow_schedule(model: str, facts: Any, config: dict[str, Any], shift: float | None) -> None:
    """inspect-schedule on a generic flow-matching model: a static shift is the scheduler config's alone, but a
    resolution-dependent one is computed by each pipeline in its own way (its token count, its constants), which
    sdcli knows for SD3, Flux.1 and FLUX.2 only."""
    if config.get("use_dynamic_shifting") and shift is None:
        raise ModelError(f"--model {model}: {facts.class_name} shifts its flow-matching schedule by the image size "
                         "as its own pipeline computes it, which sdcli knows for SD3, Flux.1 and FLUX.2 only; pass "
                         "--shift to inspect it at a static shift")
