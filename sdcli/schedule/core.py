"""The noise schedule of a diffusion model as plain numbers: what `sdcli inspect-schedule` shows.

Every schedule is held as its forward process x_t = α_t·x_0 + σ_t·ε: a signal
scale α_t and a noise scale σ_t over the training timesteps (Kingma et al. 2021,
Variational Diffusion Models), with SNR = α²/σ² and log-SNR from them. That is
the one shape both families fit: DDPM's β_t and ᾱ_t give α_t = √ᾱ_t and
σ_t = √(1−ᾱ_t), and flow matching (SD3, Flux) gives σ_t with α_t = 1 − σ_t. The
quantities only one family has (β, ᾱ) ride along as that family's extras.

Two diffusers schedulers are built from one config. The *forward process* is
read off `DDPMScheduler` (the class diffusers' training scripts add noise with;
it implements every beta schedule and the zero-terminal-SNR rescale). The
*sampler* is the model's own scheduler class, or the one named with
`--scheduler`, and says which timesteps inference visits. Every β, ᾱ and
timestep is read off those instances; the only arithmetic of our own is
(α, σ) from ᾱ, the SNR, and the closed-form jump, all checked against diffusers
in tests.

Notation clash, kept on purpose: Ho et al. 2020 write α_t = 1 − β_t, and that
number is the `alpha` key of a DDPM row; everywhere else α_t is the signal scale.
"""

from __future__ import annotations

import inspect
import json
import math
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from sdcli.declare import Range
from sdcli.errors import ModelError, UsageError

# What inspect-schedule's numbers may be (finite always): a schedule is a row per training timestep, held
# in memory several times over, and diffusers' models use 1000; past 100000 it only exhausts memory.
TRAIN_TIMESTEPS = Range(2, 100_000, why="diffusers' models use 1000")
BETA = Range(0, 1, open=("low", "high"))
SHIFT = Range(0, 1000, open=("low",), why="1 is no shift, SD3 uses 3")
SIDE = Range(8, 16384)  # pixels of --resolution's sides, as finetune's --resolution

# Above this terminal SNR the signal left at t = T−1 is visible (√ᾱ ≈ 0.03 or more):
# SD's 0.0047 is the case Lin et al. 2023 fix; DDPM's linear 4e-5 is close enough to noise.
TERMINAL_SNR_WARN = 1e-3



# The choices, declared once: the CLI's options use these enums, the checks below their values.
class BetaSchedule(str, Enum):
    linear = "linear"
    scaled_linear = "scaled_linear"
    squaredcos_cap_v2 = "squaredcos_cap_v2"
    sigmoid = "sigmoid"
    laplace = "laplace"


class PredictionType(str, Enum):
    epsilon = "epsilon"
    v_prediction = "v_prediction"
    sample = "sample"


class TimestepSpacing(str, Enum):
    leading = "leading"
    linspace = "linspace"
    trailing = "trailing"


BETA_SCHEDULES = tuple(m.value for m in BetaSchedule)
PREDICTION_TYPES = tuple(m.value for m in PredictionType)
SPACINGS = tuple(m.value for m in TimestepSpacing)

_SD_BETAS = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


