"""Which generate settings shape the image on which model family, and for which task: data, checked before loading.

A setting the model would ignore must be refused, not recorded: an image's record names only what made it.
The families are `sdcli.pipeline.FAMILIES`' names (sd, sdxl, sd3, flux); Flux-schnell is Flux without a
guidance input, which `sdcli.generation.guidance` handles with the rest of guidance (and the negative prompt,
which only a guided pass reads). Prompt editing is refused by `sdcli.generation.prompts.check_prompt_editing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sdcli.errors import UsageError

FLOW = ("sd3", "flux")  # flow-matching families: diffusers encodes their prompts and samples with its flow sampler
ENCODED_BY_SDCLI = "SD 1.x, 2.x and XL, whose prompts sdcli encodes itself"


def uses_a1111_syntax(prompt: str) -> bool:
    """Whether AUTOMATIC1111's syntax would change what ``prompt`` means: a weight, BREAK or an escape."""
    from sdcli.generation.prompts import parse_weights

    parsed = parse_weights(prompt)
    return parsed.text != prompt or any(piece is None or piece[1] != 1 for piece in parsed.pieces)


def _syntax_in(s: Any) -> str | None:
    if s.prompt_syntax != "a1111":
        return None
    return next((p for p in [*s.prompts, s.negative_prompt] if p and uses_a1111_syntax(p)), None)


@dataclass(frozen=True)
class Rule:
    """A setting that does nothing on ``families``: ``given`` says whether these settings ask for it."""

    flag: str
    families: tuple[str, ...]
    given: Callable[[Any], Any]
    why: str  # completes "{flag}: {model} ..." ({model} is the pipeline class)


RULES = (
    Rule("--clip-skip", FLOW, lambda s: s.clip_skip != 1,
         f"{{model}} reads its prompts through diffusers' own encoders; clip skip works on {ENCODED_BY_SDCLI}"),
    Rule("--prompt-syntax a1111", FLOW, _syntax_in,
         "{model} reads prompts as plain text, so the weights, BREAK or escapes of {given!r} would reach it as "
         f"literal characters (they work on {ENCODED_BY_SDCLI}); drop them, or pass --prompt-syntax plain to mean "
         "them as text"),
    Rule("--embedding", FLOW, lambda s: ", ".join(Path(path).name for path, _token in s.embeddings),
         "{given}: textual-inversion embeddings need a Stable Diffusion 1.x, 2.x or XL model, whose CLIP encoders "
         "sdcli loads them into; {model} reads its prompts through diffusers' own encoders and would not read them"),
    Rule("--scheduler", FLOW, lambda s: s.scheduler,
         "sdcli's samplers are DDPM samplers (noise or v prediction); {model} is a flow-matching model and samples "
         "with its own flow-matching Euler sampler (--sigmas respaces it)"),
    Rule("--timestep-spacing", FLOW, lambda s: s.timestep_spacing,
         "{model}'s flow-matching sampler has no timestep spacing (--sigmas respaces its σ's)"),
    Rule("--hires-upscaler latent", ("flux",), lambda s: s.hires_scale is not None and s.hires_upscaler == "latent",
         "{model} packs its latents into 2x2 patches, which sdcli does not enlarge; use --hires-upscaler lanczos"),
)


def check_family(s: Any, facts: Any) -> None:
    """Refuse, in one line, the first setting this model's family would ignore (`RULES`)."""
    model = facts.class_name or "this model"
    if facts.family.name == "generic":  # FAMILY HOOK (generic): what its __call__ takes decides
        from sdcli.families import generic

        return generic.check(s, facts)
    for rule in RULES:
        if facts.family.name in rule.families:
            given = rule.given(s)
            if given:
                raise UsageError(f"{rule.flag}: " + rule.why.format(model=model, given=given))


# What a task-scoped setting needs before it does anything (the tasks of `sdcli.generation.tasks`).
NEEDS = {"img2img": "--init-image", "inpaint": "--mask", "outpaint": "--outpaint", "hires": "--hires-scale",
         "controlnet": "--controlnet"}


def check_task(s: Any, task: Any) -> None:
    """Refuse a setting of a task that does not run (--strength without --init-image, --hires-steps without
    --hires-scale): its default is what ran, and the record would not name it."""
    from sdcli.generation.settings import Settings
    from sdcli.declare import declared

    running = set(task.name.split("+"))
    for d in declared(Settings):
        if d.tasks and not running & set(d.tasks) and getattr(s, d.name) != d.default:
            # Every task that starts from an image needs --init-image first (--mask and --outpaint need it too).
            needs = NEEDS["img2img"] if "img2img" in d.tasks else " or ".join(NEEDS[t] for t in d.tasks if t in NEEDS)
            raise UsageError(f"{d.flag} does nothing without {needs}")


def check_rescale(s: Any, facts: Any, task: Any) -> None:
    """--guidance-rescale on a task whose diffusers pipeline has none (SD 1.x/2.x img2img, most ControlNet ones)."""
    if not any(s.guidance_rescale) or facts.family.name in FLOW or task.name in ("txt2img", "hires"):
        return
    cls = task_pipeline_class(facts.class_name, task.name)
    if cls is not None and not takes(cls, "guidance_rescale"):
        raise UsageError(f"--guidance-rescale: {cls.__name__} has no guidance rescale (only the text-to-image "
                         "pipelines do)")


def takes(cls: type, parameter: str) -> bool:
    import inspect

    return parameter in inspect.signature(cls.__call__).parameters


def task_pipeline_class(class_name: str | None, task_name: str) -> type | None:
    """The diffusers pipeline class a task runs for a model, from diffusers' own task tables (no weights load);
    None where they do not say."""
    try:
        from diffusers.pipelines import auto_pipeline as auto
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return None
    inner, _, control = task_name.partition("+")
    table = {"txt2img": auto.AUTO_TEXT2IMAGE_PIPELINES_MAPPING, "img2img": auto.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
             "inpaint": auto.AUTO_INPAINT_PIPELINES_MAPPING, "outpaint": auto.AUTO_INPAINT_PIPELINES_MAPPING}[inner]
    key = next((k for m in auto.SUPPORTED_TASKS_MAPPINGS for k, c in m.items() if c.__name__ == class_name), None)
    if key is None:
        return None
    key = f"{key}-controlnet" if control and not key.endswith("-controlnet") else key
    return table.get(key)
