"""`sdcli serve`: load a model once and serve it over AUTOMATIC1111's and OpenAI's image APIs.

A thin wrapper: it checks the options (nothing listens on other machines without credentials unless
--insecure says so), fills a `ServeConfig` and calls `sdcli.serve.app.serve`, which Python users and tests
call directly. FastAPI and uvicorn are an optional extra, imported only here when the command runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sdcli import options
from sdcli.errors import UsageError

MB = 1024 * 1024


def serve_cmd(
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", help="Model to serve (Hub id, folder or .safetensors file); repeat to offer several, the "
        "first loaded (clients switch with sd_model_checkpoint or model). Default: $SDCLI_MODEL, else the bundled "
        "one.", show_default=False)] = None,
    host: Annotated[str, typer.Option(
        help="Interface to listen on; 127.0.0.1 answers this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (A1111's is 7860).", min=0, max=65535)] = 7860,
    listen: Annotated[bool, typer.Option("--listen", help="Listen on all interfaces (0.0.0.0); needs --api-auth or "
                                         "--api-key, or --insecure.")] = False,
    api_auth: Annotated[Optional[str], typer.Option(help="HTTP basic credentials as USER:PASS[,USER2:PASS2] (as "
                                                    "A1111's flag).", show_default=False)] = None,
    api_key: Annotated[Optional[str], typer.Option(help="A key clients send as a bearer token (what OpenAI clients "
                                                   "send as their API key; a browser, as the password).", envvar="SDCLI_API_KEY",
                                                   show_envvar=False, show_default=False)] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Allow --listen without credentials (anyone who can "
                                           "reach the port can use the model).")] = False,
    lora_dir: Annotated[Optional[Path], typer.Option(help="Folder of LoRAs that prompts may name as "
                                                     "<lora:NAME:WEIGHT> (NAME.safetensors, or a folder NAME).",
                                                     show_default=False)] = None,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait behind the running one; more get 503.",
                                           min=1)] = 16,
    max_body: Annotated[int, typer.Option(help="Largest request body, in MB.", min=1)] = 50,
    max_pixels: Annotated[int, typer.Option(
        help="Largest image, width × height, asked for or sent.", min=64)] = 2048 * 2048,
    max_steps: Annotated[int, typer.Option(help="Most denoising steps a request may ask for.", min=1)] = 150,
    max_batch: Annotated[int, typer.Option(help="Most images one request may ask for.", min=1)] = 8,
    device: options.DeviceOpt = options.Device.auto,
    dtype: options.DtypeOpt = options.Dtype.auto,
    threads: options.Threads = None,
) -> None:
    """Serve a loaded model over AUTOMATIC1111's API (/sdapi/v1) and OpenAI's images API (/v1)."""
    from sdcli.serve.config import ServeConfig, parse_users

    if listen and host != "127.0.0.1":
        raise UsageError(f"give either --listen or --host {host}, not both")
    users = parse_users(api_auth) if api_auth else {}
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty: give the key clients will send")
    exposed = listen or host not in ("127.0.0.1", "localhost", "::1")
    if exposed and not (users or api_key) and not insecure:
        raise UsageError(f"--{'listen' if listen else 'host ' + host} would let anyone who can reach this machine "
                         "use the model: give --api-auth USER:PASS or --api-key KEY (or --insecure if you mean it)")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("sdcli serve needs FastAPI and uvicorn: pip install 'sdcli[serve]'") from None
    if lora_dir is not None and not lora_dir.expanduser().is_dir():
        raise UsageError(f"--lora-dir {lora_dir}: no such folder")
    config = ServeConfig(
        models=list(model or [None]), lora_dir=lora_dir, host="0.0.0.0" if listen else host, port=port, users=users,
        api_key=api_key, max_queue=max_queue, max_body=max_body * MB, max_pixels=max_pixels, max_steps=max_steps,
        max_batch=max_batch, device=device.value, dtype=dtype.value, threads=threads,
    )
    if exposed and not (users or api_key):
        import sys

        print(f"warning: serving on {config.host} without credentials (--insecure): anyone who can reach port "
              f"{port} can use the model", file=sys.stderr)
    from sdcli.serve.app import serve

    serve(config)
