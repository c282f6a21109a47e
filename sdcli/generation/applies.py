"""Which generate settings shape the image on which model family, and for which task: checked before loading.

A setting the model would ignore must be refused, not recorded: an image's record names only what made it.
Each family lists the settings it ignores (`sdcli.families`: its ``ignores``); Flux-schnell is Flux without a
guidance input, which `sdcli.generation.guidance` handles with the rest of guidance (and the negative prompt,
which only a guided pass reads). Prompt editing is refused by `sdcli.generation.prompts.check_prompt_editing`.
"""

from __future__ import annotations

from typing import Any

from sdcli.errors import UsageError


def check_family(s: Any, facts: Any) -> None:
    """Refuse, in one line, the first setting this model's family would ignore (its ``ignores``)."""
    from sdcli.declare import setting_of
    from sdcli.generation.settings import Settings

    model = facts.class_name or "this model"
    if s.reference_images and len(s.reference_images) > facts.references:
        most = facts.references
        why = "takes no reference images (editing models do: FLUX.1 Kontext, FLUX.2)" if not most else \
            f"takes {'at most ' if most > 1 else ''}{most} reference image{'s' if most > 1 else ''}, not " \
            f"{len(s.reference_images)}"
        raise UsageError(f"--reference-image: {model} {why}", setting="reference_images")
    if facts.family.check is not None:
        facts.family.check(s, facts)
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
