"""The FastAPI app (`create_app`) and `serve`, which loads the first model and runs it under uvicorn.

Every response to a bad request is a 4xx with a one-line ``detail`` (OpenAI's error shape under /v1):
sdcli's own errors worded with the API's field names (`sdcli.declare.worded`), FastAPI's validation errors
cut to their first line, and anything unexpected a one-line 500, never a traceback. One line per request
goes to stderr.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator, Optional

from sdcli.declare import worded
from sdcli.errors import SdcliError, friendly
from sdcli.serve.config import ServeConfig
from sdcli.serve.security import Guard, error_body, send_json
from sdcli.serve.server import ClientGone

# How each API calls sdcli's settings, for the errors the engine raises (it names --guidance; A1111 cfg_scale).
A1111_NAMES = {
    "prompts": "prompt", "negative_prompt": "negative_prompt", "seeds": "seed", "steps": "steps",
    "guidance": "cfg_scale", "distilled_guidance": "distilled_cfg_scale", "width": "width", "height": "height",
    "scheduler": "sampler_name",
    "sigmas": "scheduler", "batch_size": "batch_size", "num_images": "n_iter", "hires_scale": "hr_scale",
    "hires_steps": "hr_second_pass_steps", "hires_strength": "denoising_strength", "strength": "denoising_strength",
    "hires_upscaler": "hr_upscaler", "init_image": "init_images", "reference_images": "init_images", "mask": "mask",
    "mask_blur": "mask_blur", "clip_skip": "CLIP_stop_at_last_layers", "model": "sd_model_checkpoint",
    "loras": "<lora:NAME:WEIGHT>",
}
OPENAI_NAMES = {
    "prompts": "prompt", "negative_prompt": "negative_prompt", "seeds": "seed", "steps": "steps",
    "guidance": "guidance", "width": "size", "height": "size", "scheduler": "sampler", "sigmas": "sampler",
    "num_images": "n", "batch_size": "n", "init_image": "image", "reference_images": "image", "mask": "mask",
    "strength": "strength", "model": "model", "loras": "<lora:NAME:WEIGHT>",
}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _status_of(exc: SdcliError) -> int:
    from sdcli.serve.models import Unknown

    return 404 if isinstance(exc, Unknown) and exc.setting == "model" else 400


def _one_line(exc: SdcliError, path: str) -> str:
    from sdcli.generation.settings import Settings

    names = OPENAI_NAMES if path.startswith("/v1") else A1111_NAMES
    return " ".join(worded(exc, names, Settings).split())


def _validation_detail(exc: Any) -> str:
    """FastAPI's list of validation errors as one line: the first, naming its field."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return "the body is malformed"
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})"
    if first.get("type") == "model_attributes_type" and tuple(first.get("loc", ())) == ("body",):
        return "the body must be a JSON object (sent with Content-Type: application/json)"
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "form"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where or 'the body'}: {first.get('msg', 'invalid')}{more}"


def unexpected_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"unexpected {type(exc).__name__}" + (f": {text}" if text else "") + " (a bug in sdcli serve)"