@dataclass(frozen=True)
class Preset:
    name: str
    config: dict[str, Any]  # a scheduler_config.json as the model ships it
    description: str
    family: str = ""  # the model family whose pipeline shifts it by its own rule (`Family.schedule_shift`)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("ddpm-linear",
               {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon", "timestep_spacing": "leading"},
               "Ho et al. 2020: linear β from 1e-4 to 0.02, T = 1000"),
        Preset("cosine",
               {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                "prediction_type": "epsilon", "timestep_spacing": "leading"},
               "Nichol & Dhariwal 2021: ᾱ_t = cos²((t/T + s)/(1 + s)·π/2), β capped at 0.999"),
        Preset("stable-diffusion",
               {"_class_name": "PNDMScheduler", **_SD_BETAS, "prediction_type": "epsilon", "skip_prk_steps": True,
                "steps_offset": 1, "set_alpha_to_one": False, "timestep_spacing": "leading"},
               "Rombach et al. 2022 (SD 1.x): scaled linear β from 0.00085 to 0.012, PNDM sampler"),
        Preset("sd2-v",
               {"_class_name": "DDIMScheduler", **_SD_BETAS, "prediction_type": "v_prediction", "clip_sample": False,
                "steps_offset": 1, "set_alpha_to_one": False, "timestep_spacing": "leading"},
               "SD 2.x 768-v: the same betas, v-prediction (Salimans & Ho 2022), DDIM sampler"),
        Preset("sdxl",
               {"_class_name": "EulerDiscreteScheduler", **_SD_BETAS, "prediction_type": "epsilon",
                "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
                "use_karras_sigmas": False},
               "Podell et al. 2023 (SDXL): the same betas, Euler sampler"),
        Preset("zero-snr",
               {"_class_name": "DDIMScheduler", **_SD_BETAS, "prediction_type": "v_prediction",
                "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": False,
                "set_alpha_to_one": False},
               "Lin et al. 2023: SD betas rescaled to zero terminal SNR, v-prediction, trailing spacing"),
        Preset("sd3",
               {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
               "Esser et al. 2024 (SD3): flow matching, x_t = (1−σ)·x_0 + σ·ε, static shift 3"),
        Preset("flux",
               {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 4096},
               "Black Forest Labs 2024 (Flux): flow matching, shift from the image's token count (--resolution)"),
        Preset("chroma",
               {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 4096},
               "Chroma (lodestones 2025, de-distilled Flux.1-schnell): Flux's shift from the token count"),
        Preset("qwen-image",
               {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
                "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential"},
               "Qwen-Image (Qwen 2025): shift from the token count up to 8192 tokens, σ stretched to end at 0.02"),
        Preset("z-image",
               {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 6.0,
                "use_dynamic_shifting": False},
               "Z-Image (Tongyi-MAI 2025), the base model: flow matching, static shift 6"),
        Preset("z-image-turbo",
               {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                "use_dynamic_shifting": False},
               "Z-Image-Turbo (Tongyi-MAI 2025), step-distilled: flow matching, static shift 3"),
        Preset("flux2",
               {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                "max_image_seq_len": 4096, "time_shift_type": "exponential"},
               "Black Forest Labs 2025 (FLUX.2, Klein): flow matching, shift from the token count and the steps",
               family="flux2"),
    ]
}
# Flow-matching presets describe a model whose VAE downsamples 8x and whose transformer sees 2x2 patches.
FLOW_PRESET_FACTOR = 16
DEFAULT_FLOW_RESOLUTION = (1024, 1024)


@dataclass(frozen=True)
class ForwardProcess:
    """q(x_t | x_0) = N(α_t·x_0, σ_t²·I) over the training timesteps t = 0 … T−1, as two arrays.

    ``signal_scale`` (α_t) and ``noise_scale`` (σ_t) are float64 tensors of
    length T; every schedule has them. ``extras`` holds what only its family
    has, under the row keys it is shown with (DDPM: beta, alpha, alpha_bar and
    the √ forms), so a new family is new data here, not new code downstream.
    """

    family: str  # "ddpm" or "flow"
    signal_scale: Any
    noise_scale: Any
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.signal_scale)

    def snr(self) -> Any:
        """α_t²/σ_t² (Kingma et al. 2021, eq. 1): inf where σ = 0, 0 where α = 0 (zero terminal SNR)."""
        return self.signal_scale**2 / self.noise_scale**2

    def log_snr(self) -> Any:
        """λ_t = log(α_t²/σ_t²), natural log; −inf at zero terminal SNR (Lin et al. 2023)."""
        return self.snr().log()


