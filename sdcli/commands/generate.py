"""`sdcli generate`: prompts in, PNGs out, with guidance as a knob you can sweep."""

from __future__ import annotations

import json as jsonlib
import re
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sdcli import defaults, options
from sdcli.errors import UsageError

# Options that change how a run executes, not which image it makes: always the command line's.
RUNTIME_FIELDS = ("device", "allow_pickle", "batch_size", "cpu_offload", "vae_tiling", "attention_slicing",
                  "compile", "save_trajectory")
# Command-line parameter -> Settings field, where the names differ.
PARAM_FIELDS = {"prompt": "prompts", "prompt_file": "prompts", "seed": "seeds", "lora": "loras"}


def note(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr)


def generate_cmd(
    ctx: typer.Context,
    prompt: Annotated[Optional[list[str]], typer.Argument(help="One or more prompts.", show_default=False)] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Text file of prompts, one a line (# comments).")] = None,
    negative_prompt: Annotated[str, typer.Option("--negative-prompt", "-n", help="What to steer away from.")] = "",
    model: options.Model = None,
    revision: options.Revision = None,
    variant: options.Variant = None,
    allow_pickle: options.AllowPickle = False,
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = defaults.STEPS,
    guidance: Annotated[
        str, typer.Option("--guidance", "-g", help="Classifier-free guidance scale, or a comma list to sweep (1,3,7.5,12).")
    ] = str(defaults.GUIDANCE),
    guidance_rescale: Annotated[
        str, typer.Option(help="Guidance rescale φ in [0, 1] (Lin et al. 2023), or a comma list.")
    ] = "0",
    scheduler: options.Scheduler = None,
    timestep_spacing: options.Spacing = None,
    seed: Annotated[Optional[str], typer.Option(help="Seed, or a comma list of seeds. Default: random, printed.")] = None,
    num_images: Annotated[int, typer.Option(help="Images per prompt and guidance value (consecutive seeds).")] = 1,
    width: Annotated[Optional[int], typer.Option("--width", "-W", help="Width in pixels. Default: the model's.")] = None,
    height: Annotated[Optional[int], typer.Option("--height", "-H", help="Height in pixels. Default: the model's.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images denoised together.")] = 1,
    device: options.DeviceOpt = options.Device.auto,
    dtype: options.DtypeOpt = options.Dtype.auto,
    cpu_offload: Annotated[bool, typer.Option(help="Keep idle models in CPU memory (CUDA only).")] = False,
    vae_tiling: Annotated[bool, typer.Option(help="Decode in tiles, for large images on small GPUs.")] = False,
    attention_slicing: Annotated[bool, typer.Option(help="Compute attention in slices to save memory.")] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (slow first image).")] = False,
    lora: Annotated[
        Optional[list[str]], typer.Option(help="LoRA weights as PATH[:SCALE] (diffusers format); repeatable.")
    ] = None,
    init_image: Annotated[Optional[Path], typer.Option(help="Start from this image (img2img).")] = None,
    strength: Annotated[float, typer.Option(help="img2img: how far to noise the init image, 0..1.")] = 0.75,
    save_trajectory: Annotated[
        bool, typer.Option(help="Also save the predicted clean image at every step (strip PNG + GIF).")
    ] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder, or a .png path for one image.")] = None,
    overwrite: options.Overwrite = False,
    from_metadata: Annotated[
        Optional[Path], typer.Option(help="Regenerate from an sdcli PNG's settings; other options given override.")
    ] = None,
    quiet: options.Quiet = False,
    json: options.Json = False,
) -> None:
    """Generate images from text prompts; prints the paths of the PNGs it writes."""
    from sdcli.generation import (
        Settings, parse_floats, parse_lora, parse_seeds, read_prompt_file, settings_from_record,
    )

    if scheduler is not None and scheduler.strip().lower() == "list":
        from sdcli.commands.schedulers import schedulers_cmd

        schedulers_cmd(json=json)
        return
    prompts = list(prompt or [])
    if prompt_file is not None:
        prompts += read_prompt_file(prompt_file)
    given = Settings(
        prompts=prompts,
        negative_prompt=negative_prompt,
        model=model,
        revision=revision,
        variant=variant,
        allow_pickle=allow_pickle,
        steps=steps,
        guidance=parse_floats(guidance, "--guidance"),
        guidance_rescale=parse_floats(guidance_rescale, "--guidance-rescale"),
        scheduler=scheduler,
        timestep_spacing=timestep_spacing.value if timestep_spacing else None,
        seeds=parse_seeds(seed),
        num_images=num_images,
        width=width,
        height=height,
        batch_size=batch_size,
        loras=[parse_lora(spec) for spec in lora or []],
        init_image=str(init_image) if init_image else None,
        strength=strength,
        device=device.value,
        dtype=dtype.value,
        cpu_offload=cpu_offload,
        vae_tiling=vae_tiling,
        attention_slicing=attention_slicing,
        compile=compile,
        save_trajectory=save_trajectory,
    )
    if from_metadata is not None:
        from sdcli.metadata import read_settings

        settings = settings_from_record(read_settings(from_metadata))
        explicit = {PARAM_FIELDS.get(name, name) for name in ctx.params
                    if ctx.get_parameter_source(name).name == "COMMANDLINE"}
        for name in set(RUNTIME_FIELDS) | explicit:
            if hasattr(settings, name):
                setattr(settings, name, getattr(given, name))
    else:
        settings = given
    run_generate(settings, out=out, overwrite=overwrite, quiet=quiet, json=json)


def run_generate(settings: Any, *, out: Path | None, overwrite: bool, quiet: bool, json: bool) -> list[Path]:
    """Validate, load, generate and write; returns the image paths. Plain function behind the command."""
    from sdcli.generation import check_settings, check_size, plan_jobs, resolve_seeds
    from sdcli.images import check_writable
    from sdcli.pipeline import resolve_model, size_multiple

    # 1. Check everything that needs no weights.
    check_settings(settings)
    settings.model = resolve_model(settings.model)
    check_size(settings, size_multiple(settings.model, settings.revision))
    seeds = resolve_seeds(settings)
    jobs = plan_jobs(settings, seeds)
    namer = OutputNamer(out, len(jobs), overwrite, settings)

    # 2. Load the model (the slow part) and warn about prompts it cannot fully read.
    t0 = time.perf_counter()
    from sdcli.generation import prepare_pipeline

    loaded = prepare_pipeline(settings)
    note(quiet, f"loaded {loaded.model} ({loaded.family}, {loaded.prediction_type}) on {loaded.device} "
                f"in {time.perf_counter() - t0:.1f}s")
    warn_prompts(loaded.pipe, settings.prompts, quiet)
    if not settings.seeds:
        note(quiet, f"seed: {seeds[0]}" + (f"..{seeds[-1]}" if len(seeds) > 1 else "") + " (random)")

    # 3. Denoise and write each image as soon as it exists.
    return write_images(settings, loaded, jobs, namer, quiet=quiet, json=json)


def warn_prompts(pipe: Any, prompts: list[str], quiet: bool) -> None:
    from sdcli.generation import dropped_words

    for tokenizer in filter(None, [getattr(pipe, "tokenizer", None)]):
        for p in dict.fromkeys(prompts):
            lost = dropped_words(tokenizer, p)
            if lost:
                note(quiet, f"warning: prompt longer than the text encoder's {tokenizer.model_max_length} tokens; "
                            f"ignored: {lost!r}")


class OutputNamer:
    """Where each output goes: numbered files in a folder, or the one .png path the user named."""

    def __init__(self, out: Path | None, count: int, overwrite: bool, settings: Any):
        from sdcli.images import check_writable

        self.overwrite = overwrite
        self.settings = settings
        out = Path(out) if out is not None else defaults.OUT_DIR
        if out.suffix.lower() == ".png":
            if count > 1:
                raise UsageError(f"--out {out} names one file but {count} images would be made; give a folder")
            if out.exists() and not overwrite:
                raise UsageError(f"{out} exists; pass --overwrite to replace it")
            check_writable(out.parent if str(out.parent) else Path("."))
            self.file, self.folder = out, out.parent
        else:
            if out.exists() and not out.is_dir():
                raise UsageError(f"--out {out} exists and is not a folder")
            check_writable(out)
            self.file, self.folder = None, out
        taken = [int(m.group(1)) for p in self.folder.glob("*.png") if (m := re.match(r"(\d{5,})-", p.name))]
        self.next = max(taken, default=-1) + 1

    def image(self, job: Any) -> Path:
        if self.file is not None:
            return self.file
        parts = [f"{self.next + job.index:05d}", str(job.seed)]
        if len(self.settings.guidance) > 1:
            parts.append(f"g{job.guidance:g}")
        if len(self.settings.guidance_rescale) > 1:
            parts.append(f"r{job.guidance_rescale:g}")
        return self.folder / ("-".join(parts) + ".png")

    def sheet(self, prompt_index: int) -> Path:
        return self.folder / f"{self.next:05d}-sheet{prompt_index}.png"


def write_images(settings: Any, loaded: Any, jobs: list[Any], namer: OutputNamer, *, quiet: bool, json: bool):
    from sdcli.generation import iter_images
    from sdcli.images import save_gif, save_png
    from sdcli.metadata import pnginfo
    from sdcli.progress import progress_bar

    paths: list[Path] = []
    by_prompt: dict[str, dict[tuple[float, float], dict[int, Any]]] = {}
    steps = settings.steps if not settings.init_image else max(1, int(settings.steps * settings.strength))
    with progress_bar("denoising", total=len(jobs) * steps, disable=quiet) as advance:
        for item in iter_images(settings, loaded, jobs, on_step=advance):
            path = save_png(item.image, namer.image(item.job), pnginfo(item.record), namer.overwrite)
            paths.append(path)
            emit(path, item.record, json)
            if item.trajectory:
                emit_trajectory(item, path, namer.overwrite, json)
            key = (item.job.guidance, item.job.guidance_rescale)
            by_prompt.setdefault(item.job.prompt, {}).setdefault(key, {})[item.job.seed] = item.image
    if len(settings.guidance) * len(settings.guidance_rescale) > 1 and namer.file is None:
        for i, (prompt, grid) in enumerate(by_prompt.items()):
            emit(save_contact_sheet(prompt, grid, namer.sheet(i), namer.overwrite, settings), {"kind": "contact_sheet",
                                                                                          "prompt": prompt}, json)
    return paths


def emit(path: Path, record: dict[str, Any], json: bool) -> None:
    if json:
        print(jsonlib.dumps({"path": str(path), **record}), flush=True)
    else:
        print(path, flush=True)


def emit_trajectory(item: Any, path: Path, overwrite: bool, json: bool) -> None:
    from sdcli.images import labelled_grid, save_gif, save_png

    frames = item.trajectory
    labels = [f"{i + 1}" for i in range(len(frames))]
    strip = labelled_grid([frames], labels, [""], title=f"predicted x0 per step: {item.job.prompt[:60]}")
    strip_path = save_png(strip, path.with_name(path.stem + "-trajectory.png"), overwrite=overwrite)
    gif_path = save_gif(frames + [item.image], path.with_name(path.stem + "-trajectory.gif"), overwrite=overwrite)
    for p in (strip_path, gif_path):
        emit(p, {"kind": "trajectory", "image": str(path)}, json)


def save_contact_sheet(prompt: str, grid: dict, path: Path, overwrite: bool, settings: Any) -> Path:
    """Guidance settings across, seeds down: the adherence/variety trade-off in one picture."""
    from sdcli.images import labelled_grid, save_png

    keys = list(grid)
    seeds = list(next(iter(grid.values())))
    rescale = len(settings.guidance_rescale) > 1
    cols = [f"g={g:g}" + (f" φ={r:g}" if rescale else "") for g, r in keys]
    rows = [[grid[k][seed] for k in keys] for seed in seeds]
    sheet = labelled_grid(rows, cols, [f"seed {s}" for s in seeds], title=prompt[:80])
    return save_png(sheet, path, overwrite=overwrite)
