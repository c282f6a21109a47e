"""Shared fixtures: tiny random-weight pipelines saved to temp folders, and no network, ever."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests must never reach the Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("SDCLI_MODEL", None)
os.environ.pop("SDCLI_DEBUG", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of tiny saved pipelines, one per family, built once per test session."""
    from sdcli.testing import FAMILIES, save_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    return {family: str(save_tiny_pipeline(root / family, family)) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_sd(tiny_models):
    return tiny_models["sd1"]


@pytest.fixture
def cli(monkeypatch, tmp_path):
    """Run the real CLI in-process through Typer's runner, in a temp working directory."""
    from typer.testing import CliRunner

    from sdcli.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def run(*args, **kwargs):
        return runner.invoke(app, [str(a) for a in args], **kwargs)

    return run
