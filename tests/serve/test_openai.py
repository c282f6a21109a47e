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


def test_a_non_editing_model_reworks_the_first_of_several_images(served):
    first, second = (Image.new("RGB", (32, 32), color) for color in ((30, 160, 40), (200, 20, 90)))
    client = served.openai()

    def edited(*images):
        answer = client.images.edit(image=[("p.png", _png(i), "image/png") for i in images], prompt="a red circle",
                                    size="32x32", extra_body={"seed": 5, "steps": 2, "strength": 0.5})
        return np.asarray(_image(answer.data[0]).convert("RGB"), np.int16)

    both = edited(first, second)
    assert np.array_equal(both, edited(first)) and not np.array_equal(both, edited(second))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Three pictures of different sizes (FLUX.2 takes reference sides of 64 pixels and more)."""
    folder = tmp_path_factory.mktemp("edit-pictures")
    paths = []
    for i, size in enumerate(((80, 64), (64, 72), (64, 64))):
        array = np.random.RandomState(i).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"picture{i}.png")
        paths.append(folder / f"picture{i}.png")
    return paths


def test_an_editing_model_edits_the_images_as_generate_does_with_reference_images(served_editing, pictures, cli,
                                                                                   tmp_path):
    # No size: the first image sets it, as without -W/-H; a preview (the page's) decodes at that size too.
    served_editing.server.worker.want_preview.set()
    answer = served_editing.openai().images.edit(
        image=[open(p, "rb") for p in pictures[:2]], prompt="make it blue", model="klein-distilled",
        extra_body={"seed": 7, "steps": 2})
    (path,) = paths_of(cli("generate", "--threads", "1", "make it blue", "--model",
                           served_editing.models["klein-distilled"], "--seed", "7", "--steps", "2",
                           "--reference-image", pictures[0], "--reference-image", pictures[1], "--out", tmp_path))
    image = _image(answer.data[0])
    assert image.size == Image.open(path).size
    assert np.array_equal(np.asarray(image.convert("RGB"), np.int16), pixels(path))
    record = json.loads(image.info["sdcli"])
    assert record["task"] == "edit" and len(record["reference_images"]) == 2


@pytest.mark.parametrize("model,count,extra,message", [
    ("kontext", 2, {}, "image: kontext edits 1 image a request, not 2"),
    ("klein-distilled", 11, {}, "image: klein-distilled edits at most 10 images a request, not 11"),
    ("klein-distilled", 1, {"strength": 0.5},
     "strength: klein-distilled edits its images as the prompt says, from noise; it takes no strength"),
])
def test_an_edit_an_editing_model_cannot_make_is_one_400(served_editing, pictures, model, count, extra, message):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        served_editing.openai().images.edit(image=[open(pictures[2], "rb") for _ in range(count)], prompt="x",
                                            model=model, extra_body={"seed": 1, "steps": 1, **extra})
    assert caught.value.status_code == 400 and caught.value.body["type"] == "invalid_request_error"
    assert caught.value.body["message"].startswith(message)
    assert caught.value.body["param"] == ("strength" if extra else "image")


@pytest.mark.parametrize("model", ["klein-distilled", "kontext"])
def test_a_mask_on_an_editing_model_inpaints_where_it_can(served_editing, pictures, model):
    import openai

    hole = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    ImageDraw.Draw(hole).rectangle((16, 16, 47, 47), fill=(0, 0, 0, 0))
    edit = dict(image=open(pictures[2], "rb"), mask=("mask.png", _png(hole), "image/png"), prompt="a red circle",
                model=model, size="32x32", extra_body={"seed": 1, "steps": 2, "strength": 0.9})
    if model == "kontext":  # diffusers' Kontext inpainting is not sdcli's: the engine's one line, as a 400
        with pytest.raises(openai.BadRequestError) as caught:
            served_editing.openai().images.edit(**edit)
        assert caught.value.body["message"].startswith("mask: FluxKontextPipeline is not inpainted by sdcli")
        assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["param"] == "mask"
        return
    record = json.loads(_image(served_editing.openai().images.edit(**edit).data[0]).info["sdcli"])
    assert record["task"] == "inpaint" and "reference_images" not in record


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
