"""`sdcli generate`: prompts in, PNGs out, with guidance as a knob you can sweep.

Its options are the settings declared in `sdcli.generation.settings`; this module
only adds the ones about input and output files and hands the settings to
`sdcli.generation.run.run_generate`, which generates and writes each image.
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
    from sdcli.generation.run import run_generate

    run_generate(settings, out=out, overwrite=overwrite, quiet=quiet, json=json)


generate_cmd = command(Settings, _generate)
