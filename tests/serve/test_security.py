"""Credentials: HTTP basic (--api-auth) or a bearer key (--api-key); anything else is a 401 with one line."""

from __future__ import annotations

import pytest
import requests
from serve.fixtures import KEY, PASSWORD, USER

WRONG = {
    "none": {},
    "wrong-password": dict(auth=(USER, "nope")),
    "unknown-user": dict(auth=("mallory", PASSWORD)),
    "wrong-key": dict(headers={"Authorization": "Bearer nope"}),
    "garbled-basic": dict(headers={"Authorization": "Basic %%%"}),
    "other-scheme": dict(headers={"Authorization": f"Token {KEY}"}),
}


@pytest.mark.parametrize("case", WRONG)
@pytest.mark.parametrize("path", ["/sdapi/v1/sd-models", "/v1/models"])
def test_wrong_or_missing_credentials_get_401(served, case, path):
    answer = requests.get(served.url + path, timeout=10, **WRONG[case])
    assert answer.status_code == 401
    message = answer.json()["error"]["message"] if path.startswith("/v1") else answer.json()["detail"]
    assert message == "wrong or missing credentials: HTTP basic auth (--api-auth) or a bearer API key"
    assert answer.headers["WWW-Authenticate"].startswith("Basic")


@pytest.mark.parametrize("how", [dict(auth=(USER, PASSWORD)), dict(headers={"Authorization": f"Bearer {KEY}"}),
                                 dict(auth=("anyone", KEY))])  # the key as a password: a browser's login prompt
def test_basic_auth_or_the_key_gets_in(served, how):
    assert requests.get(served.url + "/sdapi/v1/sd-models", timeout=10, **how).status_code == 200


def test_a_server_with_only_a_key_has_browsers_ask_for_it():
    """Its 401 asks for basic auth (a bearer challenge gets no login prompt), and the key is the password."""
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    from sdcli.serve.security import Guard

    client = TestClient(Guard(PlainTextResponse("the page"), users={}, api_key=KEY, max_body=1024))
    refused = client.get("/")
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == 'Basic realm="sdcli"'
    assert client.get("/", auth=("anyone", KEY)).text == "the page"
    assert client.get("/", auth=("anyone", "nope")).status_code == 401