class _Logged:
    """Plain ASGI: one stderr line per request, and a one-line 500 for what no handler expected."""

    def __init__(self, app: Any, log: Callable[[str], None]):
        self.app, self.log = app, log

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]
        scope.setdefault("state", {})

        async def sent(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path = scope.get("path", "")
        try:
            await self.app(scope, receive, sent)
        except ClientGone:
            status[0] = 499  # nginx's "client closed request": nobody is there to read an answer
        except Exception as exc:  # noqa: BLE001 - a bug must cost one request one line, not the server
            if not status[0]:  # raised outside the app (its own handler answers what it raises)
                status[0] = 500
                scope["state"]["error"] = unexpected_line(exc)
                await send_json(send, 500, error_body(path, 500, scope["state"]["error"]))
        notes = scope["state"].get("notes") or []
        error = scope["state"].get("error")
        self.log(f"{scope.get('method', '')} {path} {status[0]} {time.perf_counter() - t0:.2f}s"
            + (f" ({error})" if error else "") + "".join(f"; {note}" for note in notes))


def create_app(server: Any) -> Any:
    """The app over a running `sdcli.serve.server.Server` (its worker started, a model loaded or loading)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from sdcli.serve import a1111, openai, page
    from sdcli.serve.worker import Busy

    app = FastAPI(title="sdcli", docs_url="/docs", redoc_url=None)
    app.state.server = server

    def answer(request: Request, status: int, detail: str, headers: dict | None = None,
               param: Optional[str] = None, code: Optional[str] = None) -> Any:
        request.state.error = detail
        return JSONResponse(error_body(request.url.path, status, detail, param, code), status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        return answer(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Any:
        # A1111 answers a malformed request with FastAPI's 422; OpenAI's API with a 400.
        status = 400 if request.url.path.startswith("/v1") else 422
        return answer(request, status, _validation_detail(exc))

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> Any:
        return answer(request, 503, str(exc), {"Retry-After": str(exc.retry_after)}, code="server_busy")

    @app.exception_handler(SdcliError)
    async def refused(request: Request, exc: SdcliError) -> Any:
        names = OPENAI_NAMES if request.url.path.startswith("/v1") else A1111_NAMES
        status = _status_of(exc)
        return answer(request, status, _one_line(exc, request.url.path), param=names.get(exc.setting or ""),
                      code="model_not_found" if status == 404 else None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Any:
        # Starlette's outermost middleware calls this, sends its answer and re-raises for the server's log:
        # `_Logged` takes the exception there, the answer already sent.
        err = friendly(exc)  # a foreign error that means bad input (an unreadable image, say)
        if err is not None:
            return answer(request, 400, _one_line(err, request.url.path))
        return answer(request, 500, unexpected_line(exc))

    app.include_router(page.router(server))
    app.include_router(a1111.router(server), prefix="/sdapi/v1")
    app.include_router(openai.router(server), prefix="/v1")
    return _Logged(Guard(app, users=server.config.users, api_key=server.config.api_key,
                         max_body=server.config.max_body), server.say)


def start(config: ServeConfig, log: Callable[[str], None] = say) -> Any:
    """The server's state with its first model loaded (in the worker thread, where the engine will run:
    torch's threads are set there); a bad model is an `SdcliError` here, before anything listens."""
    from sdcli.serve.models import Models
    from sdcli.serve.server import Server
    from sdcli.serve.worker import Worker

    models = Models(config.models, {"device": config.device, "dtype": config.dtype, "threads": config.threads},
                    config.lora_dir, say=log)
    worker = Worker(models, config.max_queue)
    try:
        worker.call(lambda job: models.use(), "load")
    except BaseException:
        worker.close()
        raise
    return Server(config, models, worker, say=log)


def serve(config: ServeConfig) -> None:
    """Load the first model and serve until Ctrl-C."""
    import uvicorn

    server = start(config)
    try:
        where = f"http://{config.host}:{config.port}"
        say(f"serving {server.models.current} on {where} (the page: {where}/, A1111 API: {where}/sdapi/v1, "
            f"OpenAI API: {where}/v1)")
        uvicorn.run(create_app(server), host=config.host, port=config.port, log_level="warning", access_log=False)
    finally:
        server.worker.close()


@contextlib.contextmanager
def running(config: ServeConfig, log: Callable[[str], None] = say) -> Iterator[tuple[str, Any]]:
    """A server in a background thread on ``config.host`` (port 0: a free one), for tests and benchmarks;
    yields its base URL and `Server`, and stops it afterwards."""
    import threading

    import uvicorn

    server = start(config, log)
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host=config.host, port=config.port, log_level="warning",
                                       access_log=False, lifespan="off"))
    thread = threading.Thread(target=uv.run, name="sdcli-serve", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not uv.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        port = uv.servers[0].sockets[0].getsockname()[1]
        yield f"http://{config.host}:{port}", server
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        server.worker.close()
