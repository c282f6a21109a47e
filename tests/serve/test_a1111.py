"""AUTOMATIC1111's API driven by the real `webuiapi` client: the same images `sdcli generate` makes, models,
options, progress with a live x̂0 preview, and interrupt."""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest
from conftest import paths_of, pixels
from PIL import Image, ImageDraw


def _rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# Each: the A1111 request's fields, and the `sdcli generate` flags that ask for the same images.
SAME = {
    "euler-a": (dict(sampler_name="Euler a", scheduler="automatic"), ["--scheduler", "euler-ancestral"]),
    "dpm-karras-batch": (dict(sampler_name="DPM++ 2M", scheduler="Karras", batch_size=2),
                         ["--scheduler", "dpm++2m-karras", "--num-images", "2", "--batch-size", "2"]),
    "old-name-lora": (dict(sampler_name="DPM++ 2M Karras", prompt="a red circle <lora:style:0.8>"),
                      ["--scheduler", "dpm++2m-karras", "--lora", "{lora}:0.8"]),
}


@pytest.mark.parametrize("case", SAME)
def test_txt2img_makes_what_sdcli_generate_makes(served, lora_dir, cli, tmp_path, case):
    fields, flags = SAME[case]
    request = dict(prompt="a red circle", negative_prompt="blue", seed=7, steps=2, cfg_scale=5.0, width=32,
                   height=24) | fields
    result = served.webui().txt2img(**request)
    flags = [f.format(lora=lora_dir / served.lora) for f in flags]
    paths = paths_of(cli("generate", "--threads", "1", "a red circle", "-n", "blue", "--model", served.models["sd1"], "--seed", "7",
                         "--steps", "2", "-g", "5", "-W", "32", "-H", "24", *flags, "--out", tmp_path))
    assert len(result.images) == len(paths)
    for image, path in zip(result.images, paths):
        assert np.array_equal(_rgb(image), pixels(path))
        written = Image.open(path).info
        assert image.info["parameters"] == written["parameters"]
        assert json.loads(image.info["sdcli"]) == json.loads(written["sdcli"])
    assert result.info["all_seeds"] == [7, 8][: len(paths)]
    assert result.info["infotexts"] == [image.info["parameters"] for image in result.images]


def test_img2img_with_a_mask_repaints_only_the_mask(served, cli, tmp_path):
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 23, 23), fill=255)
    result = served.webui().img2img(images=[init], mask_image=mask, mask_blur=0, prompt="a blue square", seed=3,
                                    steps=2, cfg_scale=7.5, width=32, height=32, denoising_strength=0.9,
                                    sampler_name="Euler")
    (image,) = result.images
    record = json.loads(image.info["sdcli"])
    assert record["task"] == "inpaint" and image.size == (32, 32)
    out = _rgb(image)
    assert (out[:6, :6] == (200, 30, 30)).all()  # outside the mask: the init image
    assert not (out[12:20, 12:20] == (200, 30, 30)).all()
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    (path,) = paths_of(cli("generate", "--threads", "1", "a blue square", "--model", served.models["sd1"], "--init-image",
                           tmp_path / "init.png", "--mask", tmp_path / "mask.png", "--mask-blur", "0", "--strength",
                           "0.9", "--seed", "3", "--steps", "2", "-g", "7.5", "-W", "32", "-H", "32", "--scheduler",
                           "euler", "--out", tmp_path / "out"))
    assert np.array_equal(out, pixels(path))


def test_models_options_and_switching(on_first_model):
    import gc
    import weakref

    served = on_first_model
    api = served.webui()
    assert [m["title"] for m in api.get_sd_models()] == ["sd1", "sd2"]
    assert api.util_get_current_model() == "sd1"
    old = weakref.ref(served.server.models.engine.pipe)
    api.set_options({"sd_model_checkpoint": "sd2"})
    assert api.util_get_current_model() == "sd2"
    gc.collect()
    assert old() is None  # the first model's pipeline was freed: never two loaded at once
    (image,) = api.txt2img(prompt="a red circle", seed=1, steps=1, width=32, height=32).images
    assert json.loads(image.info["sdcli"])["model"] == served.models["sd2"]


@pytest.mark.parametrize("restore", [True, False])
def test_a_model_named_in_override_settings_is_unloaded_after_the_request_unless_asked_to_stay(on_first_model,
                                                                                               restore):
    # AUTOMATIC1111 restores what override_settings changed once the request is done, unless
    # override_settings_restore_afterwards is false (true by default, as webuiapi sends it).
    api = on_first_model.webui()
    assert api.util_get_current_model() == "sd1"
    (image,) = api.txt2img(prompt="a red circle", seed=1, steps=1, width=32, height=32,
                           override_settings={"sd_model_checkpoint": "sd2"},
                           override_settings_restore_afterwards=restore).images
    assert json.loads(image.info["sdcli"])["model"] == on_first_model.models["sd2"]
    assert api.util_get_current_model() == ("sd1" if restore else "sd2")


