"""docs/cli.md is generated from --help; it must match the code."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    res = subprocess.run([sys.executable, str(ROOT / "docs" / "make_cli_reference.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


README_TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q'


def test_the_readme_stays_short_and_ci_runs_its_test_command_and_the_docs_build():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150, "the README is the front door: move detail to a page in docs/"
    assert README_TEST_COMMAND in readme
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert README_TEST_COMMAND in ci_run.splitlines()
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    for step in ('pip install -e ".[test]"', "python -m pytest -q"):
        assert step in workflow
    assert "mkdocs build --strict" in workflow and "mkdocs build --strict" in ci_run


def test_every_page_is_in_the_site_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert [p for p in pages if f": {p}" not in nav] == []


def test_the_site_builds_strict(tmp_path):
    """No broken link or anchor, every page in the nav (mkdocs and its theme come with the test extra)."""
    import os

    import pytest

    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
