"""`sdcli inspect-schedule`: the noise schedule as numbers, a plot, and pictures of the forward process.

A thin wrapper: it parses and checks the options, `sdcli.schedule.inspect.inspect` builds, describes and
writes (with `sdcli.training.profile` drawing as `finetune` does for --training), and it prints the result.
"""

from __future__ import annotations

import json
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdcli import defaults
from sdcli.declare import Range, given_on_command_line
from sdcli.errors import UsageError
from sdcli.progress import note
from sdcli.options import DeviceOpt, Device, Model, Overwrite, Quiet, Revision, Scheduler, Spacing, THREADS, Threads
# The choices live with the schedule code that checks them (plain stdlib there, so --help stays instant).
from sdcli.schedule.core import SIDE, BetaSchedule, PredictionType
from sdcli.training.objective import TimestepSampling, WeightingScheme


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


def _value(option):
    return None if option is None else getattr(option, "value", option)


def _sources(ctx: typer.Context, model: str | None, preset: str | None, compare: str | None,
             latent: bool) -> tuple[list[tuple[str, str]], str | None]:
    """The schedules to inspect as (kind, name) pairs, and the model whose VAE --latent uses."""
    # --model from SDCLI_MODEL is a default; typed on the command line it names the schedule.
    # (By name: Typer may carry its own copy of click's ParameterSource enum.)
    source = ctx.get_parameter_source("model")
    explicit_model = model is not None and getattr(source, "name", None) == "COMMANDLINE"
    vae_model = model or defaults.default_model()
    sources: list[tuple[str, str]] = []
    if preset:
        sources.append(("preset", preset))
    if explicit_model and not (preset and latent):
        if preset:
            raise UsageError("--model and --preset both name a schedule; pick one, or list both in --compare")
        sources.append(("model", model))
    if compare is not None:
        from sdcli.schedule.core import PRESETS

        items = [part.strip() for part in compare.split(",") if part.strip()]
        if not items:
            raise UsageError(f"--compare {compare!r} names no schedule: list presets or models, e.g. "
                             "--compare cosine,stable-diffusion")
        for item in items:
            sources.append(("preset" if item.lower() in PRESETS else "model", item))
    if not sources:
        if not vae_model:
            raise UsageError("no schedule given: pass --preset (see --preset list), --model or --compare")
        sources.append(("model", vae_model))
    if latent and not vae_model:
        raise UsageError("--latent needs --model: its VAE makes the latent the noise is added to")
    return sources, vae_model


def _resolution(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--resolution {text!r}: give WIDTHxHEIGHT in pixels, e.g. 1024x768") from None
    for side in (width, height):
        SIDE.check("--resolution", side)
    return width, height


# Options that only shape something another option asks for; alone they would be silently ignored.
_NEEDS = {
    "--training": ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "weighting_scheme", "snr_gamma",
                   "debiased_loss", "debiased_snr_floor"),
    "--image": ("seed", "size"),
}


def _refuse_idle(ctx: typer.Context, training: bool, image: Path | None) -> None:
    """One line for an option given without the option it works with (--logit-std without --training)."""
    given = {"--training": training, "--image": image is not None}
    for needed, names in _NEEDS.items():
        if given[needed]:
            continue
        for name in given_on_command_line(ctx, list(names)):
            flag = next(p.opts[0] for p in ctx.command.params if p.name == name)
            raise UsageError(f"{flag} does nothing without {needed}")


