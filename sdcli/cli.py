"""Assemble the commands and turn user errors into one line.

Only this module and `sdcli.commands.*` know about Typer; nothing heavy is
imported here so `sdcli --help` stays instant (a test keeps it so).
"""

from __future__ import annotations

import errno
import re
import sys
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from sdcli import __version__
from sdcli.errors import SdcliError, debug_enabled, friendly


def report_error(message: str) -> None:
    """One red line on stderr (plain text when stderr is not a terminal)."""
    if sys.stderr.isatty():
        message = f"\x1b[31m{message}\x1b[0m"
    print(f"error: {message}", file=sys.stderr)


def unexpected(exc: BaseException, where: str) -> str:
    """The one line for an error nobody anticipated: its type, where, and the first line of its message."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if len(text) > 200:
        text = text[:199] + "…"
    return (f"unexpected {type(exc).__name__} in {where}" + (f": {text}" if text else "")
            + " (set SDCLI_DEBUG=1 for the traceback)")


def _passed_through() -> tuple[type, ...]:
    """What Typer handles itself: exits, and a bad command line (usage on stderr, exit 2).

    Typer >= 0.2x vendors click (its errors derive from TyperException); older versions raise click's own.
    """
    click = sys.modules.get("click")  # imported already when Typer uses it
    found: list[type] = [typer.Exit, typer.Abort]
    for cls in (getattr(typer, "TyperException", None), getattr(click, "ClickException", None)):
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _exit_code(exc: BaseException, where: str) -> int:
    """Report ``exc`` in one line and say which exit code it means (1 for what nobody anticipated)."""
    err = friendly(exc)
    report_error(str(err) if err is not None else unexpected(exc, where))
    return err.exit_code if err is not None else 1


def _whole_option_names() -> None:
    """Keep option names whole in --help at any width (80 columns cut `--guidance-resca…`).

    Typer's option table has four name columns (--x, -x, --no-x, -X) beside the type and the help, and
    rich narrows the widest cells, names included, until the table fits. So each --no-x goes under its --x,
    leaving two name columns, and those never wrap: only the type and the help do.
    """
    try:
        from rich.text import Text
        from typer import rich_utils
    except ImportError:  # no rich: click's plain help, which never cuts a name
        return
    if getattr(rich_utils.Table, "whole_names", False):
        return

    def stack(top: Any, below: Any) -> Any:
        return Text.assemble(top, "\n", below) if below.plain else top

    class WholeNames(rich_utils.Table):
        whole_names = True

        def add_row(self, *cells: Any, **kwargs: Any) -> None:
            names = cells[-6:-2]
            if len(cells) not in (6, 7) or not all(isinstance(c, Text) for c in names):
                return super().add_row(*cells, **kwargs)  # not an option row (the commands table)
            long, short, no_long, no_short = names
            super().add_row(*cells[:-6], stack(long, no_long), stack(short, no_short), *cells[-2:], **kwargs)
            for column in self.columns[:-2]:
                column.no_wrap = True

    rich_utils.Table = WholeNames


# What rich reads as a markup tag: `[red:blue:0.5]` in a help text is a prompt, not a style (rich.markup's rule).
_TAG = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")


def _as_written(command: Any, ctx: Any) -> None:
    """Show each option's help as written and each flag as a flag, in --help and so in docs/cli.md.

    Typer renders help texts as rich markup, so `editing [red:blue:0.5] and [red|blue]` lost its examples
    (`editing  and `); the brackets are escaped instead. And Typer 0.2x gives a flag a `<bool>` type, as if
    it took a value: a flag's type column is left empty (an empty metavar), as click's own help does.
    """
    for param in command.get_params(ctx):
        if getattr(param, "sdcli_as_written", False):
            continue
        param.sdcli_as_written = True
        if getattr(param, "help", None):
            param.help = _TAG.sub(lambda m: f"{m.group(1)}{m.group(1)}\\{m.group(2)}", param.help)
        if getattr(param, "is_flag", False) and not getattr(param, "count", False):
            param.metavar = ""


class _Command(TyperCommand):
    """A Typer command whose --help keeps option names whole and shows its help texts as written."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _whole_option_names()
        _as_written(self, ctx)
        return super().format_help(ctx, formatter)


class _Group(TyperGroup):
    """A Typer group whose commands' errors, anticipated or not, print one line and exit non-zero."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _whole_option_names()
        _as_written(self, ctx)
        return super().format_help(ctx, formatter)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _passed_through():
            raise
        except KeyboardInterrupt:
            report_error("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:  # noqa: BLE001 - every error becomes one line
            if debug_enabled() and isinstance(exc, EOFError):  # Typer would turn it into a bare "Aborted."
                import traceback

                traceback.print_exc()
                raise typer.Exit(1) from None
            if debug_enabled() or (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
                raise  # the traceback; or stdout piped into `head`, which Typer ends quietly
            raise typer.Exit(_exit_code(exc, ctx.invoked_subcommand or "sdcli")) from None


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
    from sdcli import threads
    from sdcli.progress import quiet_libraries

    quiet_libraries(imports=False)  # before any command imports a library that logs on import (torchao)
    threads.mark()  # how busy the other processes are is measured over start-up (sdcli.threads)


def _register() -> None:
    # Each command module is light (Typer + stdlib); the heavy work it calls imports torch lazily.
    from sdcli.commands import register

    register(app)
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = _Command


_register()


def main() -> None:
    """The `sdcli` entry point (and `python -m sdcli`): what escapes the commands' own handling is one line too."""
    try:
        app(prog_name="sdcli")
    except KeyboardInterrupt:
        report_error("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - e.g. raised while Typer builds or parses, outside any command
        if debug_enabled():
            raise
        sys.exit(_exit_code(exc, "sdcli"))


__all__ = ["SdcliError", "app", "main"]
