"""Inpainting, outpainting, hires fix, --vae and --sigmas: each against plain diffusers where diffusers does the
same thing, and pixel checks where sdcli does more (the composite over the original)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from conftest import one_error_line, paths_of, pixels
from test_settings import assert_round_trip

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def tiny_inpaint(tmp_path_factory):
    """A tiny SD 1.x pipeline with a 9-channel inpainting UNet."""
    from sdcli.testing import INPAINT, save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("models") / INPAINT, INPAINT))


@pytest.fixture
def init(tmp_path) -> Path:
    """A 32x32 picture: a blue disc on red."""
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    ImageDraw.Draw(image).ellipse((4, 4, 20, 20), fill=(20, 20, 220))
    image.save(tmp_path / "init.png")
    return tmp_path / "init.png"


@pytest.fixture
def mask(tmp_path) -> Path:
    """White over the bottom-right quarter, drawn as a palette image with a grey edge (any mode is read)."""
    m = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(m).rectangle((16, 16, 31, 31), fill=255)
    m.putpixel((15, 15), 100)  # below 128: not part of the mask
    m.convert("P").save(tmp_path / "mask.png")
    return tmp_path / "mask.png"


def feathered(mask_path: Path, blur: int) -> Image.Image:
    """The mask as the test reads it: white from 128, blurred by a Gaussian of σ = blur."""
    m = Image.open(mask_path).convert("L").point(lambda v: 255 if v >= 128 else 0)
    return m.filter(ImageFilter.GaussianBlur(blur)) if blur else m


def record_of(path: Path) -> dict:
    return json.loads(Image.open(path).info["sdcli"])


def settings(model, **kw):
    from sdcli.generation import Settings

    return Settings(prompts=[PROMPT], model=model, steps=3, seeds=[1], **kw)


def run(s, monkeypatch=None, composite: bool = True):
    """Our images for settings ``s``, optionally as they are before the composite over the original."""
    from sdcli.generation import Engine, plan
    from sdcli.generation.tasks import Inpaint

    if not composite:
        monkeypatch.setattr(Inpaint, "finish", lambda self, prepared, images: images)
    p = plan(s, distributed=False)
    return [item.image for item in Engine.load(s).images(s, p.jobs)]


# Inpainting --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "inpaint", "sdxl"])
def test_inpainting_is_diffusers_inpainting_pipeline_before_the_composite(family, tiny_models, tiny_inpaint, init,
                                                                         mask, monkeypatch):
    import torch
    from diffusers import AutoPipelineForInpainting

    model = tiny_inpaint if family == "inpaint" else tiny_models[family]
    (ours,) = run(settings(model, init_image=str(init), mask=str(mask), mask_blur=2, strength=0.8), monkeypatch,
                  composite=False)
    pipe = AutoPipelineForInpainting.from_pretrained(model)
    assert pipe.unet.config.in_channels == (9 if family == "inpaint" else 4)
    theirs = pipe(PROMPT, image=Image.open(init), mask_image=feathered(mask, 2), strength=0.8, num_inference_steps=3,
                  width=32, height=32, generator=[torch.Generator("cpu").manual_seed(1)]).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    # Before the composite the VAE's round trip has touched the pixels the mask leaves alone.
    outside = np.asarray(feathered(mask, 2)) == 0
    assert np.abs(pixels_of(ours) - pixels(init))[outside].max() > 0


def pixels_of(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("blur", [0, 2])
def test_inpainting_keeps_every_pixel_outside_the_feathered_mask(cli, tiny_sd, init, mask, blur):
    (out,) = paths_of(cli("generate", PROMPT, "--model", tiny_sd, "--steps", "3", "--seed", "1", "--init-image", init,
                          "--mask", mask, "--mask-blur", blur, "--strength", "1"))
    ours, original, m = pixels(out), pixels(init), np.asarray(feathered(mask, blur))
    assert (ours[m == 0] == original[m == 0]).all()
    assert (m == 0).sum() > 32 * 32 / 2  # most of the picture is kept
    assert np.abs(ours - original)[m == 255].max() > 20  # and the masked area is repainted
    assert record_of(out)["task"] == "inpaint" and record_of(out)["mask_blur"] == blur


def test_the_9_channel_model_repaints_and_keeps_the_rest(cli, tiny_inpaint, init, mask):
    (out,) = paths_of(cli("generate", PROMPT, "--model", tiny_inpaint, "--steps", "2", "--seed", "1", "--init-image",
                          init, "--mask", mask))
    m = np.asarray(feathered(mask, 4))
    assert (pixels(out)[m == 0] == pixels(init)[m == 0]).all()
    assert np.abs(pixels(out) - pixels(init))[m == 255].max() > 0


# Outpainting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("blur", [0, 1])
def test_outpainting_grows_the_canvas_and_paints_only_the_border(cli, tiny_sd, init, blur):
    (out,) = paths_of(cli("generate", PROMPT, "--model", tiny_sd, "--steps", "3", "--seed", "1", "--init-image", init,
                          "--outpaint", "8,0,16,8", "--mask-blur", blur, "--strength", "1"))
    ours = pixels(out)
    assert ours.shape == (16 + 32 + 8, 8 + 32, 3)  # top + image + bottom, left + image
    border = Image.new("L", (40, 56), 255)
    border.paste(0, (8, 16, 40, 48))
    m = np.asarray(border.filter(ImageFilter.GaussianBlur(blur)) if blur else border)
    interior = np.zeros_like(m, dtype=bool)
    interior[16:48, 8:40] = True
    kept = (m == 0) & interior
    assert kept.sum() > (32 - 6 * blur) ** 2 / 2
    assert (ours[kept] == np.pad(pixels(init), ((16, 8), (8, 0), (0, 0)))[kept]).all()
    # The border is painted, not left as the repeated edge pixels it starts from.
    edge_filled = np.pad(pixels(init), ((16, 8), (8, 0), (0, 0)), mode="edge")
    assert np.abs(ours - edge_filled)[m == 255].max() > 20
    assert record_of(out)["outpaint"] == [8, 0, 16, 8]
    assert "Outpaint: L8 R0 T16 B8" in Image.open(out).info["parameters"]


# Hires fix ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("upscaler", ["lanczos", "latent"])
def test_hires_second_pass_is_diffusers_img2img_on_the_enlarged_first_pass(upscaler, tiny_sd):
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    (ours,) = run(settings(tiny_sd, width=16, height=24, hires_scale=2.0, hires_upscaler=upscaler, hires_steps=4))
    assert ours.size == (32, 48)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    seed = lambda: [torch.Generator("cpu").manual_seed(1)]  # noqa: E731 - the same seed for both passes
    common = dict(prompt=PROMPT, guidance_scale=7.5)
    if upscaler == "latent":
        first = pipe(**common, num_inference_steps=3, width=16, height=24, generator=seed(), output_type="latent")
        enlarged = torch.nn.functional.interpolate(first.images, size=(24, 16), mode="bilinear")
    else:
        first = pipe(**common, num_inference_steps=3, width=16, height=24, generator=seed())
        enlarged = first.images[0].resize((32, 48), Image.LANCZOS)
    second = StableDiffusionImg2ImgPipeline(**pipe.components)
    theirs = second(**common, image=enlarged, strength=0.5, num_inference_steps=4, generator=seed()).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


@pytest.mark.parametrize("steps,hires_steps", [(["--hires-steps", "3"], 3), ([], 2)])
def test_hires_is_recorded_as_automatic1111_writes_it(cli, tiny_sd, steps, hires_steps):
    # Without --hires-steps the second pass runs --steps: recorded so, not left out as if it had none.
    (out,) = paths_of(cli("generate", PROMPT, "--model", tiny_sd, "--steps", "2", "--seed", "1", "-W", "16", "-H", "16",
                          "--hires-scale", "1.5", *steps, "--hires-strength", "0.5"))
    assert Image.open(out).size == (24, 24)
    params = Image.open(out).info["parameters"]
    for text in ("Size: 16x16", "Hires upscale: 1.5", f"Hires steps: {hires_steps}", "Hires upscaler: Lanczos",
                 "Denoising strength: 0.5"):
        assert text in params
    assert json.loads(Image.open(out).info["sdcli"])["hires_steps"] == hires_steps


# --vae and --sigmas ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A VAE folder with other random weights than the tiny pipelines' (and one of 8 latent channels)."""
    import torch
    from diffusers import AutoencoderKL

    from sdcli.testing import _vae

    root = tmp_path_factory.mktemp("vaes")
    torch.manual_seed(7)
    _vae().save_pretrained(root / "vae", safe_serialization=True)
    config = dict(AutoencoderKL.load_config(str(root / "vae")), latent_channels=8)
    AutoencoderKL.from_config(config).save_pretrained(root / "vae8", safe_serialization=True)
    return root


