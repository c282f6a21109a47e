"""Model families (`sdcli.families`): each claims its own diffusers pipelines and no other's, the settings each
ignores are refused before its weights load, and nothing outside the families tests a class or family name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from PIL import Image

from conftest import one_error_line
from newflow import new_flow_model  # noqa: F401 - the fixture of the Chroma, Z-Image and Qwen-Image models
from sdcli.families import BY_NAME, FAMILIES, claimed_by, family_spec


# 1. Which family claims which pipeline class ---------------------------------------------------------------


def _diffusers_pipelines() -> list[tuple[str, str]]:
    """(diffusers' model key, pipeline class name) of every task table AutoPipeline has: the key says which model
    a class runs (stable-diffusion-xl-controlnet, flux-kontext, flux2, ...), independently of its class name."""
    from diffusers.pipelines import auto_pipeline

    return sorted({(key, cls.__name__) for table in auto_pipeline.SUPPORTED_TASKS_MAPPINGS
                   for key, cls in table.items()})


def _expected_family(key: str) -> str | None:
    for prefix, family in (("stable-diffusion-xl", "sdxl"), ("stable-diffusion-3", "sd3"),
                           ("stable-diffusion", "sd"), ("flux2", "flux2"), ("flux", "flux"), ("chroma", "chroma"),
                           ("z-image", "zimage"), ("qwenimage", "qwenimage")):
        if key == prefix or key.startswith(prefix + "-"):
            return family
    return None  # qwenimage21, stable-audio, stable cascade, ...: no family of sdcli's


@pytest.mark.parametrize("key,class_name", _diffusers_pipelines(), ids=lambda v: v)
def test_each_diffusers_pipeline_is_claimed_by_its_own_family_only(key, class_name):
    expected = _expected_family(key)
    claimants = [f.name for f in FAMILIES if f.claims(class_name)]
    assert claimed_by(class_name) is (None if expected is None else next(f for f in FAMILIES if f.name == expected))
    # A family's prefix may also match a more specific family's classes (StableDiffusion ⊂ StableDiffusionXL):
    # the registry's order puts the specific one first, so the claim above is the one that counts.
    assert claimants[:1] == ([expected] if expected else [])


def test_every_family_claims_some_diffusers_pipeline_and_names_its_records():
    claimed = {claimed_by(name) for _key, name in _diffusers_pipelines()}
    assert set(FAMILIES) <= claimed
    assert set(BY_NAME) == {"sd1", "sd2", "sdxl", "sd3", "flux", "flux2", "flux2-klein", "chroma", "zimage", "qwenimage"}
    assert family_spec(None).name == "sd"  # a single-file checkpoint is taken for SD until it loads


# 2. What each family ignores is refused before loading ----------------------------------------------------------

# How a user asks for each setting some family ignores (several ways where there are several).
EXAMPLES = {
    "--clip-skip": [["--clip-skip", "2"]],
    "--prompt-syntax a1111": [["--prompt-syntax", "a1111", "--", "a (red:1.4) circle"], ["--", "a red BREAK circle"],
                              ["--", "a (red) circle"], ["--", "a \\(red\\) circle"]],
    "--embedding": [["--embedding", "EMBEDDING"]],
    "--scheduler": [["-s", "ddim"], ["-s", "euler"], ["-s", "dpm++2m-karras"]],
    "--timestep-spacing": [["--timestep-spacing", "trailing"]],
    "--hires-upscaler latent": [["--hires-scale", "2", "--hires-upscaler", "latent"]],
    "--guidance-rescale": [["--guidance-rescale", "0.5"]],
    "--true-cfg": [["--true-cfg", "-g", "3"]],
    "--distilled-guidance": [["--distilled-guidance", "2"]],
    "--mask": [["--init-image", "IMAGE", "--mask", "IMAGE"]],
    "--outpaint": [["--init-image", "IMAGE", "--outpaint", "8,8,8,8"]],
    "--init-image": [["--init-image", "IMAGE"], ["--init-image", "IMAGE", "--strength", "0.5"]],
    "--hires-scale": [["--hires-scale", "2"]],
}
# What each family ignores, written out here (not read from the families) so that a rule dropped from a
# family's list fails below: sdcli's prompt encoder and samplers do nothing on the flow-matching families.
FLOW = {"--clip-skip", "--prompt-syntax a1111", "--embedding", "--scheduler", "--timestep-spacing",
        "--guidance-rescale"}
# Chroma, Z-Image and Qwen-Image guide through their own argument; sdcli does not enlarge their latents.
OWN = FLOW | {"--true-cfg", "--distilled-guidance", "--hires-upscaler latent"}
# FLUX.2's --init-image (img2img on both models, inpainting on FLUX.2-dev) depends on the model: its ``check``.
IGNORED = {"sd": set(), "sdxl": set(), "sd3": FLOW, "flux": FLOW | {"--hires-upscaler latent"},
           "flux2": FLOW | {"--true-cfg", "--hires-scale"}, "chroma": OWN, "zimage": OWN,
           "qwenimage": OWN}
# A tiny model of each family (flux twice: with a guidance input, and schnell-like without; FLUX.2-dev and Klein).
MODELS = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "flux-schnell": "flux",
          "flux2": "flux2", "klein": "flux2", "chroma": "chroma", "zimage": "zimage", "qwenimage": "qwenimage"}
FIXTURES = {"sd": "tiny_models", "sdxl": "tiny_models", "sd3": "tiny_flow_models", "flux": "tiny_flow_models",
            "flux2": "tiny_flux2_models"}
CASES = [(model, flag, args) for model, family in MODELS.items() for flag in sorted(IGNORED[family])
         for args in EXAMPLES[flag]]


def test_each_family_lists_the_settings_it_ignores():
    assert {f.name: {rule.flag for rule in f.ignores} for f in FAMILIES} == IGNORED
    assert set(MODELS.values()) == set(IGNORED) and set(EXAMPLES) >= set().union(*IGNORED.values())


@pytest.mark.parametrize("model,flag,args", CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_setting_its_family_ignores_is_refused_in_one_line_before_loading(cli, request, tmp_path,
                                                                            no_pipeline_loads, model, flag, args):
    if MODELS[model] in FIXTURES:
        path = request.getfixturevalue(FIXTURES[MODELS[model]])[model]
    else:
        path = request.getfixturevalue("new_flow_model")(model)
    (tmp_path / "emb.safetensors").write_bytes(b"")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "white.png")
    files = {"EMBEDDING": tmp_path / "emb.safetensors", "IMAGE": tmp_path / "white.png"}
    args = [str(files[a]) if a in files else a for a in args]
    prompt = [] if "--" in args else ["a red circle"]
    result = cli("generate", *prompt, "--model", path, "--steps", "2", "-W", "16", "-H", "16", "--out",
                 tmp_path / "o.png", *args)
    assert one_error_line(result, 2).startswith(f"error: {flag}: ")
    assert no_pipeline_loads == [] and not (tmp_path / "o.png").exists()


# 3. Nothing outside the families tests a class or family name ------------------------------------------------

SOURCE = Path(__file__).resolve().parents[2] / "sdcli"
OUTSIDE = [p for p in sorted(SOURCE.rglob("*.py"))
           if SOURCE / "families" not in p.parents and p.name != "testing.py"]  # testing.py builds each family
NAMES = {name for family in FAMILIES for name in (family.name, *family.variants)}


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """The string literals of a module, its docstrings aside."""
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


@pytest.mark.parametrize("path", OUTSIDE, ids=lambda p: str(p.relative_to(SOURCE)))
def test_no_module_outside_the_families_tests_a_class_or_family_name(path):
    """A class name test is a literal that starts as a family's class prefix and goes on as a name or a regex
    ("StableDiffusionXL", "FluxPipeline", r"StableDiffusion(?!3)[A-Z]"); prose ("Flux-dev: ...") is not. A family
    name test compares with one of the names records give models ("sdxl", "sd1")."""
    tree = ast.parse(path.read_text())
    prefixes = {prefix for family in FAMILIES for prefix in family.pipelines}
    for node in _code_strings(tree):
        for prefix in prefixes:
            assert not re.match(rf"\^?{prefix}(?:[\w\[(?]|$)", node.value), (
                f"line {node.lineno}: {node.value!r} tests a class name; ask the family (sdcli.families)")
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            compared = [c for side in (node.left, *node.comparators) for c in ast.walk(side)
                        if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            named = [c.value for c in compared if c.value in NAMES]
            assert not named, f"line {node.lineno}: compares with {named[0]!r}; ask the family (sdcli.families)"


# 4. Inpainting and outpainting through each new family's own diffusers pipeline ----------------------------------

# Each model's inpainting pipeline, and what plain diffusers is given for sdcli's defaults (the model cards' guidance;
# Qwen-Image guides against the card's " " where no negative prompt is given).
INPAINTERS = {
    "chroma": ("ChromaInpaintPipeline", {"guidance_scale": 3.0}),
    "zimage": ("ZImageInpaintPipeline", {"guidance_scale": 4.0}),
    "qwenimage": ("QwenImageInpaintPipeline", {"true_cfg_scale": 4.0, "negative_prompt": " "}),
    "klein": ("Flux2KleinInpaintPipeline", {"guidance_scale": 4.0}),
}


def _tiny(request, model: str) -> str:
    if model in ("klein", "flux"):
        return request.getfixturevalue("tiny_flux2_models" if model == "klein" else "tiny_flow_models")[model]
    return request.getfixturevalue("new_flow_model")(model)


@pytest.fixture(scope="module")
def picture_and_mask(tmp_path_factory):
    """A 32x32 noise picture, and a mask over its bottom-right quarter."""
    import numpy as np
    from PIL import ImageDraw

    folder = tmp_path_factory.mktemp("inpaint")
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / "init.png")
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 31, 31), fill=255)
    mask.save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


@pytest.mark.parametrize("model", INPAINTERS)
def test_inpainting_a_new_family_is_its_diffusers_inpaint_pipeline_then_the_composite(cli, request, tmp_path,
                                                                                      picture_and_mask, model):
    import json

    import diffusers
    import numpy as np
    import torch

    from conftest import paths_of, pixels
    from sdcli.generation.masks import composite, feather

    path, (init, mask) = _tiny(request, model), picture_and_mask
    (out,) = paths_of(cli("generate", "a red circle", "--model", path, "--steps", "2", "--seed", "3", "--init-image",
                          init, "--mask", mask, "--mask-blur", "2", "--strength", "0.8", "--out", tmp_path / "x.png"))
    cls, theirs = INPAINTERS[model]
    pipe = getattr(diffusers, cls).from_pretrained(path)
    if model == "chroma":  # as Chroma1-HD's config.json says; a config diffusers writes lacks it
        pipe.transformer.register_to_config(guidance_embeds=False)
    pipe.set_progress_bar_config(disable=True)
    feathered = feather(Image.open(mask).convert("L"), (32, 32), 2)
    image = pipe("a red circle", image=Image.open(init), mask_image=feathered, strength=0.8, num_inference_steps=2,
                 width=32, height=32, generator=[torch.Generator("cpu").manual_seed(3)], **theirs).images[0]
    expected = np.asarray(composite(image, Image.open(init), feathered), np.int16)
    assert np.abs(pixels(out) - expected).max() <= 1
    record = json.loads(Image.open(out).info["sdcli"])
    assert record["task"] == "inpaint" and record["strength"] == 0.8 and record["mask_blur"] == 2
    if model == "zimage":  # replay, as for every other task
        (again,) = paths_of(cli("generate", "--from-metadata", out, "--out", tmp_path / "again.png"))
        assert np.array_equal(pixels(again), pixels(out))


@pytest.mark.parametrize("model,task", [(m, "outpaint") for m in ("flux", *INPAINTERS)] + [("flux", "hires")])
def test_a_packed_trajectory_unpacks_at_the_size_its_pass_renders(request, picture_and_mask, model, task):
    """Packed latents keep no size: each frame is unpacked at its own pass's (an outpainted canvas, hires fix's
    enlargement), not at the size the image records."""
    from sdcli import api as sdcli

    init, _mask = picture_and_mask
    asked = {"outpaint": dict(init_image=str(init), outpaint=(16, 0, 0, 8), strength=1.0),
             "hires": dict(width=32, height=32, hires_scale=1.5, hires_strength=0.5)}[task]
    (made,) = sdcli.load(_tiny(request, model)).generate("a red circle", seeds=[3], steps=2, save_trajectory=True,
                                                         **asked)
    sizes = [frame.size for frame in made.trajectory]
    assert sizes == ([(48, 40)] * 2 if task == "outpaint" else [(32, 32)] * 2 + [(48, 48)])
    assert made.image.size == sizes[-1]


# 5. A size past the positions a denoiser has --------------------------------------------------------------------

# The tiny Z-Image's RoPE table has 32 positions a side for its 2x2 patches of a VAE that halves the image: 128
# pixels; the tiny SD3's position embedding 16 patches of 2 at the VAE's factor 1: 32 pixels.
@pytest.mark.parametrize("model,args,expected", [
    ("zimage", ["-W", "4096"], "--width 4096: ZImagePipeline takes images up to 128x128 pixels"),
    ("zimage", ["-W", "32", "-H", "136"], "--height 136: ZImagePipeline takes images up to 128x128 pixels"),
    ("zimage", ["--init-image", "WIDE"], "--init-image WIDE is 256x32: ZImagePipeline takes images up to 128x128"),
    ("zimage", ["--init-image", "SQUARE", "--outpaint", "64,48,0,0"],
     "--outpaint 64,48,0,0 makes a 144x32 canvas: ZImagePipeline takes images up to 128x128"),
    ("zimage", ["-W", "96", "-H", "32", "--hires-scale", "2"], "--hires-scale 2 makes 192x64: ZImagePipeline"),
    ("sd3", ["-W", "40", "-H", "32"], "--width 40: StableDiffusion3Pipeline takes images up to 32x32 pixels"),
])
def test_a_size_past_the_denoisers_positions_is_refused_in_one_line_before_loading(
        cli, request, tmp_path, no_pipeline_loads, model, args, expected):
    path = request.getfixturevalue("tiny_flow_models")[model] if model == "sd3" else _tiny(request, model)
    Image.new("RGB", (256, 32)).save(tmp_path / "wide.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "square.png")
    files = {"WIDE": str(tmp_path / "wide.png"), "SQUARE": str(tmp_path / "square.png")}
    result = cli("generate", "a red circle", "--model", path, "--steps", "2", "--out", tmp_path / "o.png",
                 *[files.get(a, a) for a in args])
    expected = expected.replace("WIDE", files["WIDE"])
    assert one_error_line(result, 2).startswith(f"error: {expected}")
    assert "(its transformer has positions for no more)" in result.stderr
    assert no_pipeline_loads == [] and not (tmp_path / "o.png").exists()


def test_the_largest_size_the_positions_cover_still_generates(cli, request, tmp_path):
    from conftest import paths_of

    (out,) = paths_of(cli("generate", "a red circle", "--model", _tiny(request, "zimage"), "--steps", "1", "-W", "128",
                          "-H", "32", "--out", tmp_path / "o.png"))
    assert Image.open(out).size == (128, 32)


# 6. Sizes a packed model's pipeline would round ------------------------------------------------------------------


@pytest.fixture(scope="module")
def chroma_vae8(tmp_path_factory):
    """The tiny Chroma with a VAE that divides the image by 8, as the real one's does: sizes are multiples of 16."""
    import diffusers

    from sdcli.testing import build_tiny_new_flow_pipeline

    pipe = build_tiny_new_flow_pipeline("chroma")
    pipe.register_modules(vae=diffusers.AutoencoderKL(
        block_out_channels=(8, 8, 8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, sample_size=16,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611))
    folder = tmp_path_factory.mktemp("chroma-vae8") / "chroma"
    pipe.save_pretrained(str(folder))
    return str(folder)


@pytest.mark.parametrize("args", [["--mask", "MASK"], []], ids=["inpaint", "img2img"])
def test_an_init_image_is_cut_to_the_models_multiple_not_rounded_by_its_pipeline(cli, chroma_vae8, tmp_path, args):
    """A 40x40 picture on a model whose sizes are multiples of 16: cut to 32x32 as the image records (the pipeline
    would round it down itself, and the composite over the 40x40 picture fail)."""
    import json

    from conftest import paths_of

    Image.new("RGB", (40, 40), "red").save(tmp_path / "init.png")
    Image.new("L", (40, 40), 255).save(tmp_path / "mask.png")
    args = [str(tmp_path / "mask.png") if a == "MASK" else a for a in args]
    (out,) = paths_of(cli("generate", "a red circle", "--model", chroma_vae8, "--steps", "2", "--init-image",
                          tmp_path / "init.png", *args, "--out", tmp_path / "o.png"))
    record = json.loads(Image.open(out).info["sdcli"])
    assert Image.open(out).size == (record["width"], record["height"]) == (32, 32)


def test_an_outpaint_border_off_the_models_multiple_is_refused_before_loading(cli, chroma_vae8, tmp_path,
                                                                               no_pipeline_loads):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "init.png")
    result = cli("generate", "a red circle", "--model", chroma_vae8, "--steps", "2", "--init-image",
                 tmp_path / "init.png", "--outpaint", "8,0,0,16", "--out", tmp_path / "o.png")
    assert one_error_line(result, 2) == ("error: --outpaint: 8 is not a multiple of 16 (what this model's VAE and "
                                         "pipeline need); try 0 or 16")
    assert no_pipeline_loads == [] and not (tmp_path / "o.png").exists()
