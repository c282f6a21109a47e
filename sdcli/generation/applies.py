"""Which generate settings shape the image on which model family, and for which task: checked before loading.

A setting the model would ignore must be refused, not recorded: an image's record names only what made it.
Each family lists the settings it ignores (`sdcli.families`: its ``ignores``); Flux-schnell is Flux without a
guidance input, which `sdcli.generation.guidance` handles with the rest of guidance (and the negative prompt,
which only a guided pass reads). Prompt editing is refused by `sdcli.generation.prompts.check_prompt_editing`.
"""

from __future__ import annotations

from typing import Any

from sdcli.errors import UsageError
from sdcli.families import takes, task_pipeline_class


def check_family(s: Any, facts: Any, task: str = "txt2img") -> None:
    """Refuse, in one line, the first setting this model would not honour: what its own check finds (the generic
    family asks its pipeline's __call__), then what its family ignores (its ``ignores``)."""
    from sdcli.declare import setting_of
    from sdcli.generation.settings import Settings
    from sdcli.schedule.samplers import SCHEDULERS

    model = facts.class_name or "this model"
    if s.reference_images and len(s.reference_images) > facts.references:
        most = facts.references
        why = "takes no reference images (editing models do: FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit)" if not most else \
            f"takes {'at most ' if most > 1 else ''}{most} reference image{'s' if most > 1 else ''}, not " \
            f"{len(s.reference_images)}"
        raise UsageError(f"--reference-image: {model} {why}", setting="reference_images")
    if facts.family.check is not None:
        samplers = frozenset(spec.class_name for spec in SCHEDULERS.values())
        for flag, why in facts.family.check(s, facts, task, samplers)[:1]:
            raise UsageError(f"{flag}: {model} {why}", setting=setting_of(Settings, flag.split()[0]))
    for rule in facts.family.ignores:
        given = rule.given(s)
        if given:
            raise UsageError(f"{rule.flag}: " + rule.why.format(model=model, given=given),
                             setting=setting_of(Settings, rule.flag))


# What a task-scoped setting needs before it does anything (the tasks of `sdcli.generation.tasks`).
NEEDS = {"img2img": "--init-image", "inpaint": "--mask", "outpaint": "--outpaint", "hires": "--hires-scale",
         "controlnet": "--controlnet", "edit": "--reference-image"}


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
            raise UsageError(f"{d.flag} does nothing without {needs}", setting=d.name)


def check_rescale(s: Any, facts: Any, task: Any) -> None:
    """--guidance-rescale on a task whose diffusers pipeline has none (SD 1.x/2.x img2img, most ControlNet ones);
    a family without it at all has refused it already (`check_family`)."""
    if not any(s.guidance_rescale) or task.name in ("txt2img", "hires"):
        return
    cls = task_pipeline_class(facts.class_name, task.name)
    if cls is not None and not takes(cls, "guidance_rescale"):
        raise UsageError(f"--guidance-rescale: {cls.__name__} has no guidance rescale (only the text-to-image "
                         "pipelines do)", setting="guidance_rescale")


def check_eta(s: Any, facts: Any) -> None:
    """--eta on a sampler whose step has no η (of sdcli's, only DDIM's has one): the image would not change.
    The sampler is --scheduler's, else the one the model comes with; a single-file model's is checked as it
    loads (`sdcli.generation.engine`)."""
    if not s.eta:
        return
    from sdcli.schedule.samplers import get_spec, takes_eta

    if facts.family.flow:
        raise UsageError(f"--eta: {facts.class_name} samples by flow matching, which has no η (DDIM's)", setting="eta")
    name = get_spec(s.scheduler).class_name if s.scheduler else facts.scheduler
    if name is not None and not takes_eta(name):
        sampler = f"--scheduler {s.scheduler}" if s.scheduler else f"this model's {name}"
        raise UsageError(f"--eta: {sampler} has no η (it belongs to DDIM: add --scheduler ddim)", setting="eta")
