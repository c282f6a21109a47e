"""Fixtures of the serve tests (a plugin of tests/conftest.py: a nested conftest would shadow its helpers).

One real uvicorn server per session on 127.0.0.1 (a free port), over two tiny pipelines and a LoRA folder,
with both kinds of credentials; the tests drive it with the real `webuiapi` and `openai` clients."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest


USER, PASSWORD, KEY = "alice", "s3cret:pass", "test-key-123"


@dataclass
class Served:
    url: str
    host: str
    port: int
    server: object  # sdcli.serve.server.Server
    models: dict  # name -> path
    lora: str  # the LoRA's name in --lora-dir
    log: list = field(default_factory=list)

    def webui(self):
        import webuiapi

        return webuiapi.WebUIApi(host=self.host, port=self.port, username=USER, password=PASSWORD)

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def post(self, path, auth=True, **kwargs):
        import requests

        return requests.post(self.url + path, auth=(USER, PASSWORD) if auth else None, timeout=60, **kwargs)

    def get(self, path, auth=True, **kwargs):
        import requests

        return requests.get(self.url + path, auth=(USER, PASSWORD) if auth else None, timeout=60, **kwargs)


@pytest.fixture(scope="session")
def lora_dir(tiny_models, tmp_path_factory):
    from sdcli.testing import save_random_lora

    root = tmp_path_factory.mktemp("serve-loras")
    save_random_lora(tiny_models["sd1"], root / "style", seed=1)
    return root


@pytest.fixture(scope="session")
def served(tiny_models, lora_dir):
    pytest.importorskip("fastapi", reason="sdcli serve needs the serve extra: pip install 'sdcli[serve]'")
    from sdcli.serve.app import running
    from sdcli.serve.config import MB, ServeConfig

    log: list[str] = []
    # One torch thread: the tests compare the server's images with `sdcli generate --threads 1` in this process
    # (torch's thread count is process-wide, and a float sum's last bit depends on it).
    config = ServeConfig(models=[tiny_models["sd1"], tiny_models["sd2"]], lora_dir=lora_dir, port=0,
                         users={USER: PASSWORD}, api_key=KEY, max_body=2 * MB, max_pixels=64 * 64, max_steps=60,
                         max_batch=4, threads=1)
    with running(config, log=log.append) as (url, server):
        host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
        yield Served(url, host, int(port), server, {"sd1": tiny_models["sd1"], "sd2": tiny_models["sd2"]},
                     "style", log)


@pytest.fixture
def on_first_model(served):
    """Each test that switches models leaves the server on its first one."""
    yield served
    if served.server.models.current != "sd1":
        served.webui().util_set_model("sd1", find_closest=False)


@pytest.fixture(scope="session")
def served_editing(tiny_flux2_models):
    """A server of two editing models: FLUX.2 Klein (step-distilled: up to 10 images, and inpaints) and
    FLUX.1 Kontext (one image, no inpainting), with room for FLUX.2's 64-pixel reference sides."""
    pytest.importorskip("fastapi", reason="sdcli serve needs the serve extra: pip install 'sdcli[serve]'")
    from sdcli.serve.app import running
    from sdcli.serve.config import ServeConfig

    models = {name: tiny_flux2_models[name] for name in ("klein-distilled", "kontext")}
    config = ServeConfig(models=list(models.values()), port=0, api_key=KEY, max_pixels=128 * 128, threads=1)
    with running(config, log=lambda text: None) as (url, server):
        host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
        yield Served(url, host, int(port), server, models, "")
