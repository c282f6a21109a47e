"""`sdcli finetune`: fine-tune a pipeline (LoRA or full) on a folder of captioned images.

A thin wrapper: its options are the settings declared on `FinetuneConfig`
(`sdcli.training.config`); it builds one and calls `sdcli.training.finetune`,
which tests and Python users call directly. Runs unchanged under
`accelerate launch` or `torchrun` for several GPUs.
"""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sdcli import options
from sdcli.declare import command, declared, given_on_command_line
from sdcli.errors import UsageError
from sdcli.training.config import FinetuneConfig

ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", help="Settings from a TOML or YAML file (keys: the options' names; [[datasets]] tables) or a run's "
    "training_settings.json; options typed here win.", show_default=False)]
PrintConfig = Annotated[bool, typer.Option(
    "--print-config", help="Print the effective settings as TOML (for --config) and stop.")]


def _finetune(ctx: typer.Context, config: ConfigFile = None, print_config: PrintConfig = False,
              json: options.Json = False, *, values: dict[str, Any]) -> None:
    """Fine-tune a pipeline on captioned images; writes LoRA weights or a full pipeline to --out."""
    from sdcli.training import finetune

    if config is not None:
        from sdcli.training import config_file

        typed = given_on_command_line(ctx, [d.name for d in declared(FinetuneConfig)])
        values = config_file.merge(values, config_file.read(config), typed)
    for name in ("data", "out"):  # not required of the command line alone: a --config may give them
        if not values.get(name):
            raise UsageError(f"Missing option '--{name}' (give it, or {name} in a --config file)", setting=name)
    cfg = FinetuneConfig(**values)
    if print_config:
        from sdcli.training.config_file import effective

        cfg.check()
        print(effective(cfg), end="")
        return
    result = finetune(cfg)
    if result.world_size > 1 and not _is_main():
        return  # one answer on stdout, from the main process
    if json:
        print(jsonlib.dumps({
            "out": str(result.out), "weights": str(result.weights), "steps": result.steps,
            "final_loss": result.losses[-1] if result.losses else None, "world_size": result.world_size,
            "checkpoints": [str(p) for p in result.checkpoints],
            "validation_images": [str(p) for p in result.validation_images],
        }))
    else:
        print(result.out)


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


finetune_cmd = command(FinetuneConfig, _finetune, optional=("data", "out"))
