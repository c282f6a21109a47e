"""Who may call the server, and how much they may send: checked before a request reaches a handler.

`Guard` is plain ASGI around the app: the credentials (`--api-auth`'s HTTP basic, `--api-key`'s bearer
token, either one accepted; the key also as a basic-auth password, which is how a browser's login prompt
sends it) compared in constant time, and a body over `--max-body` refused from its Content-Length, or, when
it comes chunked without one, as soon as it grows past the bound (before the app reads it).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any


def error_body(path: str, status: int, detail: str, param: str | None = None, code: str | None = None) -> dict:
    """The error as the client's API shapes it: OpenAI's ``{"error": {...}}`` under /v1, else ``{"detail"}``."""
    detail = " ".join(str(detail).split())  # one line, whatever the message held
    if path.startswith("/v1/") or path == "/v1":
        kind = "invalid_request_error" if status < 500 else "server_error"
        if status == 401:
            kind = "authentication_error"
        return {"error": {"message": detail, "type": kind, "param": param, "code": code}}
    return {"detail": detail}


async def send_json(send: Any, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    import json

    body = json.dumps(payload).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Refuse a request without the server's credentials (401) or with too large a body (413)."""

    def __init__(self, app: Any, *, users: dict[str, str], api_key: str | None, max_body: int):
        self.app, self.users, self.api_key, self.max_body = app, users, api_key, max_body

    def allowed(self, headers: dict[bytes, bytes]) -> bool:
        if not self.users and not self.api_key:
            return True
        scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer" and self.api_key:
            return hmac.compare_digest(value.encode(), self.api_key.encode())
        if scheme.lower() == "basic":
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, ValueError):
                return False
            expected = self.users.get(user)
            matches = hmac.compare_digest(password.encode(), (expected or "").encode())
            # The key as the password, whatever the user name: how a browser's login prompt sends it to the page.
            is_key = bool(self.api_key) and hmac.compare_digest(password.encode(), (self.api_key or "").encode())
            return bool(sep) and ((expected is not None and matches) or is_key)
        return False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if not self.allowed(headers):
            # Basic: every server with credentials takes it (--api-key's key as the password), and a browser
            # asks for it at once, so the page (GET /) opens behind either kind.
            challenge = 'Basic realm="sdcli"'
            detail = "wrong or missing credentials: " + " or ".join(
                what for what, on in (("HTTP basic auth (--api-auth)", self.users), ("a bearer API key", self.api_key))
                if on)
            return await send_json(send, 401, error_body(path, 401, detail, code="invalid_api_key"),
                                   {"WWW-Authenticate": challenge})
        length = headers.get(b"content-length")
        too_large = f"the request body is over this server's limit of {self.max_body} bytes (--max-body)"
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return await send_json(send, 400, error_body(path, 400, "Content-Length is not a number"))
            if size > self.max_body:
                return await send_json(send, 413, error_body(path, 413, too_large))
            return await self.app(scope, receive, send)
        # Chunked, with no length to judge by: read it here, up to the bound, and hand the app what was read.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away mid-body
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_body:
                return await send_json(send, 413, error_body(path, 413, too_large))
            if not message.get("more_body"):
                break
        replayed = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Any:
            return replayed.pop() if replayed else await receive()

        return await self.app(scope, replay, send)