@dataclass
class Schedule:
    """One schedule under inspection: its label, the config it came from, its (α, σ), and the diffusers instances."""

    label: str
    config: dict[str, Any]
    process: ForwardProcess  # what every table, plot and picture reads
    forward: Any  # the diffusers scheduler ``process`` was read from (DDPMScheduler)
    sampler: Any  # the scheduler inference steps with
    scheduler_name: str | None = None  # the --scheduler friendly name, if one was given
    shift: dict[str, Any] | None = None  # flow matching: {"shift": s} or {"mu": μ, "resolution": [W, H], "shift": e^μ}
    sampling_sigmas: list[float] | None = None  # the σ's its pipeline gives the sampler (before μ), where it does

    @property
    def num_train_timesteps(self) -> int:
        return len(self.process)


# ---------------------------------------------------------------- the maths


def ddpm_process(scheduler: Any) -> ForwardProcess:
    """α_t = √ᾱ_t and σ_t = √(1−ᾱ_t) of a DDPMScheduler (Ho et al. 2020, eq. 4), β and ᾱ kept as extras.

    These are the scales diffusers' ``add_noise`` multiplies by; taken in float64
    from the float32 ᾱ, so each equals ``math.sqrt`` of the number diffusers holds.
    """
    betas = scheduler.betas.double()
    alpha_bar = scheduler.alphas_cumprod.double()
    signal, noise = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
    extras = {"beta": betas, "alpha": scheduler.alphas.double(), "alpha_bar": alpha_bar,
              "sqrt_alpha_bar": signal, "sqrt_one_minus_alpha_bar": noise}
    return ForwardProcess(family="ddpm", signal_scale=signal, noise_scale=noise, extras=extras)


def is_flow(config: dict[str, Any]) -> bool:
    """Whether a scheduler config describes a flow-matching schedule (SD3, Flux) rather than a β schedule."""
    return str(config.get("_class_name", "")).startswith("FlowMatch")


def flow_process(scheduler: Any, mu: float | None = None) -> ForwardProcess:
    """σ_t of a FlowMatchEulerDiscreteScheduler over the training timesteps, and α_t = 1 − σ_t
    (Lipman et al. 2023; Esser et al. 2024, eq. 1: x_t = (1 − σ)·x_0 + σ·ε, the network predicting ε − x_0).

    diffusers holds the training σ's from 1 down to 1/T, already shifted when the shift is static; with
    Flux's resolution-dependent shift the scheduler's own ``time_shift`` applies μ, as sampling does.
    t runs from the least noise (t = 0) to pure noise (σ = 1 at t = T−1), like DDPM's t.
    """
    sigmas = scheduler.sigmas.double().flip(0)
    if mu is not None:
        sigmas = scheduler.time_shift(mu, 1.0, sigmas).double()
    T = scheduler.config.num_train_timesteps
    return ForwardProcess(family="flow", signal_scale=1.0 - sigmas, noise_scale=sigmas,
                          extras={"model_t": sigmas * T})  # the timestep value the transformer is given


def flow_mu(config: dict[str, Any], resolution: tuple[int, int], factor: int) -> float:
    """μ of Flux's resolution-dependent shift: linear in the image's token count, as diffusers' Flux pipeline computes it."""
    from sdcli.progress import quiet_libraries

    quiet_libraries()  # importing the Flux pipeline module wakes transformers' image processors, which chatter
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    width, height = resolution
    tokens = (height // factor) * (width // factor)
    return float(calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15)))


def q_sample(x0: Any, signal_scale: Any, noise_scale: Any, noise: Any) -> Any:
    """x_t = α_t·x_0 + σ_t·ε: jump from x_0 to step t in one go (Kingma et al. 2021, eq. 1; Ho et al. 2020, eq. 4)."""
    return signal_scale * x0 + noise_scale * noise


def q_step(x_prev: Any, beta: Any, noise: Any) -> Any:
    """x_t = √(1−β_t)·x_{t−1} + √β_t·ε: one step of DDPM's forward chain q(x_t | x_{t−1}) (Ho et al. 2020, eq. 2)."""
    return (1 - beta) ** 0.5 * x_prev + beta**0.5 * noise


# ---------------------------------------------------------------- where a schedule comes from


def _quiet_diffusers() -> None:
    # from_config warns about keys a class does not know (e.g. skip_prk_steps on DDPM); we report what matters.
    import diffusers.utils.logging as dlog

    dlog.set_verbosity_error()


