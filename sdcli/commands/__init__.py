"""One module per command; each is a thin Typer wrapper over plain functions."""

from __future__ import annotations

import importlib

import typer

# (module, attribute holding the command function, command name)
COMMANDS = [
    ("sdcli.commands.generate", "generate_cmd", "generate"),
    ("sdcli.commands.finetune", "finetune_cmd", "finetune"),
    ("sdcli.commands.inspect_schedule", "inspect_schedule_cmd", "inspect-schedule"),
    ("sdcli.commands.schedulers", "schedulers_cmd", "schedulers"),
    ("sdcli.commands.serve", "serve_cmd", "serve"),
]


def register(app: typer.Typer) -> None:
    for module_name, attr, name in COMMANDS:
        module = importlib.import_module(module_name)
        app.command(name)(getattr(module, attr))
