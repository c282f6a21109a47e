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
    """How a sampler spaces its noise levels σ between σ_max and σ_min (AUTOMATIC1111's "Schedule type", ComfyUI's
    "scheduler"). The first four respace the σ's of the samplers that take a list of them; ComfyUI's normal, simple,
    sgm_uniform and ddim_uniform pick the timesteps, which diffusers does with its timestep spacing."""

    default = "default"  # the sampler's own
    karras = "karras"  # Karras et al. 2022: evenly in σ^(1/ρ), ρ = 7
    exponential = "exponential"  # evenly in log σ
    beta = "beta"  # Lee et al. 2024: a Beta(0.6, 0.6) quantile spacing
    normal = "normal"  # ComfyUI: timesteps evenly from T-1 to 0, both ends included
    simple = "simple"  # ComfyUI: every (T/steps)-th timestep from T-1 down
    sgm_uniform = "sgm_uniform"  # ComfyUI: steps+1 timesteps evenly from T-1 to 0, the last left out
    ddim_uniform = "ddim_uniform"  # ComfyUI: every (T/steps)-th timestep from 1 up


# The diffusers config flag of each σ spacing, and the timestep spacing of each of ComfyUI's timestep schedules.
SIGMA_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
TIMESTEP_SCHEDULES = {"normal": "linspace", "simple": "trailing", "sgm_uniform": "trailing", "ddim_uniform": "leading"}
# The name AUTOMATIC1111 writes for each ("Schedule type"), and the ones it reads that mean the same.
SIGMA_NAMES = {"default": "Automatic", "karras": "Karras", "exponential": "Exponential", "beta": "Beta",
               "normal": "Normal", "simple": "Simple", "sgm_uniform": "SGM Uniform", "ddim_uniform": "DDIM"}
SIGMA_ALIASES = {"automatic": "default", "uniform": "normal", "sgm uniform": "sgm_uniform", "ddim": "ddim_uniform"}
# Schedules AUTOMATIC1111 or ComfyUI offer that no diffusers sampler has: refused by name rather than as unknown.
NO_SUCH_SCHEDULE = ("polyexponential", "kl_optimal", "kl optimal", "align your steps", "align_your_steps", "ays",
                    "ays+", "ays_30", "ays_30+", "gits", "linear_quadratic", "laplace", "turbo")


def sigmas_of(text: str, flag: str = "--sigmas") -> str:
    """The σ spacing (a `Sigmas` value) named by ``text``: sdcli's name, AUTOMATIC1111's "Schedule type"
    ("Karras", "SGM Uniform") or ComfyUI's scheduler ("sgm_uniform"), in any case; UsageError naming ``flag``."""
    key = " ".join(str(text).split()).lower()
    key = SIGMA_ALIASES.get(key, key)
    if key.replace("-", "_") in SIGMA_NAMES:
        return key.replace("-", "_")
    if key in NO_SUCH_SCHEDULE:
        raise UsageError(f"{flag} {text!r}: diffusers has no such schedule; choose from: {', '.join(SIGMA_NAMES)}",
                         setting="sigmas")
    raise UsageError(f"{flag} {text!r}: not a σ spacing; choose from: {', '.join(SIGMA_NAMES)} (or AUTOMATIC1111's "
                     "Automatic, Karras, Exponential, Uniform, SGM Uniform, ...)", setting="sigmas")


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    class_name: str
    a1111: str  # "Sampler:" as AUTOMATIC1111 writes it
    schedule_type: str = "Automatic"  # "Schedule type:" as AUTOMATIC1111 writes it
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    requires: tuple[str, ...] = ()  # optional packages the diffusers class needs
    comfyui: tuple[str, ...] = ()  # ComfyUI's sampler_name(s) for it, with its schedule_type as ComfyUI's scheduler


