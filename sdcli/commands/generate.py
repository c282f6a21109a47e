"""`sdcli generate`: prompts in, PNGs out, with guidance as a knob you can sweep.

Its options are the settings declared in `sdcli.generation.settings`; this module
only adds the ones about input and output files, plans the request, loads an engine
(`sdcli.generation.engine`) and writes each image it makes, saying what happens on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sdcli import options
from sdcli.declare import command, given_on_command_line
from sdcli.generation.settings import Settings


def _generate(
    ctx: typer.Context,
    prompt_file: Annotated[Optional[Path], typer.Option(help="Text file of prompts, one a line (# comments).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder, or a .png path for one image.")] = None,
    overwrite: options.Overwrite = False,
    from_metadata: Annotated[
        Optional[Path], typer.Option(help="Regenerate from an sdcli PNG's settings; other options given override.")
    ] = None,
    quiet: options.Quiet = False,
    json: options.Json = False,
    *,
    values: dict[str, Any],
) -> None:
    """Generate images from text prompts; prints the paths of the PNGs it writes."""
    from sdcli.generation.settings import read_prompt_file

    if (values.get("scheduler") or "").strip().lower() == "list":
        from sdcli.commands.schedulers import schedulers_cmd

        schedulers_cmd(json=json)
        return
    if prompt_file is not None:
        values["prompts"] = list(values.get("prompts") or []) + read_prompt_file(prompt_file)
    settings = Settings(**values)
    if from_metadata is not None:
        from sdcli.generation.metadata import replayed

        settings = replayed(from_metadata, values, given_on_command_line(ctx, list(values)))
    run_generate(settings, out=out, overwrite=overwrite, quiet=quiet, json=json)


def run_generate(settings: Settings, *, out: Path | None, overwrite: bool = False, quiet: bool = False,
                 json: bool = False) -> list[Path]:
    """Plan, check the output, load the engine, generate and write; returns this process's image paths.

    Under `accelerate launch`/`torchrun` each process takes its share of the jobs (accelerate's split),
    writes its own numbered files, and the main process prints one summary and the contact sheets.
    """
    import time

    from sdcli import distributed
    from sdcli.generation.engine import Engine
    from sdcli.generation.outputs import ImageWriter, emit
    from sdcli.generation.run import plan
    from sdcli.progress import Notes, progress_bar, while_slow

    # 1. Everything that needs no weights: the plan and where its files go.
    p = plan(settings)
    writer = ImageWriter(out, p, overwrite=overwrite, announce=lambda path, record: emit(path, record, json))
    s, say = p.settings, Notes(not quiet and p.is_main)
    # 2. Load the model (the slow part: minutes for a big one, so a log says what the run waits for).
    t0 = time.perf_counter()
    with while_slow(say, f"loading {s.model} ..."):
        engine = Engine.load(s)
    loaded = f"loaded {engine.describe()} in {time.perf_counter() - t0:.1f}s"

    def ready() -> None:  # the request's LoRAs and embeddings are in too: the model is ready as asked
        say(loaded)
        if not s.seeds:
            say(f"seed: {p.seeds[0]}" + (f"..{p.seeds[-1]}" if len(p.seeds) > 1 else "") + " (random)")

    # 3. Denoise this process's share, writing each image as soon as it exists.
    t0, done_at = time.perf_counter(), []
    total = len(p.share()) * engine.denoising_steps(s)
    with progress_bar("denoising", total=total, disable=not say.enabled) as advance:
        for item in engine.run(p, on_step=lambda step: advance(step.images), say=say, on_ready=ready):
            writer.write(item)
            done_at.append(time.perf_counter())
    written = writer.finish(Notes(not quiet))
    # 4. How long it took; the first compiled image apart, so the steady speed is visible.
    if p.state is None and s.compile and done_at:
        text = f"first image {done_at[0] - t0:.1f}s (includes torch.compile)"
        if len(done_at) > 1:
            text += f", then {(done_at[-1] - done_at[0]) / (len(done_at) - 1):.2f}s each"
        Notes(not quiet)(text)
    elif p.state is None and len(done_at) > 1:
        seconds = done_at[-1] - t0
        Notes(not quiet)(f"{len(done_at)} images in {seconds:.1f}s ({seconds / len(done_at):.2f}s each)")
    distributed.close(p.state)
    return written


generate_cmd = command(Settings, _generate)
