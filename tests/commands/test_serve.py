"""`sdcli serve`'s command line: nothing listens beyond this machine without credentials, and a missing extra
or a malformed option is one line, before any model loads."""

from __future__ import annotations

import sys

import pytest
from conftest import one_error_line


@pytest.mark.parametrize("args", [["--listen"], ["--host", "0.0.0.0"], ["--host", "192.168.1.5"]])
def test_listening_beyond_this_machine_needs_credentials(cli, args):
    line = one_error_line(cli("serve", "--model", "./no/such/model", *args), 2)
    assert "would let anyone who can reach this machine use the model: give --api-auth USER:PASS or --api-key KEY" \
        in line


@pytest.mark.parametrize("args, says", [
    (["--api-auth", "alice"], "--api-auth: 'alice' is not USER:PASSWORD"),
    (["--api-auth", "alice:pw,:x"], "--api-auth: ':x' is not USER:PASSWORD"),
    (["--api-key", " "], "--api-key is empty"),
    (["--listen", "--host", "10.0.0.1", "--api-key", "k"], "give either --listen or --host 10.0.0.1, not both"),
    (["--lora-dir", "./no/such/folder"], "--lora-dir no/such/folder: no such folder"),
])
def test_bad_options_are_one_line(cli, args, says):
    assert says in one_error_line(cli("serve", *args), 2)


def test_without_fastapi_it_names_the_extra_to_install(cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # what an import of a missing package meets
    line = one_error_line(cli("serve"), 2)
    assert line == "error: sdcli serve needs FastAPI and uvicorn: pip install 'sdcli[serve]'"


def test_an_unloadable_model_is_one_line_before_anything_listens(cli):
    line = one_error_line(cli("serve", "--model", "./no/such/model", "--port", "0"), 1)
    assert line == "error: no such model file or folder: ./no/such/model"
