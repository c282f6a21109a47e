"""`sdcli generate`: prompts in, PNGs out, with guidance as a knob you can sweep."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sdcli import defaults, options
from sdcli.progress import note

# Options that change how a run executes, not which image it makes: always the command line's.
RUNTIME_FIELDS = ("device", "allow_pickle", "batch_size", "cpu_offload", "vae_tiling", "attention_slicing",
                  "compile", "channels_last", "save_trajectory")
# Command-line parameter -> Settings field, where the names differ.
PARAM_FIELDS = {"prompt": "prompts", "prompt_file": "prompts", "seed": "seeds", "lora": "loras"}



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
    channels_last: options.ChannelsLast = None,
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
        prompts=prompts, negative_prompt=negative_prompt, model=model, revision=revision, variant=variant,
        allow_pickle=allow_pickle, steps=steps, guidance=parse_floats(guidance, "--guidance"),
        guidance_rescale=parse_floats(guidance_rescale, "--guidance-rescale"), scheduler=scheduler,
        timestep_spacing=timestep_spacing.value if timestep_spacing else None, seeds=parse_seeds(seed),
        num_images=num_images, width=width, height=height, batch_size=batch_size,
        loras=[parse_lora(spec) for spec in lora or []], init_image=str(init_image) if init_image else None,
        strength=strength, device=device.value, dtype=dtype.value, cpu_offload=cpu_offload, vae_tiling=vae_tiling,
        attention_slicing=attention_slicing, compile=compile, channels_last=channels_last,
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
    """Validate, load, generate and write; returns the image paths. Plain function behind the command.

    Under `accelerate launch`/`torchrun` each process takes its share of the
    jobs (accelerate's split), writes its own numbered files, and the main
    process prints one summary and the contact sheets.
    """
    from sdcli import distributed
    from sdcli.generation import check_settings, check_size, plan_jobs, prepare_pipeline, resolve_seeds
    from sdcli.outputs import OutputNamer, write_contact_sheets, write_images
    from sdcli.pipeline import resolve_model, size_multiple
    from sdcli.progress import progress_bar

    # 1. Check everything that needs no weights.
    check_settings(settings)
    settings.model = resolve_model(settings.model)
    check_size(settings, size_multiple(settings.model, settings.revision))
    st = distributed.state()
    seeds = distributed.broadcast(resolve_seeds(settings), st)  # a random seed is the main process's
    jobs = plan_jobs(settings, seeds)
    namer = OutputNamer(out, len(jobs), overwrite, settings)
    main = st is None or st.is_main_process
    if st is not None:
        if settings.device == "auto":
            settings.device = str(st.device)
        st.wait_for_everyone()  # every process has numbered the folder before any writes to it

    # 2. Load the model (the slow part) and warn about prompts it cannot fully read.
    t0 = time.perf_counter()
    loaded = prepare_pipeline(settings)
    note(quiet or not main, f"loaded {loaded.model} ({loaded.family}, {loaded.prediction_type}) on "
                            f"{loaded.device} in {time.perf_counter() - t0:.1f}s")
    warn_prompts(loaded, settings.prompts, quiet or not main)
    if not settings.seeds:
        note(quiet or not main, f"seed: {seeds[0]}" + (f"..{seeds[-1]}" if len(seeds) > 1 else "") + " (random)")

    # 3. Denoise and write each image as soon as it exists.
    if st is not None:
        with st.split_between_processes(jobs) as share:
            my_jobs = list(share)
    else:
        my_jobs = jobs
    steps = settings.steps if not settings.init_image else max(1, int(settings.steps * settings.strength))
    t0 = time.perf_counter()
    with progress_bar("denoising", total=len(my_jobs) * steps, disable=quiet or not main) as advance:
        mine = write_images(settings, loaded, my_jobs, namer, json=json, advance=advance)
    seconds = time.perf_counter() - t0

    # 4. One summary, and the contact sheets, from the main process.
    written = distributed.gather(mine, st)
    if st is not None:
        counts = distributed.gather([len(mine)], st)
        note(quiet or not main, f"{len(written)} images from {st.num_processes} processes "
                                f"(per process: {', '.join(map(str, counts))})")
    elif settings.compile and mine:
        # The first call compiles; report it apart so the steady speed is visible.
        text = f"first image {mine[0]['done_at'] - t0:.1f}s (includes torch.compile)"
        if len(mine) > 1:
            text += f", then {(mine[-1]['done_at'] - mine[0]['done_at']) / (len(mine) - 1):.2f}s each"
        note(quiet, text)
    elif len(written) > 1:
        note(quiet, f"{len(written)} images in {seconds:.1f}s ({seconds / len(written):.2f}s each)")
    if main and len(settings.guidance) * len(settings.guidance_rescale) > 1 and namer.file is None:
        write_contact_sheets(written, namer, settings, json)
    return [Path(w["path"]) for w in mine]


def warn_prompts(loaded: Any, prompts: list[str], quiet: bool) -> None:
    """Words the text encoder will drop, and words the bundled toy model has never seen."""
    from sdcli.generation import dropped_words, unknown_words

    tokenizer = getattr(loaded.pipe, "tokenizer", None)
    if tokenizer is None:
        return
    bundled = Path(loaded.model).expanduser().resolve() == defaults.BUNDLED_MODEL.resolve()
    for p in dict.fromkeys(prompts):
        lost = dropped_words(tokenizer, p)
        if lost:
            note(quiet, f"warning: prompt longer than the text encoder's {tokenizer.model_max_length} tokens; "
                        f"ignored: {lost!r}")
        unknown = unknown_words(tokenizer, p) if bundled else []
        if unknown:
            note(quiet, f"warning: the bundled shapes model has never seen {', '.join(map(repr, unknown))}; it knows "
                        "only colours, shapes, sizes, positions and backgrounds (use --model for a real model)")
