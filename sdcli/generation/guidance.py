"""Guidance as each model family has it: classifier-free guidance as the formula says (SD, SDXL, SD3), or
Flux-dev's distilled guidance input, with real classifier-free guidance only when asked for (--true-cfg)."""

from __future__ import annotations

from typing import Any

from sdcli import defaults
from sdcli.errors import UsageError


def settle_guidance(s: Any, facts: Any) -> None:
    """Check the guidance settings against the model's kind of guidance and fill in its defaults.

    ``facts`` is `sdcli.families.ModelFacts`: ``guidance`` is "cfg", "distilled" (Flux-dev) or "none"
    (Flux-schnell). In the design notes' terms, classifier-free guidance runs the model twice and
    extrapolates ε_uncond + g·(ε_cond − ε_uncond); a distilled model was trained to produce that result
    in one pass, from g given as an input.
    """
    name = facts.class_name or "this model"
    if facts.guidance == "generic":  # a pipeline of no family file: its own default, diffusers' convention
        from sdcli.families import generic

        return generic.settle_guidance(s, facts)
    _settle(s, facts, name)
    knob = facts.family.knob
    # The negative prompt is read only by a guided pass: refuse it where no image of the run has one.
    if s.negative_prompt and not any(negative_applies(s, facts.guidance, g, knob) for g in s.guidance):
        if facts.guidance == "none":
            why = f"{name} has no guidance (a distilled model that needs none), so nothing reads a negative prompt"
        elif facts.guidance == "own":
            why = (f"{name} guides only above --guidance {knob.unguided:g}, so at "
                   f"{', '.join(f'{g:g}' for g in s.guidance)} nothing reads a negative prompt")
        elif facts.guidance == "distilled":
            why = (f"{name}'s distilled guidance reads no negative prompt; add --true-cfg and --guidance above 1 "
                   "for real classifier-free guidance against it")
        else:
            why = "at --guidance 1 there is no unconditional pass to steer away with; give another --guidance"
        raise UsageError(f"--negative-prompt: {why}", setting="negative_prompt")


def negative_applies(s: Any, kind: str, guidance: float, knob: Any = None) -> bool:
    """Whether an image at ``guidance`` reads the negative prompt: classifier-free guidance runs its unconditional
    branch for any scale but 1 (`use_formula_guidance`); Flux's true CFG, as diffusers runs it, only above 1; a
    family's own guidance argument above its unguided value (`sdcli.families.base.Knob`)."""
    if kind == "cfg":
        return guidance != 1
    if kind == "own":
        return knob.guides(guidance)
    if kind == "generic":
        from sdcli.families import generic

        return generic.negative_applies(guidance)
    return kind == "distilled" and s.true_cfg and guidance > 1


def _settle(s: Any, facts: Any, name: str) -> None:
    # A family without guidance rescale has refused it already (its ``ignores``, `sdcli.generation.applies`),
    # and one with its own guidance argument has refused Flux's --true-cfg and --distilled-guidance.
    if facts.guidance == "own":
        s.guidance = s.guidance or [facts.family.knob.default]
        return
    if facts.guidance == "cfg":
        if s.distilled_guidance is not None:
            raise UsageError(f"--distilled-guidance: {name} has no guidance input; its --guidance is classifier-free",
                             setting="distilled_guidance")
        if s.true_cfg:
            raise UsageError(f"--true-cfg: {name}'s --guidance is classifier-free guidance already", setting="true_cfg")
        s.guidance = s.guidance or [facts.defaults.get("guidance", defaults.GUIDANCE)]
        return
    if facts.guidance == "none":
        if s.distilled_guidance is not None or s.true_cfg or any(g != 1 for g in s.guidance):
            given = ("guidance" if any(g != 1 for g in s.guidance) else
                     "distilled_guidance" if s.distilled_guidance is not None else "true_cfg")
            raise UsageError(f"{name} has no guidance input (a distilled model that needs none, like Flux-schnell): "
                             "drop --guidance, --distilled-guidance and --true-cfg", setting=given)
        s.guidance = [1.0]
        return
    if s.true_cfg and not any(g > 1 for g in s.guidance):
        raise UsageError("--true-cfg needs --guidance above 1: the classifier-free scale to apply", setting="true_cfg")
    if s.true_cfg and any(g < 1 for g in s.guidance):
        # diffusers' Flux runs true CFG only above 1; below, the image would be the unguided one.
        bad = next(g for g in s.guidance if g < 1)
        raise UsageError(f"--guidance {bad:g}: with --true-cfg, {name} guides only above 1 (1 is unguided)",
                         setting="guidance")
    if not s.true_cfg and any(g != 1 for g in s.guidance):
        bad = next(g for g in s.guidance if g != 1)
        raise UsageError(f"--guidance {bad:g}: {name}'s guidance is distilled into the model (--distilled-guidance, "
                         f"default {defaults.DISTILLED_GUIDANCE:g}), not classifier-free; add --true-cfg for real "
                         "classifier-free guidance against the negative prompt", setting="guidance")
    s.guidance = s.guidance or [1.0]
    if s.distilled_guidance is None:
        s.distilled_guidance = facts.defaults.get("distilled_guidance", defaults.DISTILLED_GUIDANCE)


