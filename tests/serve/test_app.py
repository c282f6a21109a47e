"""Bad requests get a 4xx with one line saying what was wrong (OpenAI's error shape under /v1), never a 500
or a traceback, and the server goes on serving; one log line per request."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

T2I, I2I, GEN = "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations"
OK = dict(prompt="a red circle", steps=1, width=32, height=32)
NOT_AN_IMAGE = base64.b64encode(b"hello, not a picture").decode()


def _png64(size=(32, 32)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# (path, request, status, what the one line says)
BAD = {
    "malformed-json": (T2I, dict(data="{bad", headers={"Content-Type": "application/json"}), 422,
                       "the body is not valid JSON"),
    "body-not-an-object": (T2I, dict(json=[1, 2]), 422, "the body must be a JSON object"),
    "body-as-a-form": (T2I, dict(data={"prompt": "x"}), 422, "the body must be a JSON object (sent with Content-Type"),
    "wrong-type": (T2I, dict(json=OK | {"steps": "many"}), 422, "steps: Input should be a valid integer"),
    "negative-size": (T2I, dict(json=OK | {"width": -16}), 400, "width must be positive, got -16"),
    "not-a-multiple": (T2I, dict(json=OK | {"height": 30}), 400, "height 30 is not a multiple of 8"),
    "negative-seed": (T2I, dict(json=OK | {"seed": -5}), 400, "seed must be"),
    "bad-cfg": (T2I, dict(json=OK | {"cfg_scale": 5000}), 400, "cfg_scale must be between 0 and 1000, got 5000"),
    "unknown-sampler": (T2I, dict(json=OK | {"sampler_name": "Euler z"}), 400, "sampler_name 'Euler z': not a sampler"),
    "unknown-scheduler": (T2I, dict(json=OK | {"scheduler": "polyexponential"}), 400, "scheduler 'polyexponential'"),
    "sampler-without-spacing": (T2I, dict(json=OK | {"sampler_name": "Euler a", "scheduler": "Karras"}), 400,
                                "scheduler karras: the euler-ancestral sampler has no choice of σ spacing"),
    "unknown-model": (T2I, dict(json=OK | {"override_settings": {"sd_model_checkpoint": "sd9"}}), 404,
                      "override_settings.sd_model_checkpoint 'sd9' is not one of this server's models: sd1, sd2"),
    "model-as-path": ("/sdapi/v1/options", dict(json={"sd_model_checkpoint": "/etc/passwd"}), 404,
                      "sd_model_checkpoint '/etc/passwd' is not one of this server's models"),
    "lora-as-path": (T2I, dict(json=OK | {"prompt": "x <lora:../../x:1>"}), 400,
                     "<lora:../../x>: no LoRA of that name (this server's LoRAs are: style)"),
    "lora-weight": (T2I, dict(json=OK | {"prompt": "x <lora:style:heavy>"}), 400, "the weight 'heavy' is not a number"),
    "init-image-path": (I2I, dict(json=OK | {"init_images": ["/etc/passwd"]}), 400, "init_images[0]: not base64"),
    "init-image-garbage": (I2I, dict(json=OK | {"init_images": [NOT_AN_IMAGE]}), 400, "init_images[0]: not an image"),
    "init-image-missing": (I2I, dict(json=OK), 400, "init_images: img2img needs one image"),
    "mask-garbage": (I2I, dict(json=OK | {"init_images": [_png64()], "mask": NOT_AN_IMAGE}), 400,
                     "mask: not an image"),
    "init-image-too-big": (I2I, dict(json=OK | {"init_images": [_png64((80, 80))]}), 400,
                           "init_images[0]: a 80x80 image is over this server's limit of 4096 pixels"),
    "too-many-pixels": (T2I, dict(json=OK | {"width": 128, "height": 64}), 400,
                        "width x height 128x64: over this server's limit of 4096 pixels (--max-pixels)"),
    "too-many-steps": (T2I, dict(json=OK | {"steps": 61}), 400, "steps 61: over this server's limit of 60"),
    "too-many-images": (T2I, dict(json=OK | {"batch_size": 3, "n_iter": 2}), 400,
                        "batch_size x n_iter 6: over this server's limit of 4 images"),
    "body-too-large": (T2I, dict(data=b"x" * (3 * 1024 * 1024), headers={"Content-Type": "application/json"}), 413,
                       "over this server's limit of 2097152 bytes (--max-body)"),
    "chunked-too-large": (T2I, dict(data=iter([b"x" * (1024 * 1024)] * 3),
                                    headers={"Content-Type": "application/json"}), 413, "over this server's limit of 2097152 bytes"),
    "png-info-garbage": ("/sdapi/v1/png-info", dict(json={"image": NOT_AN_IMAGE}), 400, "image: not an image"),
    "openai-size": (GEN, dict(json={"prompt": "x", "size": "big"}), 400, "size 'big': not WIDTHxHEIGHT"),
    "openai-n": (GEN, dict(json={"prompt": "x", "n": 0, "size": "32x32", "steps": 1}), 400, "n must be"),
    "openai-no-prompt": (GEN, dict(json={"size": "32x32"}), 400, "prompt: Field required"),
    "openai-model-path": (GEN, dict(json={"prompt": "x", "model": "../sd1"}), 404,
                          "model '../sd1' is not one of this server's models"),
    "openai-sampler": (GEN, dict(json={"prompt": "x", "sampler": "/bin/sh", "size": "32x32"}), 400,
                       "sampler_name '/bin/sh': not a sampler"),
    "openai-edit-garbage": ("/v1/images/edits", dict(files={"image": ("x.png", b"not a png", "image/png")},
                                                     data={"prompt": "x"}), 400, "image: not an image"),
}


def _logged(served, before: int, start: str) -> int:
    """How many log lines since line ``before`` start so (the line is written just after the answer is sent)."""
    import time

    deadline = time.monotonic() + 2
    while not any(line.startswith(start) for line in served.log[before:]) and time.monotonic() < deadline:
        time.sleep(0.01)
    return sum(line.startswith(start) for line in served.log[before:])


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_gets_one_line_and_the_server_serves_on(served, case):
    path, request, status, says = BAD[case]
    before = len(served.log)
    answer = served.post(path, **request)
    assert answer.status_code == status, answer.text
    body = answer.json()
    detail = body["error"]["message"] if path.startswith("/v1") else body["detail"]
    assert says in detail and "\n" not in detail and "Traceback" not in answer.text, detail
    assert _logged(served, before, f"POST {path} {status} ") == 1
    assert served.post(T2I, json=OK).status_code == 200


def test_an_unexpected_error_is_a_one_line_500(served, monkeypatch):
    def broken():
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(served.server.models, "loras", broken)
    answer = served.get("/sdapi/v1/loras")
    assert answer.status_code == 500
    assert answer.json() == {"detail": "unexpected RuntimeError: boom (a bug in sdcli serve)"}
    assert _logged(served, 0, "GET /sdapi/v1/loras 500 ") == 1
    monkeypatch.undo()
    assert served.get("/sdapi/v1/loras").status_code == 200