def test_listings_name_samplers_schedulers_and_loras(served):
    api = served.webui()
    samplers = [s["name"] for s in api.get_samplers()]
    assert {"Euler a", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert [s["name"] for s in served.get("/sdapi/v1/schedulers").json()] == [
        "automatic", "karras", "exponential", "beta", "normal", "simple", "sgm_uniform", "ddim"]
    assert [lo["name"] for lo in api.get_loras()] == [served.lora]


def test_progress_shows_the_denoising_live_and_interrupt_stops_it(served):
    api = served.webui()
    answer = {}
    run = threading.Thread(target=lambda: answer.update(result=api.txt2img(
        prompt="a red circle", seed=1, steps=60, n_iter=4, width=32, height=32)))
    t0 = time.monotonic()
    run.start()
    seen = None
    while time.monotonic() - t0 < 30:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 2 and progress["current_image"]:
            seen = progress
            break
        time.sleep(0.05)
    assert seen is not None, "no preview while denoising"
    assert 0 < seen["progress"] < 1 and seen["state"]["sampling_steps"] == 240 and seen["eta_relative"] > 0
    # What the preview shows, in sdcli's words: its image's step and noise level (PNDM keeps ᾱ's: σ from them).
    step, sigma = re.fullmatch(r"x̂0 at step (\d+)/60, σ (\d+(?:\.\d+)?)", seen["textinfo"]).groups()
    assert int(step) >= 1 and 0 < float(sigma) < 200
    preview = Image.open(__import__("io").BytesIO(__import__("base64").b64decode(seen["current_image"])))
    assert preview.size == (32, 32)
    api.interrupt()
    run.join(30)
    result = answer["result"]
    assert result.info["interrupted"] is True and len(result.images) < 4
    assert api.get_progress()["state"]["job"] == ""
    # The next request runs whole.
    assert len(api.txt2img(prompt="a red circle", seed=1, steps=1, width=32, height=32).images) == 1


def _editing_webui(served_editing):
    import webuiapi

    from serve.fixtures import KEY

    # A server with only an API key takes it as the basic-auth password, under any user name.
    return webuiapi.WebUIApi(host=served_editing.host, port=served_editing.port, username="forge", password=KEY)


@pytest.fixture(scope="module")
def edit_pictures(tmp_path_factory):
    """Two pictures to edit, of different sizes (FLUX.2 takes reference sides of 64 pixels and more)."""
    folder = tmp_path_factory.mktemp("img2img-edits")
    paths = []
    for i, size in enumerate(((80, 64), (64, 72))):
        array = np.random.RandomState(10 + i).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"picture{i}.png")
        paths.append(folder / f"picture{i}.png")
    return paths


# Each: the model, how many images it edits, and its fields (Forge users set CFG 1 on FLUX.1; Klein-distilled
# has no guidance input, so webuiapi's cfg_scale=7, sent unasked, is ignored and said so).
EDITING = {"klein-distilled": (2, {}), "kontext": (1, {"cfg_scale": 1.0})}


@pytest.mark.parametrize("model", EDITING)
def test_img2img_on_an_editing_model_edits_the_init_images_as_generate_does_with_reference_images(
        served_editing, edit_pictures, cli, tmp_path, model):
    # As Forge runs FLUX.1 Kontext from img2img: the init images, in order, are what the prompt edits.
    # webuiapi sends denoising_strength=0.75 unasked: ignored (the edit starts from noise), and said so.
    count, fields = EDITING[model]
    pictures = edit_pictures[:count]
    result = _editing_webui(served_editing).img2img(
        images=[Image.open(p) for p in pictures], prompt="make it blue", seed=7, steps=2, width=64, height=48,
        sampler_name="Automatic", override_settings={"sd_model_checkpoint": model}, **fields)
    references = [arg for p in pictures for arg in ("--reference-image", p)]
    (path,) = paths_of(cli("generate", "--threads", "1", "make it blue", "--model", served_editing.models[model],
                           "--seed", "7", "--steps", "2", "-W", "64", "-H", "48", *references, "--out", tmp_path))
    (image,) = result.images
    assert np.array_equal(_rgb(image), pixels(path))
    record = json.loads(image.info["sdcli"])
    assert record["task"] == "edit" and len(record["reference_images"]) == count and "strength" not in record
    assert f"denoising_strength ignored: {model} edits init_images" in result.info["comments"]
    assert ("cfg_scale ignored" in result.info["comments"]) == (model == "klein-distilled")
    assert result.info["denoising_strength"] is None


