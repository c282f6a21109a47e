"""Friendly sampler names mapped to diffusers scheduler classes and settings.

We never re-implement a sampler: each name is a diffusers class plus the
config overrides that make it the sampler people know by that name (the
AUTOMATIC1111 name is kept for image metadata other tools read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sdcli.errors import UsageError


class Sigmas(str, Enum):
    """How a sampler spaces its noise levels σ between σ_max and σ_min (AUTOMATIC1111's "Schedule type")."""

    default = "default"  # the sampler's own
    karras = "karras"  # Karras et al. 2022: evenly in σ^(1/ρ), ρ = 7
    exponential = "exponential"  # evenly in log σ
    beta = "beta"  # Lee et al. 2024: a Beta(0.6, 0.6) quantile spacing


# The diffusers config flag of each spacing, and the name AUTOMATIC1111 writes for it.
SIGMA_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
SIGMA_NAMES = {"karras": "Karras", "exponential": "Exponential", "beta": "Beta"}


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    class_name: str
    a1111: str  # "Sampler:" as AUTOMATIC1111 writes it
    schedule_type: str = "Automatic"  # "Schedule type:" as AUTOMATIC1111 writes it
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    requires: tuple[str, ...] = ()  # optional packages the diffusers class needs


SCHEDULERS: dict[str, SchedulerSpec] = {
    s.name: s
    for s in [
        SchedulerSpec("ddim", "DDIMScheduler", "DDIM", description="Song et al. 2020, deterministic"),
        SchedulerSpec("ddpm", "DDPMScheduler", "DDPM", description="Ho et al. 2020, ancestral; needs many steps"),
        SchedulerSpec("pndm", "PNDMScheduler", "PLMS", overrides={"skip_prk_steps": True}, description="Liu et al. 2022 (PLMS)"),
        SchedulerSpec("euler", "EulerDiscreteScheduler", "Euler", description="Karras et al. 2022, Euler method"),
        SchedulerSpec("euler-ancestral", "EulerAncestralDiscreteScheduler", "Euler a", description="Euler with fresh noise each step"),
        SchedulerSpec("heun", "HeunDiscreteScheduler", "Heun", description="Karras et al. 2022, 2nd order (2 UNet calls/step)"),
        SchedulerSpec("lms", "LMSDiscreteScheduler", "LMS", description="linear multistep (needs scipy)",
                      requires=("scipy",)),
        SchedulerSpec("dpm++2m", "DPMSolverMultistepScheduler", "DPM++ 2M",
                      overrides={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
                      description="Lu et al. 2022, fast at 20-25 steps"),
        SchedulerSpec("dpm++2m-karras", "DPMSolverMultistepScheduler", "DPM++ 2M", "Karras",
                      overrides={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                      description="DPM++ 2M with Karras sigmas"),
        SchedulerSpec("dpm++2m-sde-karras", "DPMSolverMultistepScheduler", "DPM++ 2M SDE", "Karras",
                      overrides={"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                      description="stochastic DPM++ 2M with Karras sigmas"),
        SchedulerSpec("dpm2", "KDPM2DiscreteScheduler", "DPM2", description="Karras et al. 2022, DPM-Solver-2"),
        SchedulerSpec("dpm2-ancestral", "KDPM2AncestralDiscreteScheduler", "DPM2 a", description="ancestral DPM2"),
        SchedulerSpec("unipc", "UniPCMultistepScheduler", "UniPC", description="Zhao et al. 2023, predictor-corrector"),
    ]
}

# Class names mapped back to a friendly name, for describing a model's own scheduler.
_BY_CLASS = {}
for _spec in SCHEDULERS.values():
    _BY_CLASS.setdefault(_spec.class_name, _spec)


def get_spec(name: str) -> SchedulerSpec:
    """The spec of a sampler name; UsageError if unknown or if a package it needs is not installed."""
    import importlib.util

    key = name.strip().lower()
    if key not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {name!r}; choose from: {', '.join(SCHEDULERS)}", setting="scheduler")
    spec = SCHEDULERS[key]
    # scipy is optional: importing it costs every run half a second, and only LMS uses it.
    missing = [pkg for pkg in spec.requires if importlib.util.find_spec(pkg) is None]
    if missing:
        raise UsageError(f"the {spec.name} sampler needs {', '.join(missing)}, which is not installed: "
                         f"pip install {' '.join(missing)}", setting="scheduler")
    return spec


def spec_for(scheduler: Any) -> SchedulerSpec:
    """The spec describing a scheduler instance (for metadata), falling back to its class name."""
    cls = type(scheduler).__name__
    config = dict(scheduler.config)
    for spec in SCHEDULERS.values():
        if spec.class_name == cls and all(config.get(k) == v for k, v in spec.overrides.items()):
            return spec
    if cls in _BY_CLASS:
        return _BY_CLASS[cls]
    return SchedulerSpec(name=cls, class_name=cls, a1111=cls)


def schedule_type(scheduler: Any) -> str:
    """AUTOMATIC1111's "Schedule type" of a scheduler instance: its σ spacing, else what its spec says."""
    config = dict(scheduler.config)
    for kind, flag in SIGMA_FLAGS.items():
        if config.get(flag):
            return SIGMA_NAMES[kind]
    return spec_for(scheduler).schedule_type


def sigma_overrides(cls: type, sigmas: str, sampler: str) -> dict[str, Any]:
    """The config flags that give ``cls`` the σ spacing ``sigmas``; UsageError if it has no such choice."""
    import importlib.util
    import inspect

    if sigmas == Sigmas.default.value:
        return {}
    flag = SIGMA_FLAGS[sigmas]
    if flag not in inspect.signature(cls.__init__).parameters:
        # DDIM, DDPM, PLMS and Euler a step through timesteps, not a list of σ's they could respace.
        raise UsageError(f"--sigmas {sigmas}: the {sampler} sampler has no choice of σ spacing; use it with euler, "
                         "heun, lms, dpm++2m, dpm2 or unipc, or leave --sigmas default", setting="sigmas")
    if sigmas == "beta" and importlib.util.find_spec("scipy") is None:
        raise UsageError("--sigmas beta needs scipy, which is not installed: pip install scipy", setting="sigmas")
    # diffusers refuses more than one spacing at once, and a -karras sampler sets its own.
    return {f: f == flag for f in SIGMA_FLAGS.values()}


def make_scheduler(name: str | None, base_config: dict[str, Any], timestep_spacing: str | None = None,
                   sigmas: str = "default"):
    """Build the named scheduler from a model's scheduler config (its betas, prediction type, ...).

    ``name=None`` keeps the model's own class. Only the settings that define the
    sampler change; the training schedule stays the model's. ``sigmas`` respaces the
    noise levels of the samplers that take a list of σ's.
    """
    import diffusers

    config = dict(base_config)
    if name is None:
        cls = getattr(diffusers, config.get("_class_name", "DDIMScheduler"))
        overrides: dict[str, Any] = {}
    else:
        spec = get_spec(name)
        cls = getattr(diffusers, spec.class_name)
        overrides = dict(spec.overrides)
    sampler = name or get_spec_name(cls.__name__)
    if timestep_spacing is not None:
        import inspect

        if "timestep_spacing" not in inspect.signature(cls.__init__).parameters:
            # from_config would drop it without a word (flow-matching samplers have none).
            raise UsageError(f"--timestep-spacing: the {sampler} sampler has no timestep spacing",
                             setting="timestep_spacing")
        overrides["timestep_spacing"] = timestep_spacing
    overrides.update(sigma_overrides(cls, sigmas, sampler))
    spaced = next((kind for kind, flag in SIGMA_FLAGS.items() if overrides.get(flag)), None)
    if spaced and config.get("rescale_betas_zero_snr"):
        # Karras et al. space σ between σ_min and a finite σ_max; at zero terminal SNR σ_max is infinite.
        if spaced == "beta":
            # Beta quantiles are spread linearly in σ: from σ_max ≈ 4519 all but the last steps are pure noise.
            raise UsageError(f"--sigmas beta spaces σ linearly up to σ_max, which a zero-terminal-SNR model has at "
                             f"about 4519 (pure noise), leaving no steps for the image; use --sigmas karras or "
                             "exponential", setting="sigmas")
        overrides.update(finite_terminal_betas(config))
        cls = _from_the_first_step(cls)
    return cls.from_config(config, **overrides)


def _from_the_first_step(cls: type) -> type:
    """``cls``, starting a text-to-image run at its first step even when its first timesteps repeat.

    Spaced σ's near a large σ_max round to the same t (999, 999, 998, ... as in ComfyUI, where the σ's
    differ and the t only conditions the model); diffusers' multistep samplers find their first step by
    looking its t up and take the second match, so they ran one step past their last. An image-to-image
    pipeline sets its own begin index after `set_timesteps`, which still wins. Same name, so records and
    configs read as ``cls``.
    """
    import inspect

    if not hasattr(cls, "set_begin_index"):
        return cls

    def set_timesteps(self, *args, **kwargs):
        cls.set_timesteps(self, *args, **kwargs)
        if len(self.timesteps) > 1 and self.timesteps[0] == self.timesteps[1]:
            self.set_begin_index(0)

    set_timesteps.__signature__ = inspect.signature(cls.set_timesteps)  # pipelines ask it what it takes
    return type(cls.__name__, (cls,), {"set_timesteps": set_timesteps, "__module__": cls.__module__})


# ComfyUI's last ᾱ for a zero-terminal-SNR model (its rescale_zero_terminal_snr_sigmas): σ_max ≈ 4519.
TERMINAL_ALPHA_BAR = 4.8973451890853435e-08


def finite_terminal_betas(config: dict[str, Any]) -> dict[str, Any]:
    """Config overrides that give a zero-terminal-SNR schedule a large finite last σ instead of an infinite one.

    The betas are the model's, rescaled to zero terminal SNR (Lin et al. 2023) as diffusers does, except that
    the last ᾱ is `TERMINAL_ALPHA_BAR` instead of 0, as ComfyUI does: σ spacings (Karras, exponential, beta)
    then run from σ_max ≈ 4519 down, a step at that σ being pure noise to the model, and every other step
    is where it was. diffusers' own stand-in (ᾱ = 2^-24, σ ≈ 4096) is in only some samplers.
    """
    import numpy as np
    from diffusers import DDPMScheduler

    rescaled = DDPMScheduler.from_config({**config, "rescale_betas_zero_snr": True})
    alpha_bar = rescaled.alphas_cumprod.double().numpy()
    alpha_bar[-1] = TERMINAL_ALPHA_BAR
    betas = 1 - alpha_bar / np.concatenate([[1.0], alpha_bar[:-1]])
    return {"trained_betas": betas.tolist(), "rescale_betas_zero_snr": False}


def get_spec_name(class_name: str) -> str:
    """The friendly name of a scheduler class, for messages; the class name when it has none."""
    spec = _BY_CLASS.get(class_name)
    return spec.name if spec else class_name


def describe() -> list[dict[str, str]]:
    """Rows for `sdcli schedulers`."""
    return [
        {"name": s.name, "class": s.class_name, "a1111": s.a1111 + ("" if s.schedule_type == "Automatic" else f" {s.schedule_type}"),
         "description": s.description}
        for s in SCHEDULERS.values()
    ]


def takes_eta(class_name: str) -> bool:
    """Whether the diffusers scheduler class ``class_name`` takes DDIM's η in its step (unknown classes: no)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, class_name, None)
    return cls is not None and "eta" in inspect.signature(cls.step).parameters