def guidance_kwargs(s: Any, pipe: Any, values: dict[str, Any]) -> dict[str, Any]:
    """A batch's guidance arguments for ``pipe``: the classifier-free scale (and rescale, where the pipeline
    has it), or Flux's distilled guidance and, with --true-cfg, its real classifier-free scale."""
    import inspect

    from sdcli.families import pipe_family

    takes = inspect.signature(type(pipe).__call__).parameters
    family = pipe_family(pipe)
    kind = family.guidance_of(pipe)  # the model's own (FLUX.2 Klein guides by CFG, FLUX.2-dev not)
    if family.knob is not None:  # its own argument; a model of the family without guidance gets its unguided value
        return {family.knob.argument: family.knob.unguided if kind == "none" else values["guidance"]}
    if kind == "generic":  # what its signature takes
        from sdcli.families import generic

        return generic.guidance_kwargs(pipe, values)
    if kind != "distilled":
        out = {"guidance_scale": values["guidance"]}
        if "guidance_rescale" in takes:
            out["guidance_rescale"] = values["guidance_rescale"]
        elif values["guidance_rescale"]:
            # diffusers' img2img and inpainting pipelines have no rescale and would drop it without a word.
            raise UsageError(f"--guidance-rescale: {type(pipe).__name__} has no guidance rescale "
                             "(only the text-to-image pipelines do)", setting="guidance_rescale")
        return out
    out = {"guidance_scale": s.distilled_guidance if s.distilled_guidance is not None else 1.0}
    if s.true_cfg:
        out["true_cfg_scale"] = values["guidance"]
    return out


def use_formula_guidance(pipe: Any) -> None:
    """Make guidance follow ε = ε_uncond + g·(ε_cond − ε_uncond) for every g ≥ 0.

    diffusers skips the unconditional branch for g ≤ 1 (using ε_cond alone),
    which is right at g = 1 but not below it: g = 0 should give the model's
    unconditional prediction. We keep diffusers' shortcut only at exactly 1.
    """
    cls = type(pipe)
    if getattr(cls, "_sdcli_formula_guidance", False) or not hasattr(cls, "do_classifier_free_guidance"):
        return
    from sdcli.families import pipe_family

    family = pipe_family(pipe)
    if family.guidance == "generic" or family.knob is not None:  # guided as its pipeline guides it
        return

    def do_cfg(self) -> bool:
        # A UNet with a guidance-embedding input (LCM-style) has guidance distilled in: no second branch.
        unet = getattr(self, "unet", None)
        return self._guidance_scale != 1 and (unet is None or unet.config.time_cond_proj_dim is None)

    pipe.__class__ = type(cls.__name__, (cls,), {"_sdcli_formula_guidance": True,
                                                 "do_classifier_free_guidance": property(do_cfg)})