@pytest.mark.parametrize("how,message", [
    ("two images", "init_images: kontext edits 1 image a request, not 2"),
    ("a mask", "mask: FluxKontextPipeline is not inpainted by sdcli"),
])
def test_an_img2img_kontext_cannot_make_is_one_error_in_a1111s_shape(served_editing, edit_pictures, how, message):
    picture = Image.open(edit_pictures[0])
    request = dict(images=[picture, picture], prompt="x", seed=1, steps=2, cfg_scale=1.0, width=64, height=64,
                   override_settings={"sd_model_checkpoint": "kontext"})
    if how == "a mask":
        request.update(images=[picture], mask_image=Image.new("L", picture.size, 255))
    with pytest.raises(RuntimeError) as caught:  # webuiapi raises an error answer so: (status, body)
        _editing_webui(served_editing).img2img(**request)
    status, body = caught.value.args
    detail = json.loads(body)["detail"]
    assert status == 400 and detail.startswith(message) and "\n" not in detail
    assert "--" not in detail  # worded in A1111's field names, not sdcli's flags


def _post_editing(served_editing, path, **request):
    import requests

    from serve.fixtures import KEY

    return requests.post(f"{served_editing.url}/sdapi/v1/{path}", json=request, auth=("forge", KEY), timeout=60)


# Each: the A1111 route, the model, and the --distilled-guidance `sdcli generate` gets for distilled_cfg_scale 5
# (none: the model has no distilled guidance, so the field is ignored and said so).
DISTILLED = [("img2img", "kontext", "5"), ("txt2img", "kontext", "5"), ("txt2img", "klein-distilled", None)]


@pytest.mark.parametrize("path,model,flag", DISTILLED)
def test_forges_distilled_cfg_scale_is_the_distilled_guidance(served_editing, edit_pictures, cli, tmp_path,
                                                              path, model, flag):
    # Forge's field for Flux's guidance input (what its users set; cfg_scale stays 1). 5, not Kontext's 2.5
    # default, so that a server ignoring the field makes another picture.
    import base64
    import io

    request = dict(prompt="make it blue", seed=7, steps=2, cfg_scale=1, distilled_cfg_scale=5, width=64, height=48,
                   override_settings={"sd_model_checkpoint": model})
    references = []
    if path == "img2img":
        request["init_images"] = [base64.b64encode(edit_pictures[0].read_bytes()).decode()]
        references = ["--reference-image", edit_pictures[0]]
    answer = _post_editing(served_editing, path, **request)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    flags = ["--distilled-guidance", flag] if flag else []
    (out,) = paths_of(cli("generate", "--threads", "1", "make it blue", "--model", served_editing.models[model],
                          "--seed", "7", "--steps", "2", "-W", "64", "-H", "48", *references, *flags,
                          "--out", tmp_path))
    (image,) = result["images"]
    assert np.array_equal(_rgb(Image.open(io.BytesIO(base64.b64decode(image)))), pixels(out))
    info = json.loads(result["info"])
    assert info["distilled_cfg_scale"] == (float(flag) if flag else None)
    assert ("distilled_cfg_scale ignored" in info["comments"]) == (flag is None)


@pytest.mark.parametrize("path,fields,message", [
    ("txt2img", dict(cfg_scale=7), "cfg_scale 7: kontext's guidance is distilled; send cfg_scale 1 and set its "
                                   "guidance with distilled_cfg_scale"),
    ("img2img", dict(cfg_scale=7), "cfg_scale 7: kontext's guidance is distilled"),
    ("txt2img", dict(cfg_scale=1, distilled_cfg_scale=-1), "distilled_cfg_scale"),
])
def test_a_distilled_models_guidance_is_refused_in_a1111s_field_names(served_editing, edit_pictures, path, fields,
                                                                       message):
    # webuiapi sends cfg_scale 7 unasked: the refusal says which fields to send instead, not sdcli's CLI flags.
    import base64

    request = dict(prompt="x", seed=1, steps=2, width=64, height=64, **fields,
                   override_settings={"sd_model_checkpoint": "kontext"})
    if path == "img2img":
        request["init_images"] = [base64.b64encode(edit_pictures[0].read_bytes()).decode()]
    answer = _post_editing(served_editing, path, **request)
    detail = answer.json()["detail"]
    assert answer.status_code in (400, 422) and detail.startswith(message) and "\n" not in detail
    assert "cfg_scale" in detail and "--" not in detail