def test_vae_replaces_the_models_vae(cli, tiny_sd, other_vae):
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    common = ("generate", PROMPT, "--model", tiny_sd, "--steps", "2", "--seed", "1")
    (plain,) = paths_of(cli(*common, "--out", "plain.png"))
    (swapped,) = paths_of(cli(*common, "--vae", other_vae / "vae", "--out", "swapped.png"))
    (own,) = paths_of(cli(*common, "--vae", tiny_sd, "--out", "own.png"))  # a pipeline folder: its vae/
    assert np.abs(pixels(plain) - pixels(swapped)).max() > 0
    assert np.array_equal(pixels(plain), pixels(own))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, vae=AutoencoderKL.from_pretrained(other_vae / "vae"))
    theirs = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert np.array_equal(pixels(swapped), pixels_of(theirs))
    assert "VAE: vae," in Image.open(swapped).info["parameters"]


def test_a_vae_of_another_latent_size_is_refused(cli, tiny_sd, other_vae):
    line = one_error_line(cli("generate", PROMPT, "--model", tiny_sd, "--steps", "2", "--vae", other_vae / "vae8",
                              "--out", "o"))
    assert "latents have 8 channels but this model's have 4" in line
    assert not any(Path("o").iterdir())


@pytest.mark.parametrize("sigmas,flag", [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas")])
def test_sigmas_are_diffusers_sigma_spacing(sigmas, flag, cli, tiny_sd):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    (out,) = paths_of(cli("generate", PROMPT, "--model", tiny_sd, "--steps", "3", "--seed", "1", "-s", "euler",
                          "--sigmas", sigmas))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, **{flag: True})
    theirs = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(1)).images[0]
    assert np.array_equal(pixels(out), pixels_of(theirs))
    (default,) = paths_of(cli("generate", PROMPT, "--model", tiny_sd, "--steps", "3", "--seed", "1", "-s", "euler"))
    assert np.abs(pixels(out) - pixels(default)).max() > 0
    assert f"Schedule type: {sigmas.capitalize()}" in Image.open(out).info["parameters"]


