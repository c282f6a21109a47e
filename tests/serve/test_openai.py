"""OpenAI's images API driven by the real `openai` client: generations pixel-equal to `sdcli generate`,
edits with a mask, the model list, and errors the client raises as it would OpenAI's."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from conftest import paths_of, pixels
from PIL import Image, ImageDraw


def _image(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_generations_make_what_sdcli_generate_makes(served, cli, tmp_path):
    answer = served.openai().images.generate(
        prompt="a blue square", n=2, size="32x24", response_format="b64_json",
        extra_body={"seed": 11, "steps": 2, "guidance": 6.5, "negative_prompt": "red", "sampler": "dpm++2m"})
    paths = paths_of(cli("generate", "--threads", "1", "a blue square", "-n", "red", "--model", served.models["sd1"], "--seed", "11",
                         "--num-images", "2", "--batch-size", "2", "--steps", "2", "-g", "6.5", "-W", "32", "-H", "24",
                         "--scheduler", "dpm++2m", "--out", tmp_path))
    assert len(answer.data) == len(paths) == 2
    for item, path in zip(answer.data, paths):
        image = _image(item)
        assert np.array_equal(np.asarray(image.convert("RGB"), np.int16), pixels(path))
        assert json.loads(image.info["sdcli"]) == json.loads(Image.open(path).info["sdcli"])


@pytest.mark.parametrize("how", ["mask", "transparent"])
def test_edits_repaint_where_the_mask_is_transparent(served, how):
    picture = Image.new("RGBA", (32, 32), (30, 160, 40, 255))
    hole = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    ImageDraw.Draw(hole).rectangle((8, 8, 23, 23), fill=(0, 0, 0, 0))  # OpenAI: transparent is what to repaint
    if how == "transparent":
        picture.putalpha(hole.getchannel("A"))
        files = dict(image=("picture.png", _png(picture), "image/png"))
    else:
        files = dict(image=("picture.png", _png(picture), "image/png"), mask=("mask.png", _png(hole), "image/png"))
    answer = served.openai().images.edit(**files, prompt="a red circle", n=1, size="32x32",
                                         extra_body={"seed": 5, "steps": 2, "strength": 0.9})
    image = _image(answer.data[0])
    record = json.loads(image.info["sdcli"])
    assert record["task"] == "inpaint" and record["seed"] == 5 and image.size == (32, 32)
    out = np.asarray(image.convert("RGB"), np.int16)
    assert np.abs(out[:2, :2] - (30, 160, 40)).max() <= 2  # kept (the feathered edge of the mask is 6 px away)
    assert np.abs(out[14:18, 14:18] - (30, 160, 40)).max() > 20  # repainted


def test_models_lists_the_servers_models(served):
    assert [m.id for m in served.openai().models.list().data] == ["sd1", "sd2"]


def test_errors_come_in_openais_shape(served):
    import openai

    client = served.openai()
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", size="32x32", extra_body={"steps": 2, "guidance": -1})
    assert caught.value.body["message"] == "guidance must be between 0 and 1000, got -1"
    assert caught.value.body["param"] == "guidance"
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(prompt="x", model="dall-e-3", size="32x32", extra_body={"steps": 1})
    assert caught.value.body["message"] == "model 'dall-e-3' is not one of this server's models: sd1, sd2"
    with pytest.raises(openai.BadRequestError, match="b64_json only"):
        client.images.generate(prompt="x", response_format="url", extra_body={"steps": 1})
    with pytest.raises(openai.AuthenticationError):
        type(client)(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