def inspect_schedule_cmd(
    ctx: typer.Context,
    model: Model = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", "-p", help="A built-in schedule: ddpm-linear, cosine, stable-diffusion, sd2-v, sdxl, zero-snr, sd3, "
        "flux; 'list' lists them.")] = None,
    compare: Annotated[Optional[str], typer.Option(
        help="Comma list of presets or models shown together in one table and one plot.")] = None,
    revision: Revision = None,
    scheduler: Scheduler = None,
    timestep_spacing: Spacing = None,
    beta_schedule: Annotated[Optional[BetaSchedule], typer.Option(help="β schedule instead of the source's.")] = None,
    beta_start: Annotated[Optional[float], typer.Option(help="First β of a linear/scaled_linear/sigmoid schedule.")] = None,
    beta_end: Annotated[Optional[float], typer.Option(help="Last β of a linear/scaled_linear/sigmoid schedule.")] = None,
    num_train_timesteps: Annotated[Optional[int], typer.Option(help="Training timesteps T.")] = None,
    prediction_type: Annotated[Optional[PredictionType], typer.Option(help="What the model predicts.")] = None,
    rescale_zero_snr: Annotated[Optional[bool], typer.Option(
        "--rescale-zero-snr/--no-rescale-zero-snr",
        help="Rescale betas to zero terminal SNR (Lin et al. 2023). Default: as the source has it.")] = None,
    shift: Annotated[Optional[float], typer.Option(
        help="Flow matching: a static shift σ' = sσ/(1+(s−1)σ) instead of the source's (SD3 uses 3).")] = None,
    resolution: Annotated[Optional[str], typer.Option(
        help="Flow matching with a resolution-dependent shift (Flux): the image size WxH its μ is computed for "
        "(default 1024x1024).")] = None,
    training: Annotated[bool, typer.Option(
        "--training", help="Show where fine-tuning puts its timesteps and how it weights the loss there, instead of "
        "the per-timestep table.")] = False,
    timestep_sampling: Annotated[Optional[TimestepSampling], typer.Option(
        help="With --training, flow matching: how training draws timesteps. Default: uniform.")] = None,
    logit_mean: Annotated[Optional[float], typer.Option(
        help="With --training, --timestep-sampling logit-normal: its mean. Default: 0.")] = None,
    logit_std: Annotated[Optional[float], typer.Option(
        help="With --training, --timestep-sampling logit-normal: its standard deviation. Default: 1.")] = None,
    mode_scale: Annotated[Optional[float], typer.Option(
        help="With --training, --timestep-sampling mode: SD3's scale. Default: 1.29.")] = None,
    weighting_scheme: Annotated[Optional[WeightingScheme], typer.Option(
        help="With --training, flow matching: loss weight per timestep. Default: none.")] = None,
    snr_gamma: Annotated[Optional[float], typer.Option(
        help="With --training, DDPM: min-SNR loss weighting with this γ.")] = None,
    debiased_loss: Annotated[bool, typer.Option(
        "--debiased-loss", help="With --training, DDPM: debiased-estimation loss weighting (1/√SNR on ε).")] = False,
    debiased_snr_floor: Annotated[Optional[float], typer.Option(
        help="With --debiased-loss: timesteps noisier than this SNR keep its weight.")] = None,
    at: Annotated[Optional[str], typer.Option(
        help="Training timesteps to show, e.g. 0,250,500,750,999. Default: 0, T/10, T/4, T/2, 3T/4, T−1.")] = None,
    every: Annotated[Optional[int], typer.Option(help="Show every Nth training timestep (and T−1).")] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps whose timesteps are listed.")] = defaults.STEPS,
    format: Annotated[OutputFormat, typer.Option("--format", "-f", help="How stdout shows the schedule.")] = OutputFormat.table,
    json_: Annotated[bool, typer.Option("--json", help="The same as --format json, as the other commands spell it.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        help="Write α_t, σ_t and log-SNR against t to this .png (.svg, .pdf).")] = None,
    image: Annotated[Optional[Path], typer.Option(
        help="Noise this picture to each --at timestep and write the labelled strip to --out.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where --image's strip goes (.png, .jpg, .webp).")] = None,
    latent: Annotated[bool, typer.Option(
        "--latent", help="With --image: noise in --model's VAE latent space and decode each x_t (what the UNet sees).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the noise ε added to --image.")] = 0,
    size: Annotated[int, typer.Option(help="Longest side --image is resized to, in pixels.")] = 256,
    device: DeviceOpt = Device.auto,
    threads: Threads = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Show a noise schedule: α_t, σ_t, SNR per timestep (β, ᾱ for DDPM), sampling timesteps, plots and noised pictures."""
    from sdcli.schedule import core as sched
    from sdcli.schedule import report
    from sdcli.training import profile

    if json_ and given_on_command_line(ctx, ["format"]) and format is not OutputFormat.json:
        raise UsageError(f"--json and --format {format.value} ask for two formats; give one")
    fmt = "json" if json_ else format.value
    # 1. Lists instead of a schedule
    if preset is not None and preset.strip().lower() == "list":
        rows = sched.presets_table()
        # The columns as wide as their longest cell: sd3's FlowMatchEulerDiscreteScheduler pushed its row out.
        name, cls = (max(len(r[key]) for r in rows) for key in ("name", "class"))
        print(json.dumps(rows, indent=2, ensure_ascii=False) if fmt == "json" else
              "\n".join(f"{r['name']:<{name}}  {r['class']:<{cls}}  {r['description']}" for r in rows))
        return
    if scheduler is not None and scheduler.strip().lower() == "list":
        from sdcli.commands.schedulers import schedulers_cmd

        schedulers_cmd(json=fmt == "json")
        return

    # 2. Check inputs before any work
    _refuse_idle(ctx, training, image)
    choice = None
    if training:  # finetune's own checks of these values, before any schedule is built
        choice = profile.training_choice(
            sampling=_value(timestep_sampling), logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale,
            weighting=_value(weighting_scheme), snr_gamma=snr_gamma, debiased=debiased_loss,
            snr_floor=debiased_snr_floor)
    sources, vae_model = _sources(ctx, model, preset, compare, latent)
    if latent and image is None:
        raise UsageError("--latent needs --image: it is the picture that gets noised in latent space")
    if image is not None and out is None:
        raise UsageError("--image needs --out FILE.png for the strip")
    if out is not None and image is None:
        raise UsageError("--out is where --image's strip goes; give --image too")
    Range(8).check("--size", size)
    Range(0, 2**63 - 1).check("--seed", seed)
    if plot is not None:
        plot = report.check_output(plot, report.PLOT_SUFFIXES, "--plot", overwrite)
    if out is not None:
        out = report.check_output(out, report.STRIP_SUFFIXES, "--out", overwrite)
        if plot is not None and plot.resolve() == out.resolve():
            raise UsageError("--plot and --out name the same file")

    if threads is not None:
        THREADS.range.check("--threads", threads)
    size_wh = _resolution(resolution)

    # 3. Build, describe, write (torch from here on: generate's thread rule)
    from sdcli import threads as cpu_threads
    from sdcli.pipeline import resolve_device
    from sdcli.schedule.inspect import inspect

    cpu_threads.apply(threads, resolve_device(_value(device)) if latent else "cpu")
    overrides = dict(beta_schedule=_value(beta_schedule), beta_start=beta_start, beta_end=beta_end,
                     num_train_timesteps=num_train_timesteps, prediction_type=_value(prediction_type),
                     rescale_zero_snr=rescale_zero_snr)
    infos, outputs = inspect(
        sources, steps=steps, revision=revision, scheduler=scheduler, spacing=_value(timestep_spacing),
        overrides=overrides, shift=shift, resolution=size_wh, at=at, every=every,
        profile=None if choice is None else partial(profile.training_profile, choice=choice), plot=plot,
        image=image, out=out, latent_model=vae_model if latent else None, seed=seed, size=size, device=device,
        overwrite=overwrite, say=None if quiet else partial(note, False))

    # 4. Results on stdout, warnings on stderr
    for info in infos:
        for warning in info["warnings"]:
            note(quiet, f"warning: {warning}")
    if fmt == "json":
        print(report.to_json(infos, outputs))
        return
    if fmt == "csv":
        report.write_csv(infos)
        for kind, path in outputs.items():
            note(quiet, f"{kind}: {path}")
        return
    report.write_table(infos)
    for kind, path in outputs.items():
        print(f"{kind}: {path}")
