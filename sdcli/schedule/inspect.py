"""`inspect-schedule`'s work as one plain call: build each schedule, describe it, and write the plot and strip.

The command parses and checks its options, calls `inspect`, and prints what it returns. Where fine-tuning
puts its timesteps (--training) is training's knowledge (`sdcli.training.profile`): it comes in as a
``profile`` function, so this package never imports training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from sdcli.schedule import core
from sdcli.schedule.core import Schedule


def inspect(sources: list[tuple[str, str]], *, steps: int, revision: str | None = None, scheduler: str | None = None,
            spacing: str | None = None, overrides: dict[str, Any] | None = None, shift: float | None = None,
            resolution: tuple[int, int] | None = None, at: str | None = None, every: int | None = None,
            profile: Callable[[Schedule], dict[str, Any]] | None = None, plot: Path | None = None,
            image: Path | None = None, out: Path | None = None, latent_model: str | None = None, seed: int = 0,
            size: int = 256, device: Any = "auto", overwrite: bool = False,
            say: Callable[[str], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Each schedule's description (``describe``'s dict, with ``"training"`` when ``profile`` is given) and the
    files written ({"plot": path, "strip": path}).

    ``sources`` are ("preset" | "model", name) pairs; ``overrides`` go to `core.with_overrides`; ``image`` is
    noised into ``out`` (in ``latent_model``'s VAE latent space when given), ``plot`` gets the curves.
    ``say`` gets what it is doing that takes time (loading a VAE).
    """
    from sdcli.schedule import report

    # 1. Build each schedule from its config plus the overrides
    schedules = []
    for kind, name in sources:
        config = core.preset_config(name) if kind == "preset" else core.model_config(name, revision)
        # Folders by their name, so a table of long paths stays readable; Hub ids as given.
        label = name.lower() if kind == "preset" else (Path(name).expanduser().resolve().name
                                                        if Path(name).expanduser().is_dir() else name)
        flow: dict[str, Any] = dict(shift=shift, resolution=resolution, steps=steps)
        if core.is_flow(config) and kind == "model":
            from sdcli.families import model_facts

            facts = model_facts(name, revision)
            if facts.family.check_schedule is not None:  # a family that knows of a shift sdcli cannot compute
                facts.family.check_schedule(name, facts, config, shift)
            flow["factor"] = facts.family.patch * facts.vae_factor  # a latent token's side in pixels
            flow["shift_rule"] = facts.family.schedule_shift
        elif core.is_flow(config) and core.PRESETS[name.strip().lower()].family:
            from sdcli.families import BY_NAME

            flow["shift_rule"] = BY_NAME[core.PRESETS[name.strip().lower()].family].schedule_shift
        schedules.append(core.build(label, core.with_overrides(config, **(overrides or {})), scheduler, spacing,
                                    **flow))
    # 2. Describe them: the shortest schedule bounds the timesteps every compared schedule can show
    timesteps = core.parse_timesteps(at, every, min(s.num_train_timesteps for s in schedules))
    infos = [core.describe(s, timesteps, steps) for s in schedules]
    if profile is not None:
        for schedule, info in zip(schedules, infos):
            info["training"] = profile(schedule)

    if image is not None:  # a strip that cannot fit in memory is refused before any file is written
        from sdcli.families import model_arch
        from sdcli.memory import check_strip

        arch = model_arch(latent_model, revision) if latent_model else None
        check_strip(image, size, len(timesteps), len(schedules), report.fitted_size, arch, device)

    # 3. Files
    outputs: dict[str, str] = {}
    if plot is not None:
        outputs["plot"] = str(report.plot(schedules, infos, plot, overwrite))
    if image is not None:
        vae = None
        if latent_model is not None:
            from sdcli.devices import resolve_device

            if say is not None:
                say(f"loading the VAE of {latent_model}")
            vae = report.load_vae(latent_model, revision, resolve_device(device))
        outputs["strip"] = str(report.forward_strip(schedules, image, timesteps, out, seed=seed, size=size, vae=vae,
                                                    model=latent_model, overwrite=overwrite))
    return infos, outputs
