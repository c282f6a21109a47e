"""`sdcli generate`: prompts in, PNGs out, with guidance as a knob you can sweep.

Its options are the settings declared in `sdcli.generation.settings`; this module
only adds the ones about input and output files, and loops: each image that
`sdcli.generation.generate` yields goes to the writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sdcli import options
from sdcli.declare import command, given_on_command_line
from sdcli.generation.settings import RUNTIME_FIELDS, Settings


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
        settings = replayed(from_metadata, values, given_on_command_line(ctx, list(values)))
    run_generate(settings, out=out, overwrite=overwrite, quiet=quiet, json=json)


def replayed(image: Path, values: dict[str, Any], typed: set[str]) -> Settings:
    """The settings recorded in ``image``, with runtime settings and what was typed taken from the command line."""
    from sdcli.generation.settings import settings_from_record
    from sdcli.generation.metadata import read_record

    replaced = set(RUNTIME_FIELDS) | typed | ({"prompts"} if values.get("prompts") else set())
    settings = settings_from_record(read_record(image), replaced)
    given = Settings(**values)
    for name in replaced:
        setattr(settings, name, getattr(given, name))
    return settings


def run_generate(settings: Settings, *, out: Path | None, overwrite: bool = False, quiet: bool = False,
                 json: bool = False) -> list[Path]:
    """Plan, check the output, generate and write; returns this process's image paths.

    Under `accelerate launch`/`torchrun` each process takes its share of the
    jobs (accelerate's split), writes its own numbered files, and the main
    process prints one summary and the contact sheets.
    """
    from sdcli import distributed
    from sdcli.generation import generate, plan
    from sdcli.generation.outputs import ImageWriter

    p = plan(settings)
    writer = ImageWriter(out, p, overwrite=overwrite, json=json)
    for item in generate(p, quiet=quiet):
        writer.write(item)
    written = writer.finish(quiet)
    distributed.close(p.state)
    return written


generate_cmd = command(Settings, _generate)