# One table of names: sdcli's, AUTOMATIC1111's and ComfyUI's (the server's A1111 API reads it too).
SCHEDULERS: dict[str, SchedulerSpec] = {
    s.name: s
    for s in [
        SchedulerSpec("ddim", "DDIMScheduler", "DDIM", description="Song et al. 2020, deterministic",
                      comfyui=("ddim",)),
        SchedulerSpec("ddpm", "DDPMScheduler", "DDPM", description="Ho et al. 2020, ancestral; needs many steps",
                      comfyui=("ddpm",)),
        SchedulerSpec("pndm", "PNDMScheduler", "PLMS", overrides={"skip_prk_steps": True}, description="Liu et al. 2022 (PLMS)"),
        SchedulerSpec("euler", "EulerDiscreteScheduler", "Euler", description="Karras et al. 2022, Euler method",
                      comfyui=("euler",)),
        SchedulerSpec("euler-ancestral", "EulerAncestralDiscreteScheduler", "Euler a",
                      description="Euler with fresh noise each step", comfyui=("euler_ancestral",)),
        SchedulerSpec("heun", "HeunDiscreteScheduler", "Heun", description="Karras et al. 2022, 2nd order (2 UNet calls/step)",
                      comfyui=("heun",)),
        SchedulerSpec("lms", "LMSDiscreteScheduler", "LMS", description="linear multistep (needs scipy)",
                      requires=("scipy",), comfyui=("lms",)),
        SchedulerSpec("dpm++2m", "DPMSolverMultistepScheduler", "DPM++ 2M",
                      overrides={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
                      description="Lu et al. 2022, fast at 20-25 steps", comfyui=("dpmpp_2m",)),
        SchedulerSpec("dpm++2m-karras", "DPMSolverMultistepScheduler", "DPM++ 2M", "Karras",
                      overrides={"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                      description="DPM++ 2M with Karras sigmas", comfyui=("dpmpp_2m",)),
        SchedulerSpec("dpm++2m-sde", "DPMSolverMultistepScheduler", "DPM++ 2M SDE",
                      overrides={"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
                      description="stochastic DPM++ 2M", comfyui=("dpmpp_2m_sde", "dpmpp_2m_sde_gpu")),
        SchedulerSpec("dpm++2m-sde-karras", "DPMSolverMultistepScheduler", "DPM++ 2M SDE", "Karras",
                      overrides={"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                      description="stochastic DPM++ 2M with Karras sigmas", comfyui=("dpmpp_2m_sde", "dpmpp_2m_sde_gpu")),
        SchedulerSpec("dpm2", "KDPM2DiscreteScheduler", "DPM2", description="Karras et al. 2022, DPM-Solver-2",
                      comfyui=("dpm_2",)),
        SchedulerSpec("dpm2-ancestral", "KDPM2AncestralDiscreteScheduler", "DPM2 a", description="ancestral DPM2",
                      comfyui=("dpm_2_ancestral",)),
        # diffusers' UniPC is the bh2 variant (ComfyUI's uni_pc_bh2); ComfyUI's uni_pc and A1111's UniPC default to
        # bh1, a slightly different corrector: the nearest sampler diffusers has under that name.
        SchedulerSpec("unipc", "UniPCMultistepScheduler", "UniPC", description="Zhao et al. 2023, predictor-corrector",
                      comfyui=("uni_pc_bh2", "uni_pc")),
    ]
}


def resolve(name: str, sigmas: str = "default", flag: str = "--scheduler") -> tuple[SchedulerSpec, str]:
    """(spec, σ spacing) for a sampler named as sdcli ("euler-ancestral"), AUTOMATIC1111 ("Euler a", "DPM++ 2M
    Karras": the older names carry their schedule) or ComfyUI ("euler_ancestral", "dpmpp_2m") names it.

    ``sigmas`` is the σ spacing asked for beside it; where a sampler of the table is that sampler with that
    spacing (dpm++2m + karras is dpm++2m-karras) it is the one returned, with the spacing "default".
    UsageError naming ``flag`` for a name none of the three has.
    """
    text = " ".join(str(name).split())
    key = text.lower()
    candidates = [SCHEDULERS[key]] if key in SCHEDULERS else [s for s in SCHEDULERS.values() if key in s.comfyui]
    if not candidates:
        base = key
        for kind in ("karras", "exponential", "beta"):
            if key.endswith(" " + kind):  # AUTOMATIC1111's older names: "DPM++ 2M Karras", "LMS Karras"
                base, sigmas = key[: -len(kind) - 1], (kind if sigmas == "default" else sigmas)
        candidates = [s for s in SCHEDULERS.values() if s.a1111.lower() == base]
    if not candidates:
        raise UsageError(f"unknown scheduler {text!r}; choose from: {', '.join(SCHEDULERS)} (or their AUTOMATIC1111 "
                         "or ComfyUI names: sdcli schedulers lists them)", setting="scheduler")
    base_spec = candidates[0]
    family = [s for s in SCHEDULERS.values() if s.a1111 == base_spec.a1111]
    wanted = SIGMA_NAMES.get(sigmas, "Automatic")
    folded = next((s for s in family if s.schedule_type == wanted), None)
    if folded is not None and (base_spec.schedule_type == "Automatic" or sigmas != "default"):
        return folded, "default"
    return base_spec, sigmas


def settle(name: str | None, sigmas: str = "default") -> tuple[str | None, str]:
    """(sdcli's sampler name, σ spacing) for a sampler and spacing as any of the three vocabularies name them;
    None keeps the model's own sampler (AUTOMATIC1111's "Automatic" too)."""
    sigmas = sigmas_of(sigmas)
    if name is None or not str(name).strip() or str(name).strip().lower() == "automatic":
        return None, sigmas
    spec, sigmas = resolve(name, sigmas)
    return spec.name, sigmas


# Class names mapped back to a friendly name, for describing a model's own scheduler.
_BY_CLASS = {}
for _spec in SCHEDULERS.values():
    _BY_CLASS.setdefault(_spec.class_name, _spec)


def get_spec(name: str) -> SchedulerSpec:
    """The spec of a sampler name; UsageError if unknown or if a package it needs is not installed."""
    import importlib.util

    spec, _ = resolve(name)
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


def schedule_type(scheduler: Any, sigmas: str = "default") -> str:
    """AUTOMATIC1111's "Schedule type" of a scheduler instance: its σ spacing, else what its spec says; ``sigmas``
    the spacing asked for, which names ComfyUI's timestep schedules (their config holds only a timestep spacing)."""
    if sigmas in TIMESTEP_SCHEDULES:
        return SIGMA_NAMES[sigmas]
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
    params = inspect.signature(cls.__init__).parameters
    if sigmas in TIMESTEP_SCHEDULES:
        # ComfyUI's timestep schedules: the model's own σ's at the timesteps diffusers' spacing picks.
        if "timestep_spacing" not in params:
            raise UsageError(f"--sigmas {sigmas}: the {sampler} sampler has no timestep spacing", setting="sigmas")
        return {"timestep_spacing": TIMESTEP_SCHEDULES[sigmas], **{f: False for f in SIGMA_FLAGS.values() if f in params}}
    flag = SIGMA_FLAGS[sigmas]
    if flag not in params:
        # DDIM, DDPM, PLMS and Euler a step through timesteps, not a list of σ's they could respace.
        raise UsageError(f"--sigmas {sigmas}: the {sampler} sampler has no choice of σ spacing; use it with euler, "
                         "heun, lms, dpm++2m, dpm2 or unipc, or leave --sigmas default", setting="sigmas")
    if sigmas == "beta" and importlib.util.find_spec("scipy") is None:
        raise UsageError("--sigmas beta needs scipy, which is not installed: pip install scipy", setting="sigmas")
    # diffusers refuses more than one spacing at once, and a -karras sampler sets its own.
    return {f: f == flag for f in SIGMA_FLAGS.values()}


def check_spacings(sigmas: str, timestep_spacing: str | None) -> None:
    """UsageError where --sigmas names one of ComfyUI's timestep schedules and --timestep-spacing another spacing."""
    spacing = TIMESTEP_SCHEDULES.get(sigmas)
    if spacing is not None and timestep_spacing is not None and timestep_spacing != spacing:
        raise UsageError(f"--sigmas {sigmas} spaces the timesteps as --timestep-spacing {spacing} does, not "
                         f"{timestep_spacing}; give one of the two", setting="sigmas")


def make_scheduler(name: str | None, base_config: dict[str, Any], timestep_spacing: str | None = None,
                   sigmas: str = "default"):
    """Build the named scheduler from a model's scheduler config (its betas, prediction type, ...).

    ``name=None`` keeps the model's own class; any of the three vocabularies names one (`resolve`). Only the
    settings that define the sampler change; the training schedule stays the model's. ``sigmas`` respaces the
    noise levels of the samplers that take a list of σ's, or picks the timesteps (ComfyUI's normal, ...).
    """
    import diffusers

    config = dict(base_config)
    name, sigmas = settle(name, sigmas)
    check_spacings(sigmas, timestep_spacing)
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
                             "about 4519 (pure noise), leaving no steps for the image; use --sigmas karras or "
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


def describe() -> list[dict[str, Any]]:
    """Rows for `sdcli schedulers`: each sampler's names in sdcli, AUTOMATIC1111 and ComfyUI (sampler, then the
    scheduler that goes with it where it is not the default one)."""
    rows = []
    for s in SCHEDULERS.values():
        spaced = s.schedule_type != "Automatic"
        rows.append({"name": s.name, "class": s.class_name,
                     "a1111": s.a1111 + (f" {s.schedule_type}" if spaced else ""),
                     "a1111_schedule_type": s.schedule_type,
                     "comfyui": [c + (f" + {s.schedule_type.lower()}" if spaced else "") for c in s.comfyui],
                     "description": s.description})
    return rows


def describe_sigmas() -> list[dict[str, Any]]:
    """Rows for `sdcli schedulers`' σ spacings: --sigmas, AUTOMATIC1111's "Schedule type", ComfyUI's scheduler."""
    return [{"sigmas": key, "a1111": a1111, "comfyui": None if key == "default" else key,
             "timestep_spacing": TIMESTEP_SCHEDULES.get(key)} for key, a1111 in SIGMA_NAMES.items()]


def takes_eta(class_name: str) -> bool:
    """Whether the diffusers scheduler class ``class_name`` takes DDIM's η in its step (unknown classes: no)."""
    import inspect

    import diffusers

    cls = getattr(diffusers, class_name, None)
    return cls is not None and "eta" in inspect.signature(cls.step).parameters