def test_sigmas_replace_a_karras_samplers_own_spacing():
    from sdcli.schedule.samplers import make_scheduler
    from sdcli.testing import build_tiny_pipeline

    config = build_tiny_pipeline("sd1").scheduler.config
    sched = make_scheduler("dpm++2m-karras", config, sigmas="exponential")
    assert sched.config.use_exponential_sigmas and not sched.config.use_karras_sigmas


# Bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,expected", [
    (["--init-image", "init.png", "--mask", "wide.png"], "another aspect ratio than the 32x32 init image"),
    (["--init-image", "init.png", "--mask", "black.png"], "all black: nothing to repaint"),
    (["--mask", "mask.png"], "--mask needs --init-image"),
    (["--mask", "mask.png", "--hires-scale", "2"], "--mask needs --init-image"),
    (["--outpaint", "8,8,0,0"], "--outpaint needs --init-image"),
    (["--init-image", "init.png", "--mask", "mask.png", "--outpaint", "8,8,0,0"], "--mask or --outpaint, not both"),
    (["--init-image", "init.png", "--outpaint", "4,0,0,0"], "4 is not a multiple of 8"),
    (["--init-image", "init.png", "--outpaint", "0,0,0,0"], "adds nothing"),
    (["--init-image", "init.png", "--outpaint", "8,8"], "four whole numbers"),
    (["--init-image", "init.png", "--mask", "mask.png", "--mask-blur", "-1"], "--mask-blur must not be negative, got -1"),
    (["--hires-scale", "1"], "--hires-scale must be greater than 1 and at most 8, got 1"),
    (["--hires-scale", "0.5"], "--hires-scale must be greater than 1 and at most 8, got 0.5"),
    (["--hires-scale", "3", "-W", "2048", "-H", "1024"], "width 2048 to 6144 pixels, past the 4096-pixel limit"),
    (["--hires-scale", "2", "--hires-strength", "0.1", "--steps", "4"], "leaves no denoising step"),
    (["--hires-scale", "2", "--init-image", "init.png"], "does not combine with --init-image"),
    (["--sigmas", "karras", "-s", "ddim"], "the ddim sampler has no choice of σ spacing"),
    (["--sigmas", "beta"], "the pndm sampler has no choice of σ spacing"),  # the tiny model's own PLMS
])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(cli, tiny_sd, init, mask, args, expected):
    Image.open(init).save("init.png")
    Image.open(mask).save("mask.png")
    Image.new("L", (32, 16), 255).save("wide.png")
    Image.new("RGBA", (32, 32), (0, 0, 0, 255)).save("black.png")
    result = cli("generate", PROMPT, "--model", tiny_sd, "--steps", "2", "--out", "o", *args)
    assert expected in one_error_line(result)
    assert not Path("o").exists() or not any(Path("o").iterdir())