def preset_config(name: str) -> dict[str, Any]:
    key = name.strip().lower()
    if key not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose from: {', '.join(PRESETS)} (or --preset list)")
    return dict(PRESETS[key].config)


def model_config(model: str, revision: str | None = None) -> dict[str, Any]:
    """A model's scheduler config, read without loading any weights.

    A local folder is a pipeline folder (``scheduler/scheduler_config.json``)
    or a scheduler folder itself; anything else is a Hub id.
    """
    from sdcli.configs import local_kind

    kind = local_kind(model)
    if kind == "file":
        raise ModelError(f"{model} is a single-file checkpoint, which holds no scheduler config; "
                         "use the preset it was trained with, e.g. --preset stable-diffusion")
    if kind == "folder":
        root = Path(model).expanduser()
        for path in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
            if path.is_file():
                try:
                    return json.loads(path.read_text())
                except (OSError, ValueError) as exc:
                    raise ModelError(f"unreadable scheduler config {path}: {exc}") from None
        raise ModelError(f"{model} has no scheduler/scheduler_config.json")
    return hub_config(model, revision)


def hub_config(model: str, revision: str | None = None) -> dict[str, Any]:
    """``scheduler/scheduler_config.json`` of a Hub model (or any folder diffusers can read), and nothing else."""
    # Any scheduler class reads the raw file: load_config returns the dict, _class_name and all.
    from diffusers import DDPMScheduler

    _quiet_diffusers()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # huggingface_hub deprecation chatter about arguments diffusers passes
            return dict(DDPMScheduler.load_config(model, subfolder="scheduler", revision=revision))
    except Exception as exc:  # noqa: BLE001 - every failure here means "cannot read this model"
        raise ModelError(_hub_message(model, exc)) from None


def _hub_message(model: str, exc: BaseException) -> str:
    # diffusers rewraps "offline" and "unreachable" as "does not appear to have a file"; the chain says which.
    from huggingface_hub import constants

    from sdcli.errors import classify_chain

    kinds = {known.kind for known in classify_chain(exc)}
    if constants.HF_HUB_OFFLINE or "offline" in kinds:
        return f"no scheduler config for {model!r} in the local Hugging Face cache, and HF_HUB_OFFLINE is set"
    # Not cached and no answer from the Hub: huggingface_hub's LocalEntryNotFoundError, raised from the network error.
    if kinds & {"unreachable", "not-cached"}:
        return f"cannot reach the Hugging Face Hub to read {model!r}'s scheduler config"
    if "not-found" in kinds:
        return f"model {model!r} not found locally or on the Hugging Face Hub"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"cannot read the scheduler config of {model!r}: {first}"


