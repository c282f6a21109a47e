"""docs/cli.md is generated from --help; it must match the code."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "make_cli_reference.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