# Records and replay ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--init-image", "{init}", "--mask", "{mask}", "--mask-blur", "2", "--strength", "0.9"],
    ["--init-image", "{init}", "--outpaint", "0,8,8,0"],
    ["-W", "16", "-H", "16", "--hires-scale", "2", "--hires-strength", "0.6", "--hires-steps", "3"],
    ["-W", "16", "-H", "16", "--hires-scale", "1.5", "--hires-upscaler", "latent"],
    ["-s", "dpm++2m", "--sigmas", "karras", "--vae", "{vae}"],
], ids=["inpaint", "outpaint", "hires", "hires-latent", "sigmas-vae"])
def test_each_mode_round_trips(args, cli, tiny_sd, init, mask, other_vae, tmp_path):
    args = [a.format(init=init, mask=mask, vae=other_vae / "vae") for a in args]
    (image,) = paths_of(cli("generate", PROMPT, "--model", tiny_sd, "--steps", "3", "--seed", "2", *args,
                            "--out", tmp_path / "a"))
    assert_round_trip(cli, image, tmp_path)


def test_a_changed_mask_or_init_image_is_refused_at_replay(cli, tiny_sd, init, mask, tmp_path):
    (image,) = paths_of(cli("generate", PROMPT, "--model", tiny_sd, "--steps", "2", "--seed", "1", "--init-image",
                            init, "--mask", mask, "--out", tmp_path / "a"))
    record = record_of(image)
    assert record["mask"]["path"] == str(mask.resolve()) and len(record["mask"]["sha256"]) == 64
    assert record["init_image"]["path"] == str(init.resolve())
    original = mask.read_bytes()
    Image.new("L", (32, 32), 255).save(mask)
    line = one_error_line(cli("generate", "--from-metadata", image, "--out", tmp_path / "b"))
    assert f"--mask {mask.resolve()} has changed since the image was made" in line
    mask.write_bytes(original)
    init.unlink()
    assert "--init-image" in one_error_line(cli("generate", "--from-metadata", image, "--out", tmp_path / "b"))
    assert not (tmp_path / "b").exists()


# Images given in memory (from Python) -------------------------------------------------------------


def in_memory(path: Path, mode: str) -> Image.Image:
    """The picture at ``path`` as a Python caller hands it over: a PIL image, in another mode than the file's."""
    return Image.open(path).convert(mode)


def made(s) -> list:
    from sdcli.generation import Engine, plan

    p = plan(s, distributed=False)  # the memory estimate reads the init image's size too
    return list(Engine.load(s).images(s, p.jobs))