def with_overrides(
    config: dict[str, Any],
    *,
    beta_schedule: str | None = None,
    beta_start: float | None = None,
    beta_end: float | None = None,
    num_train_timesteps: int | None = None,
    prediction_type: str | None = None,
    rescale_zero_snr: bool | None = None,
    timestep_spacing: str | None = None,
) -> dict[str, Any]:
    """``config`` with the given settings replaced; raises UsageError naming a bad value."""
    # 1. Check inputs
    if is_flow(config):
        ddpm_only = {"--beta-schedule": beta_schedule, "--beta-start": beta_start, "--beta-end": beta_end,
                     "--prediction-type": prediction_type, "--rescale-zero-snr": rescale_zero_snr,
                     "--timestep-spacing": timestep_spacing}
        given = [flag for flag, value in ddpm_only.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} is an option of DDPM (β) schedules; this is a flow-matching schedule "
                             "(σ from 0 to 1, no β): use --shift or --resolution")
    if beta_schedule is not None and beta_schedule not in BETA_SCHEDULES:
        raise UsageError(f"--beta-schedule {beta_schedule!r}: choose from {', '.join(BETA_SCHEDULES)}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise UsageError(f"--prediction-type {prediction_type!r}: choose from {', '.join(PREDICTION_TYPES)}")
    if timestep_spacing is not None and timestep_spacing not in SPACINGS:
        raise UsageError(f"--timestep-spacing {timestep_spacing!r}: choose from {', '.join(SPACINGS)}")
    for flag, value, allowed in (("--beta-start", beta_start, BETA), ("--beta-end", beta_end, BETA),
                                 ("--num-train-timesteps", num_train_timesteps, TRAIN_TIMESTEPS)):
        if value is not None:
            allowed.check(flag, value)
    # 2. Replace
    new = dict(config)
    updates = {"beta_schedule": beta_schedule, "beta_start": beta_start, "beta_end": beta_end,
               "num_train_timesteps": num_train_timesteps, "prediction_type": prediction_type,
               "rescale_betas_zero_snr": rescale_zero_snr, "timestep_spacing": timestep_spacing}
    new.update({k: v for k, v in updates.items() if v is not None})
    if any(v is not None for v in (beta_schedule, beta_start, beta_end, num_train_timesteps)):
        new["trained_betas"] = None  # explicit betas would silently win over the asked-for schedule
    start, end = new.get("beta_start", 0.0001), new.get("beta_end", 0.02)
    kind = new.get("beta_schedule", "linear")
    if kind in ("linear", "scaled_linear", "sigmoid") and start >= end:
        raise UsageError(f"--beta-start {start} must be below --beta-end {end}")
    if kind not in ("linear", "scaled_linear", "sigmoid") and (beta_start is not None or beta_end is not None):
        flag = "--beta-start" if beta_start is not None else "--beta-end"
        raise UsageError(f"{flag} has no effect on the {kind} schedule, which has no β range; "
                         "add --beta-schedule linear or scaled_linear")
    return new


def build(
    label: str,
    config: dict[str, Any],
    scheduler: str | None = None,
    timestep_spacing: str | None = None,
    *,
    shift: float | None = None,
    resolution: tuple[int, int] | None = None,
    factor: int = FLOW_PRESET_FACTOR,
    shift_rule: Any = None,
    steps: int | None = None,
) -> Schedule:
    """Build the forward process and the sampler from ``config`` (the sampler named, or the config's own).

    ``shift`` (a static shift) and ``resolution`` (for a resolution-dependent one, its tokens being
    (W/factor)·(H/factor)) apply to flow-matching schedules only. ``shift_rule`` is the model family's own
    resolution-dependent shift (`sdcli.families.base.Family.schedule_shift`), at ``steps`` sampling steps.
    """
    from diffusers import DDPMScheduler

    from sdcli.schedule.samplers import make_scheduler

    _quiet_diffusers()
    if is_flow(config):
        return _build_flow(label, config, scheduler, timestep_spacing, shift, resolution, factor, shift_rule, steps)
    if shift is not None or resolution is not None:
        flag = "--shift" if shift is not None else "--resolution"
        raise UsageError(f"{flag} is an option of flow-matching schedules (sd3, flux); {label} is a DDPM (β) schedule")
    # 1. The forward process: only DDPM-family (β) schedules so far; a flow-matching one would be read here too
    if config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        # Sana's DPM-Solver: its β's are a leftover of the class, so a β table would not be the noise it samples.
        raise ModelError(f"{label} runs {config.get('_class_name', 'its scheduler')} on flow-matching σ's "
                         "(use_flow_sigmas), which inspect-schedule cannot show yet: it covers DDPM-family (β) "
                         "schedules and FlowMatch* schedulers")
    if "beta_schedule" not in config and not config.get("trained_betas"):
        cls = config.get("_class_name", "this scheduler")
        raise ModelError(f"{label} uses {cls}, which has no β schedule and is not flow matching; "
                         "inspect-schedule covers DDPM-family (β) and flow-matching schedules")
    try:
        forward = DDPMScheduler.from_config(config)
    except NotImplementedError:
        raise UsageError(f"beta_schedule {config.get('beta_schedule')!r} is not one diffusers implements") from None
    process = ddpm_process(forward)
    # 2. The sampler, which only decides the timesteps inference visits
    try:
        sampler = make_scheduler(scheduler, config, timestep_spacing)
    except AttributeError:
        raise ModelError(f"{label}: diffusers has no scheduler class {config.get('_class_name')!r}") from None
    except NotImplementedError:
        raise UsageError(f"{config.get('_class_name') if scheduler is None else scheduler} does not implement "
                         f"beta_schedule {config.get('beta_schedule')!r}") from None
    except ImportError as exc:
        raise UsageError(f"scheduler {scheduler or config.get('_class_name')} needs a missing package: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    return Schedule(label=label, config=dict(config), process=process, forward=forward, sampler=sampler,
                    scheduler_name=scheduler)


def _build_flow(label: str, config: dict[str, Any], scheduler: str | None, timestep_spacing: str | None,
                shift: float | None, resolution: tuple[int, int] | None, factor: int, shift_rule: Any = None,
                steps: int | None = None) -> Schedule:
    """A flow-matching schedule: one diffusers scheduler is both the forward process and the sampler."""
    import diffusers

    # 1. Check inputs
    if scheduler is not None or timestep_spacing is not None:
        flag = f"--scheduler {scheduler}" if scheduler is not None else "--timestep-spacing"
        raise UsageError(f"{flag}: {label} is a flow-matching schedule, sampled by its own "
                         f"{config.get('_class_name')}; the named samplers are for DDPM (β) schedules")
    if shift is not None:
        SHIFT.check("--shift", shift)
    cfg = dict(config)
    if shift is not None:
        cfg.update(shift=shift, use_dynamic_shifting=False)  # a static shift replaces a resolution-dependent one
    # 2. The shift: static, or μ from the image's token count
    mu, info = None, {"shift": float(cfg.get("shift", 1.0)), "mu": None, "resolution": None}
    sigmas = None
    if cfg.get("use_dynamic_shifting"):
        width, height = resolution or DEFAULT_FLOW_RESOLUTION
        if width % factor or height % factor or width <= 0 or height <= 0:
            raise UsageError(f"--resolution {width}x{height}: both sides must be positive multiples of {factor} "
                             "(the VAE's factor times the transformer's patch size)")
        if shift_rule is not None:  # the family's pipeline computes μ its own way (FLUX.2: from the steps too)
            mu, sigmas = shift_rule(cfg, (height // factor) * (width // factor), steps)
        else:
            mu = flow_mu(cfg, (width, height), factor)
        info = {"shift": math.exp(mu), "mu": mu, "resolution": [width, height]}
    elif resolution is not None:
        raise UsageError(f"--resolution sets a resolution-dependent shift (Flux); {label} has a static shift of "
                         f"{cfg.get('shift', 1.0):g} (change it with --shift)")
    # 3. The scheduler, and the (α, σ) read off it
    try:
        sampler = getattr(diffusers, cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler")).from_config(cfg)
    except AttributeError:
        raise ModelError(f"{label}: diffusers has no scheduler class {cfg.get('_class_name')!r}") from None
    return Schedule(label=label, config=cfg, process=flow_process(sampler, mu), forward=sampler, sampler=sampler,
                    shift=info, sampling_sigmas=sigmas)


# ---------------------------------------------------------------- what is shown


def default_timesteps(num_train_timesteps: int) -> list[int]:
    """0, T/10, T/4, T/2, 3T/4 and T−1: 0,100,250,500,750,999 for T = 1000."""
    T = num_train_timesteps
    return sorted({0, T // 10, T // 4, T // 2, 3 * T // 4, T - 1})


def parse_timesteps(at: str | None, every: int | None, num_train_timesteps: int) -> list[int]:
    """The training timesteps a table or strip shows: ``--at`` list, ``--every`` N (plus T−1), or the default."""
    T = num_train_timesteps
    if at is not None and every is not None:
        raise UsageError("give --at or --every, not both")
    if every is not None:
        Range(1).check("--every", every)
        return sorted(set(range(0, T, every)) | {T - 1})
    if at is None:
        return default_timesteps(T)
    ts = []
    for part in at.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            t = int(part)
        except ValueError:
            raise UsageError(f"--at {part!r}: not an integer timestep") from None
        if not 0 <= t < T:
            raise UsageError(f"--at {t}: outside the training timesteps [0, {T})")
        ts.append(t)
    if not ts:
        raise UsageError("--at: no timesteps given")
    return ts


def row(schedule: Schedule, t: int) -> dict[str, float | int]:
    """Every quantity of the forward process at timestep ``t``: the family's extras, then α, σ and the SNR."""
    p = schedule.process
    return {
        "t": t,
        **{key: float(values[t]) for key, values in p.extras.items()},
        "snr": float(p.snr()[t]),
        "log_snr": float(p.log_snr()[t]),
        # Last, so the columns a CSV reader found by position before (issue 11) stay where they were.
        "signal_scale": float(p.signal_scale[t]),
        "noise_scale": float(p.noise_scale[t]),
    }


def sampling(schedule: Schedule, steps: int) -> dict[str, Any]:
    """The timesteps (and σ's, for σ-parameterised samplers) the sampler visits in ``steps`` steps."""
    T = schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise UsageError(f"--steps {steps}: must be between 1 and the {T} training timesteps")
    sampler = schedule.sampler
    mu = (schedule.shift or {}).get("mu")
    sigmas = schedule.sampling_sigmas
    try:
        if sigmas is not None:  # the σ's the model's pipeline passes (built for these steps), shifted by μ
            sampler.set_timesteps(sigmas=sigmas, mu=mu)
        else:
            sampler.set_timesteps(steps, **({"mu": mu} if mu is not None else {}))
    except ValueError as exc:  # e.g. a spacing a sampler cannot do at this many steps
        raise UsageError(f"--steps {steps}: {type(sampler).__name__} refuses it: {' '.join(str(exc).split())[:200]}") from None
    raw = [float(t) for t in sampler.timesteps]
    sigmas = getattr(sampler, "sigmas", None)
    return {
        "steps": steps,
        # Interpolating samplers (DPM2, Karras sigmas) visit fractional t; we round for the list of ints.
        "sampling_timesteps": [int(round(t)) for t in raw],
        "fractional_timesteps": any(t != int(t) for t in raw),
        "sampling_sigmas": None if sigmas is None else [float(s) for s in sigmas],
    }


def describe(schedule: Schedule, timesteps: list[int], steps: int) -> dict[str, Any]:
    """One schedule as plain data: the object `--format json` prints (non-finite floats kept as floats)."""
    T = schedule.num_train_timesteps
    bad = [t for t in timesteps if not 0 <= t < T]
    if bad:
        raise UsageError(f"--at {bad[0]}: outside {schedule.label}'s training timesteps [0, {T})")
    last = row(schedule, T - 1)
    samp = sampling(schedule, steps)
    sampler = schedule.sampler
    config = {k: v for k, v in {**schedule.config, **dict(sampler.config)}.items() if not k.startswith("_")}
    config = {"_class_name": type(sampler).__name__, **config}
    flow = schedule.process.family == "flow"
    sigmas = samp["sampling_sigmas"]
    # Sampling starts where training's noisiest level is: t = T−1 for DDPM, σ = 1 for flow matching.
    starts_terminal = (bool(sigmas) and sigmas[0] >= 1 - 1e-6) if flow else (
        bool(samp["sampling_timesteps"]) and samp["sampling_timesteps"][0] == T - 1)
    shift = schedule.shift or {}
    out: dict[str, Any] = {
        "name": schedule.label,
        "scheduler": type(sampler).__name__,
        "scheduler_name": schedule.scheduler_name,
        "family": schedule.process.family,
        "config": config,
        "num_train_timesteps": T,
        # Flow matching regresses the velocity ε − x_0.
        "prediction_type": "flow" if flow else config.get("prediction_type", "epsilon"),
        "timestep_spacing": None if flow else config.get("timestep_spacing", "leading"),
        "shift": shift.get("shift"),
        "shift_mu": shift.get("mu"),
        "resolution": shift.get("resolution"),
        "terminal_t": T - 1,
        "terminal_alpha_bar": last.get("alpha_bar"),  # DDPM family only, like every ᾱ
        "terminal_signal_scale": last["signal_scale"],
        "terminal_noise_scale": last["noise_scale"],
        "terminal_snr": last["snr"],
        "terminal_log_snr": last["log_snr"],
        **samp,
        "first_timestep_is_terminal": starts_terminal,
        "rows": [row(schedule, t) for t in timesteps],
    }
    out["warnings"] = diagnose(schedule, out)
    return out


def diagnose(schedule: Schedule, info: dict[str, Any]) -> list[str]:
    """What a user should know about this schedule: terminal SNR, where sampling starts, sampler quirks."""
    notes = []
    T = info["num_train_timesteps"]
    name = schedule.label
    if info["terminal_snr"] > TERMINAL_SNR_WARN:
        notes.append(
            f"{name}: terminal SNR at t={T - 1} is {info['terminal_snr']:.3g} (α = {info['terminal_signal_scale']:.3g} "
            "of the image survives): training never sees pure noise, yet sampling starts from it. "
            "Fix (Lin et al. 2023): --rescale-zero-snr with --prediction-type v_prediction and --timestep-spacing trailing"
        )
    if info["terminal_snr"] == 0 and info["prediction_type"] == "epsilon":
        notes.append(f"{name}: zero terminal SNR with epsilon prediction: at t={T - 1} x_t is pure noise, so predicting ε "
                     "says nothing about x_0; use --prediction-type v_prediction")
    if schedule.process.family == "flow":
        return notes  # σ runs to 1 (SNR 0) by construction, and sampling starts there
    ts = info["sampling_timesteps"]
    if ts and ts[0] != T - 1:
        notes.append(f"{name}: sampling starts at t={ts[0]}, not T−1={T - 1}, so the first step sees a cleaner level "
                     f"than the pure noise it is given ({info['timestep_spacing']} spacing); --timestep-spacing trailing "
                     "starts at T−1")
    # A sampler may see a different ᾱ than training did: no rescale support, or a clamp to keep σ finite.
    own = getattr(schedule.sampler, "alphas_cumprod", None)
    fw = schedule.process.extras.get("alpha_bar")
    if own is not None and fw is not None and len(own) == T:
        differs = ((own.to(fw.dtype) - fw).abs() > 1e-6 * fw.abs() + 1e-12).nonzero().flatten().tolist()
        if differs:
            t = differs[-1]
            cls = type(schedule.sampler).__name__
            why = ""
            # from_config keeps keys a class ignores, so ask the constructor, not the config.
            takes = inspect.signature(type(schedule.sampler).__init__).parameters
            if schedule.config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in takes:
                why = f"; {cls} has no rescale_betas_zero_snr, so it samples with the original betas"
            notes.append(f"{name}: {cls} uses ᾱ_{t} = {float(own[t]):.3g} where the training schedule has "
                         f"{float(fw[t]):.3g}{why}")
    return notes


def visited_t(schedule: Schedule, info: dict[str, Any]) -> list[int]:
    """Where the sampler's steps fall on the training-timestep axis t (for the plot's dots).

    DDPM samplers name their t; a flow-matching sampler names σ, placed at the t with the nearest σ_t.
    """
    import torch

    T = schedule.num_train_timesteps
    if schedule.process.family != "flow" or not info.get("sampling_sigmas"):
        return [t for t in info["sampling_timesteps"] if 0 <= t < T]
    sigma = schedule.process.noise_scale
    wanted = torch.tensor([s for s in info["sampling_sigmas"] if s > 0], dtype=sigma.dtype)
    return torch.searchsorted(sigma, wanted).clamp(max=T - 1).tolist()


def jsonable(value: Any) -> Any:
    """``value`` with ±inf and NaN as None, so strict JSON parsers (jq, JavaScript) accept it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy or torch
        return jsonable(value.tolist())
    return value


def presets_table() -> list[dict[str, str]]:
    """Rows for `--preset list`."""
    return [{"name": p.name, "class": p.config["_class_name"], "description": p.description} for p in PRESETS.values()]
