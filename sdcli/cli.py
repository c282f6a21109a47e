"""Assemble the commands and turn user errors into one line.

Only this module and `sdcli.commands.*` know about Typer; nothing heavy is
imported here so `sdcli --help` stays instant (a test keeps it so).
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from sdcli import __version__
from sdcli.errors import SdcliError, debug_enabled, friendly


def report_error(message: str) -> None:
    """One red line on stderr (plain text when stderr is not a terminal)."""
    if sys.stderr.isatty():
        message = f"\x1b[31m{message}\x1b[0m"
    print(f"error: {message}", file=sys.stderr)


class _Group(TyperGroup):
    """A Typer group whose commands' user errors print one line and exit non-zero."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort) as exc:
            raise exc
        except KeyboardInterrupt:
            report_error("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - translated or re-raised below
            err = friendly(exc)
            if err is None or debug_enabled():
                raise
            report_error(str(err) + ("" if debug_enabled() else ""))
            raise typer.Exit(err.exit_code) from None


app = typer.Typer(
    cls=_Group,
    name="sdcli",
    help="Text-to-image diffusion from the command line: generate, fine-tune, and see how the noise schedule works.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"sdcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Text-to-image diffusion from the command line. Set SDCLI_DEBUG=1 for tracebacks."""


def _register() -> None:
    # Each command module is light (Typer + stdlib); the heavy work it calls imports torch lazily.
    from sdcli.commands import register

    register(app)


_register()


def main() -> None:
    app(prog_name="sdcli")


__all__ = ["SdcliError", "app", "main"]