@pytest.mark.parametrize("task,kw", [
    ("img2img", {"strength": 0.7}),
    ("inpaint", {"mask": "MASK", "mask_blur": 2}),
    ("outpaint", {"outpaint": [8, 0, 0, 8]}),
])
def test_an_init_image_or_mask_in_memory_gives_the_image_its_file_gives(tiny_sd, init, mask, task, kw):
    from sdcli.images import open_image, pixels_sha256

    (by_path,) = made(settings(tiny_sd, init_image=str(init), **{k: str(mask) if v == "MASK" else v
                                                                 for k, v in kw.items()}))
    given = in_memory(init, "RGBA")  # opaque RGBA: flattened onto white, the same pixels
    (by_image,) = made(settings(tiny_sd, init_image=given, **{k: in_memory(mask, "L") if v == "MASK" else v
                                                             for k, v in kw.items()}))
    assert by_image.record["task"] == task
    assert np.array_equal(np.asarray(by_image.image), np.asarray(by_path.image))
    # Recorded by what it held, not where it was (it was nowhere): JSON all the same.
    assert by_image.record["init_image"] == {"path": None, "sha256": pixels_sha256(open_image(init)), "size": [32, 32]}
    assert by_path.record["init_image"]["path"] == str(init.resolve())
    if task == "inpaint":
        assert by_image.record["mask"]["path"] is None and by_image.record["mask"]["sha256"] != \
            by_image.record["init_image"]["sha256"]
    json.loads(json.dumps(by_image.record, allow_nan=False))
    from sdcli.generation.metadata import a1111_parameters

    assert "None" not in a1111_parameters(by_image.record) and "null" not in a1111_parameters(by_image.record)


@pytest.mark.parametrize("name,flag", [("init_image", "--init-image"), ("mask", "--mask")])
def test_a_record_of_an_image_in_memory_replays_only_with_the_file_given(cli, tiny_sd, init, mask, tmp_path, name,
                                                                         flag):
    from sdcli.commands.generate import run_generate

    files = {"init_image": init, "mask": mask}
    given = {key: in_memory(path, "RGB") if key == name else str(path) for key, path in files.items()}
    (image,) = run_generate(settings(tiny_sd, **given), out=tmp_path / "a.png", quiet=True)
    line = one_error_line(cli("generate", "--from-metadata", image, "--out", tmp_path / "b.png"), 1)
    assert line == (f"error: {flag}: the image was made from an image given in memory, not a file; pass {flag} to "
                    "remake it")
    assert not (tmp_path / "b.png").exists()
    (again,) = paths_of(cli("generate", "--from-metadata", image, flag, files[name], "--out", tmp_path / "c.png"))
    assert np.array_equal(pixels(again), pixels(image))
    assert record_of(again)[name]["path"] == str(files[name].resolve())


# Every mode with sweeps, contact sheets, trajectories and batches ----------------------------------


@pytest.mark.parametrize("mode", ["inpaint", "hires"])
def test_a_sweep_in_batches_with_trajectories(mode, cli, tiny_sd, init, mask, tmp_path):
    if mode == "inpaint":
        extra = ["--init-image", init, "--mask", mask]
    else:
        extra = ["-W", "16", "-H", "16", "--hires-scale", "2"]
    common = ("generate", PROMPT, "--model", tiny_sd, "--steps", "2", "-g", "3,7", "--seed", "1,2", *extra)
    made = paths_of(cli(*common, "--batch-size", "2", "--save-trajectory", "--out", tmp_path / "batched"))
    images = [p for p in made if p.name.endswith(("-g3.png", "-g7.png"))]
    assert len(images) == 4 and {record_of(p)["task"] for p in images} == {mode}
    assert len([p for p in made if "sheet" in p.name]) == 1
    strips = [p for p in made if p.name.endswith("-trajectory.gif")]
    assert len(strips) == 4 and Image.open(strips[0]).size == Image.open(images[0]).size == (32, 32)
    one_by_one = paths_of(cli(*common, "--out", tmp_path / "single"))
    for a, b in zip(images, [p for p in one_by_one if "sheet" not in p.name]):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
        if mode == "inpaint":
            m = np.asarray(feathered(mask, 4))
            assert (pixels(a)[m == 0] == pixels(init)[m == 0]).all()
