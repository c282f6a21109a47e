"""Write docs/cli.md from the commands' own --help, so the reference cannot drift from the code.

    python docs/make_cli_reference.py            # rewrite docs/cli.md
    python docs/make_cli_reference.py --check    # exit 1 if docs/cli.md is stale (a test runs this)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
TARGET = HERE / "cli.md"


def help_text(args: list[str]) -> str:
    # A fixed width and no colour, so the text is the same on every machine.
    env = {**os.environ, "TERMINAL_WIDTH": "100", "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "100"}
    out = subprocess.run([sys.executable, "-m", "sdcli", *args, "--help"], capture_output=True, text=True, env=env,
                         check=True).stdout
    return "\n".join(line.rstrip() for line in out.splitlines()).strip("\n")


def render() -> str:
    from sdcli.commands import COMMANDS

    parts = ["# sdcli command reference", "",
             "Generated from `--help` by `python docs/make_cli_reference.py`; a test fails when it is stale.", "",
             "## sdcli", "", "```", help_text([]), "```", ""]
    for _module, _attr, name in COMMANDS:
        parts += [f"## sdcli {name}", "", "```", help_text([name]), "```", ""]
    return "\n".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not TARGET.is_file() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python docs/make_cli_reference.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(TARGET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
