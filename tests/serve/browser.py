"""A headless Chromium for the page's test, driven over the DevTools protocol through a pipe.

``--remote-debugging-pipe`` makes Chromium read commands on file descriptor 3 and write answers and events
on 4, each a JSON message ending in a NUL byte: no websocket library, no driver binary, no port. A reader
thread answers the browser's login prompt (basic auth) as a person would, with the credentials given.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from typing import Any, Optional

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> Optional[str]:
    return next((path for path in map(shutil.which, NAMES) if path), None)


def _above_9(fd: int) -> int:
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class Browser:
    """One headless Chromium with one tab; `evaluate` runs JavaScript in the tab and returns its value."""

    def __init__(self, binary: str, profile: str, login: tuple[str, str] | None = None):
        self.login = login
        to_chrome, self._out = os.pipe()
        self._in, from_chrome = os.pipe()
        # Above 9, so that putting one on 3 or 4 in the child cannot overwrite the other.
        to_chrome, from_chrome = (_above_9(fd) for fd in (to_chrome, from_chrome))
        flags = ["--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-extensions", "--disable-background-networking", "--remote-debugging-pipe",
                 f"--user-data-dir={profile}", *(["--no-sandbox"] if os.geteuid() == 0 else [])]
        # Chromium wants the pipe on descriptors 3 and 4 exactly; bash puts it there (no preexec_fn:
        # forking a process with a server's threads running is what that would risk).
        wire = f'exec "$@" 3<&{to_chrome} 4>&{from_chrome} {to_chrome}<&- {from_chrome}>&-'
        self.process = subprocess.Popen(["bash", "-c", wire, "bash", binary, *flags, "about:blank"],
                                        pass_fds=(to_chrome, from_chrome), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._ids = itertools.count(1)
        self._answers: dict[int, dict] = {}
        self._arrived = threading.Condition()
        self._write_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="chromium-pipe", daemon=True)
        self._reader.start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        if login:
            self.call("Fetch.enable", session=self.session, handleAuthRequests=True, patterns=[{"urlPattern": "*"}])
        self.call("Page.enable", session=self.session)

    def _send(self, method: str, session: str | None, params: dict) -> int:
        ident = next(self._ids)
        message = {"id": ident, "method": method, "params": params} | ({"sessionId": session} if session else {})
        with self._write_lock:
            os.write(self._out, json.dumps(message).encode() + b"\0")
        return ident

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._in, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                self._handle(json.loads(raw))
        with self._arrived:
            self._answers[0] = {"error": {"message": "the browser exited"}}
            self._arrived.notify_all()

    def _handle(self, message: dict) -> None:
        method, params, session = message.get("method"), message.get("params", {}), message.get("sessionId")
        if method == "Fetch.requestPaused":  # every request pauses once Fetch is on: let it go on
            self._send("Fetch.continueRequest", session, {"requestId": params["requestId"]})
        elif method == "Fetch.authRequired":  # the login prompt: type the credentials in
            user, password = self.login or ("", "")
            self._send("Fetch.continueWithAuth", session, {"requestId": params["requestId"], "authChallengeResponse": {
                "response": "ProvideCredentials", "username": user, "password": password}})
        elif "id" in message:
            with self._arrived:
                self._answers[message["id"]] = message
                self._arrived.notify_all()

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params: Any) -> dict:
        ident = self._send(method, session, params)
        with self._arrived:
            if not self._arrived.wait_for(lambda: ident in self._answers or 0 in self._answers, timeout):
                raise TimeoutError(f"{method}: no answer from the browser in {timeout} s")
            answer = self._answers.pop(ident, None) or self._answers[0]
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error'].get('message')}")
        return answer.get("result", {})

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=self.session, url=url)
        self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')} "
                               f"{result['exceptionDetails'].get('exception', {}).get('description', '')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20, every: float = 0.05) -> Any:
        """The first true value of ``expression``, evaluated every ``every`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(every)
        raise TimeoutError(f"not true after {timeout} s: {expression}")

    def image(self, expression: str) -> Any:
        """The PIL image of a data: URL that ``expression`` gives (an <img>'s src)."""
        from PIL import Image

        url = self.evaluate(expression)
        assert url.startswith("data:image/png;base64,"), url[:80]
        return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)  # the browser's end closed: its read sees the end
        os.close(self._out)
        os.close(self._in)
