"""`sdcli serve`: one loaded model behind the HTTP APIs other programs already speak.

AUTOMATIC1111's ``/sdapi/v1`` (`sdcli.serve.a1111`) and OpenAI's images API (`sdcli.serve.openai`) both turn
a request into `Settings` and hand it to one worker thread (`sdcli.serve.worker`) that runs the engine
(`sdcli.generation.engine.Engine`) one request at a time, from a bounded queue; the event loop stays free
for progress, previews and interrupts. `sdcli.serve.models` holds the server's models and LoRAs (requests
name them, never paths), `sdcli.serve.security` the limits and the authentication, `sdcli.serve.app` the
FastAPI app (`create_app`) and `serve`, which runs it under uvicorn.

Only this package's `config` is light: FastAPI, uvicorn and torch are imported where a server starts, so
`sdcli --help` stays instant.
"""

from sdcli.serve.config import ServeConfig

__all__ = ["ServeConfig"]
