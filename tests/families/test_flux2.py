"""FLUX.2, FLUX.2 Klein (`sdcli.families.flux2`) and FLUX.1 Kontext's reference image (`sdcli.families.flux`):
the same images as plain diffusers, each model's own guidance and defaults, reference images, LoRAs, trajectories,
replay, and what each model lacks refused in one line before loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_error_line, paths_of, pixels

# The guidance each tiny model runs at by default, as plain diffusers takes it (guidance_scale).
DEFAULT_SCALE = {"flux2": 4.0, "klein": 4.0, "klein-distilled": 1.0, "kontext": 2.5}


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Two reference pictures of different sizes (FLUX.2 takes sides of 64 pixels and more)."""
    folder = tmp_path_factory.mktemp("refs")
    paths = []
    for i, size in enumerate(((80, 64), (64, 72))):
        array = np.random.RandomState(i).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"ref{i}.png")
        paths.append(folder / f"ref{i}.png")
    return paths


def diffusers_image(path, size=16, **kw):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if "negative" in kw:  # Klein takes its negative prompt as embeddings only
        kw["negative_prompt_embeds"] = pipe.encode_prompt(kw.pop("negative"))[0]
    if "lora" in kw:
        lora = kw.pop("lora")
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    image = pipe(prompt="a red circle", num_inference_steps=2, height=size, width=size, output_type="np",
                 generator=[torch.Generator("cpu").manual_seed(3)], **kw).images[0]
    return np.round(image * 255).astype(np.int16)


def sdcli_image(cli, path, tmp_path, *args, name="x.png", size=16):
    result = cli("generate", "a red circle", "--model", path, "--steps", "2", "--seed", "3", "-W", size, "-H", size,
                 "--out", tmp_path / name, *args)
    return paths_of(result)[0]


def record_of(path):
    return json.loads(Image.open(path).info["sdcli"])


# 1. Text to image, as diffusers makes it, at each model's own guidance ------------------------------------------


@pytest.mark.parametrize("kind,family,guidance", [
    # FLUX.2-dev's guidance is distilled (its guidance_scale is an input); Klein base's is CFG; distilled, none.
    ("flux2", "flux2", (4.0, 1.0)), ("klein", "flux2-klein", (None, 4.0)),
    ("klein-distilled", "flux2-klein", (None, 1.0)),
    ("kontext", "flux", (2.5, 1.0)),  # Kontext without a reference: made at the size asked, not a megapixel
])
def test_txt2img_equals_plain_diffusers_at_the_models_own_guidance(cli, tiny_flux2_models, tmp_path, kind, family,
                                                                   guidance):
    out = sdcli_image(cli, tiny_flux2_models[kind], tmp_path)
    record = record_of(out)
    assert record["model_family"] == family and (record["distilled_guidance"], record["guidance"]) == guidance
    area = {"max_area": 16 * 16} if kind == "kontext" else {}
    theirs = diffusers_image(tiny_flux2_models[kind], guidance_scale=DEFAULT_SCALE[kind], **area)
    assert Image.open(out).size == (16, 16) and np.abs(pixels(out) - theirs).max() <= 1


def test_klein_guides_against_its_negative_prompt_as_diffusers_does(cli, tiny_flux2_models, tmp_path):
    path = tiny_flux2_models["klein"]
    out = sdcli_image(cli, path, tmp_path, "-g", "3", "-n", "blurry")
    assert np.abs(pixels(out) - diffusers_image(path, guidance_scale=3.0, negative="blurry")).max() <= 1
    plain = sdcli_image(cli, path, tmp_path, "-g", "3", name="plain.png")
    assert np.abs(pixels(out) - pixels(plain)).max() > 0  # the negative prompt is read


def test_defaults_come_from_each_model_card(tiny_flux2_models, tiny_flow_models):
    from sdcli.generation import Settings, plan

    def planned(path):
        s = plan(Settings(prompts=["x"], model=path), distributed=False).settings
        return s.steps, s.guidance, s.distilled_guidance

    assert planned(tiny_flux2_models["flux2"]) == (50, [1.0], 4.0)
    assert planned(tiny_flux2_models["klein"]) == (50, [4.0], None)
    assert planned(tiny_flux2_models["klein-distilled"]) == (4, [1.0], None)
    assert planned(tiny_flux2_models["kontext"]) == (28, [1.0], 2.5)
    assert planned(tiny_flow_models["flux"]) == (25, [1.0], 3.5)  # FLUX.1-dev keeps sdcli's


# 2. Reference images -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flux2", "klein"])
def test_reference_images_are_the_pipelines_image_input(cli, tiny_flux2_models, tmp_path, refs, kind):
    path = tiny_flux2_models[kind]
    out = sdcli_image(cli, path, tmp_path, "--reference-image", refs[0], "--reference-image", refs[1])
    record = record_of(out)
    assert record["task"] == "edit" and [r["path"] for r in record["reference_images"]] == [str(p) for p in refs]
    theirs = diffusers_image(path, guidance_scale=DEFAULT_SCALE[kind], image=[Image.open(p) for p in refs])
    assert np.abs(pixels(out) - theirs).max() <= 1
    assert np.abs(pixels(out) - diffusers_image(path, guidance_scale=DEFAULT_SCALE[kind])).max() > 0


def test_kontext_edits_its_reference_at_the_size_asked(cli, tiny_flux2_models, tmp_path, refs):
    path = tiny_flux2_models["kontext"]
    out = sdcli_image(cli, path, tmp_path, "--reference-image", refs[0], size=32)
    assert Image.open(out).size == (32, 32) and record_of(out)["distilled_guidance"] == 2.5
    # diffusers' Kontext rescales the asked size to max_area; sdcli asks for the size's own area.
    theirs = diffusers_image(path, size=32, guidance_scale=2.5, image=Image.open(refs[0]), max_area=32 * 32)
    assert np.abs(pixels(out) - theirs).max() <= 1


def test_without_a_size_the_first_reference_sets_it(cli, tiny_flux2_models, tmp_path, refs):
    result = cli("generate", "x", "--model", tiny_flux2_models["klein-distilled"], "--steps", "1", "--seed", "1",
                 "--reference-image", refs[1], "--out", tmp_path / "o.png")
    assert Image.open(paths_of(result)[0]).size == (64, 72)  # 64x72 is a multiple of the tiny model's 8


def test_an_edit_replays_from_its_metadata_while_its_references_are_unchanged(cli, tiny_flux2_models, tmp_path,
                                                                               refs):
    import shutil

    ref = shutil.copy(refs[0], tmp_path / "mine.png")
    out = sdcli_image(cli, tiny_flux2_models["klein"], tmp_path, "--reference-image", ref, "-g", "2", "-n", "dull")
    (again,) = paths_of(cli("generate", "--from-metadata", out, "--out", tmp_path / "again.png"))
    assert record_of(again)["reference_images"] == record_of(out)["reference_images"]
    assert record_of(again)["negative_prompt"] == "dull" and (pixels(again) == pixels(out)).all()
    Image.open(refs[1]).save(ref)  # another picture under the recorded name
    result = cli("generate", "--from-metadata", out, "--out", tmp_path / "changed.png")
    assert "--reference-image" in one_error_line(result) and "has changed since the image was made" in result.stderr


# 3. What a model lacks, refused in one line before loading -----------------------------------------------------


@pytest.mark.parametrize("model,args,expected", [
    ("sd1", ["--reference-image", "REF"], "--reference-image: StableDiffusionPipeline takes no reference images"),
    ("flux", ["--reference-image", "REF"], "--reference-image: FluxPipeline takes no reference images"),
    ("kontext", ["--reference-image", "REF", "--reference-image", "REF"],
     "--reference-image: FluxKontextPipeline takes 1 reference image, not 2"),
    ("klein", ["--reference-image", "REF"] * 11, "--reference-image: Flux2KleinPipeline takes at most 10 reference"),
    ("kontext", ["--init-image", "REF"], "--init-image: FluxKontextPipeline has no img2img"),
    ("kontext", ["--init-image", "REF", "--mask", "MASK"], "--mask: FluxKontextPipeline is not inpainted by sdcli"),
    ("kontext", ["--init-image", "REF", "--outpaint", "16,16,0,0"], "--outpaint: FluxKontextPipeline is not inpainted"),
    ("flux2", ["--reference-image", "REF", "--init-image", "REF"], "--init-image does not combine with"),
    ("flux2", ["--init-image", "REF"], "--init-image: Flux2Pipeline has no img2img in diffusers"),
    ("flux2", ["--init-image", "REF", "--mask", "MASK"], "--mask: Flux2Pipeline has no inpainting in diffusers"),
    ("flux2", ["--init-image", "REF", "--outpaint", "8,8,0,0"], "--outpaint: Flux2Pipeline has no inpainting"),
    ("klein", ["--init-image", "REF", "--strength", "0.5"], "--init-image: Flux2KleinPipeline has no img2img"),
    ("klein", ["--init-image", "REF", "--mask", "MASK", "--reference-image", "REF"],
     "--init-image does not combine with --reference-image"),
    ("flux2", ["-n", "blurry"], "--negative-prompt: Flux2Pipeline has its guidance distilled"),
    ("flux2", ["-g", "3"], "--guidance 3: Flux2Pipeline's guidance is distilled"),
    ("klein", ["--distilled-guidance", "3"], "--distilled-guidance: Flux2KleinPipeline has no guidance input"),
    ("klein-distilled", ["-g", "3"], "Flux2KleinPipeline has no guidance input"),
    ("klein-distilled", ["-n", "blurry"], "--negative-prompt: Flux2KleinPipeline has no guidance"),
])
def test_what_a_model_lacks_is_refused_in_one_line_before_loading(cli, request, tmp_path, no_pipeline_loads, refs,
                                                                   model, args, expected):
    fixture = {"sd1": "tiny_models", "flux": "tiny_flow_models"}.get(model, "tiny_flux2_models")
    path = request.getfixturevalue(fixture)[model]
    Image.new("L", Image.open(refs[0]).size, 255).save(tmp_path / "mask.png")
    args = [{"REF": str(refs[0]), "MASK": str(tmp_path / "mask.png")}.get(a, a) for a in args]
    result = cli("generate", "a red circle", "--model", path, "--out", tmp_path / "o.png", *args)
    assert one_error_line(result, 2).startswith(f"error: {expected}")
    assert no_pipeline_loads == [] and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("size,expected", [((32, 96), "needs both sides at least 64 pixels"),
                                           ((640, 64), "takes aspect ratios up to 8:1")])
def test_a_reference_flux2_would_reject_is_refused_by_name(cli, tiny_flux2_models, tmp_path, no_pipeline_loads,
                                                            size, expected):
    Image.new("RGB", size).save(tmp_path / "small.png")
    result = cli("generate", "x", "--model", tiny_flux2_models["flux2"], "--reference-image", tmp_path / "small.png")
    line = one_error_line(result)
    assert line.startswith(f"error: --reference-image {tmp_path / 'small.png'} is {size[0]}x{size[1]}")
    assert expected in line and no_pipeline_loads == []


def test_a_flux2_single_file_is_refused_naming_what_diffusers_loads(cli, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "flux2-dev.safetensors"
    save_file({"single_stream_modulation.lin.weight": torch.zeros(2, 2), "double_blocks.0.img_mod.lin.weight":
               torch.zeros(2, 2)}, str(path))
    result = cli("generate", "x", "--model", path, "--steps", "1", "--out", tmp_path / "o.png")
    line = one_error_line(result)
    assert "is a flux2 transformer alone" in line and "as --transformer" in line


# 4. LoRAs, trajectories, memory --------------------------------------------------------------------------------


# kohya's names of two FLUX.2 layers whose diffusers twins are one module each (BFL's original block names).
KOHYA = {"transformer.transformer_blocks.0.attn.to_out.0": "lora_unet_double_blocks_0_img_attn_proj",
         "transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj": "lora_unet_single_blocks_0_linear1"}


def relaid(lora, layout, folder):
    """The diffusers-format LoRA file ``lora`` in another layout people share FLUX.2 LoRAs in."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(lora))
    if layout == "comfyui":  # ComfyUI's and ai-toolkit's prefix, diffusers' block names
        out = {k.replace("transformer.", "diffusion_model.", 1): v for k, v in weights.items()}
    else:  # kohya's sd-scripts: lora_down/lora_up and an alpha per module
        out = {}
        for module, name in KOHYA.items():
            out[f"{name}.lora_down.weight"] = weights[f"{module}.lora_A.weight"]
            out[f"{name}.lora_up.weight"] = weights[f"{module}.lora_B.weight"]
            out[f"{name}.alpha"] = torch.tensor(float(out[f"{name}.lora_down.weight"].shape[0]))
    save_file(out, str(folder / f"{layout}.safetensors"))
    return folder / f"{layout}.safetensors"


@pytest.mark.parametrize("layout", ["diffusers", "comfyui", "kohya"])
def test_a_lora_gives_diffusers_load_lora_weights_image(cli, tiny_flux2_models, tmp_path, layout):
    from sdcli.testing import save_random_transformer_lora

    path = tiny_flux2_models["klein"]
    lora = save_random_transformer_lora(  # FLUX.2's single blocks fuse their projections into to_qkv_mlp_proj
        path, tmp_path / "lora", targets=("to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj")) / "pytorch_lora_weights.safetensors"
    if layout != "diffusers":
        lora = relaid(lora, layout, tmp_path)
    out = sdcli_image(cli, path, tmp_path, "--lora", lora)
    assert np.abs(pixels(out) - diffusers_image(path, guidance_scale=4.0, lora=lora)).max() <= 1
    assert np.abs(pixels(out) - diffusers_image(path, guidance_scale=4.0)).max() > 2  # the LoRA does something


@pytest.mark.parametrize("kind", ["flux2", "kontext"])
def test_the_trajectory_unpacks_to_the_image(tiny_flux2_models, refs, kind):
    # x̂0 = x_t − σ·v on the packed tokens; the last step goes to σ = 0 by the same v, so the last frame,
    # unpacked (FLUX.2: batch-norm statistics undone, 2x2 patches unfolded) and decoded, is the image itself.
    from sdcli.generation import Engine, Settings, plan

    size = 32 if kind == "kontext" else 16
    s = Settings(prompts=["a red circle"], model=tiny_flux2_models[kind], steps=3, seeds=[1], width=size,
                 height=size, save_trajectory=True, reference_images=[str(refs[0])])
    p = plan(s, distributed=False)
    (item,) = Engine.load(s).images(s, p.jobs)
    frames = [np.asarray(f, np.int16) for f in item.trajectory]
    assert len(frames) == 3 and frames[-1].shape == (size, size, 3)
    assert np.abs(frames[-1] - np.asarray(item.image, np.int16)).max() <= 1
    assert np.abs(frames[0] - frames[-1]).max() > 2


def test_the_memory_estimate_reads_the_transformer(tiny_flux2_models):
    from sdcli.families import model_arch

    arch = model_arch(tiny_flux2_models["flux2"])
    assert (arch.vae_factor, arch.attention_heads, arch.unet_channels, arch.attention_level) == (2, 2, 8, 1)


# 5. inspect-schedule: μ and σ's as the FLUX.2 pipelines compute them --------------------------------------------


def pipeline_sigmas(path, size, steps):
    """The σ's the FLUX.2 pipeline's own scheduler ran (its last call leaves them on the scheduler)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    pipe(prompt="x", num_inference_steps=steps, height=size, width=size, output_type="latent")
    return [float(s) for s in pipe.scheduler.sigmas]


@pytest.mark.parametrize("steps", [2, 5])
def test_inspect_schedule_shifts_a_flux2_model_as_its_pipeline_does(cli, tiny_flux2_models, steps):
    from conftest import strict_json

    path = tiny_flux2_models["klein-distilled"]
    result = cli("inspect-schedule", "--model", path, "--resolution", "32x32", "--steps", steps, "--format", "json")
    assert result.exit_code == 0, result.stderr
    info = strict_json(result.stdout)
    assert info["sampling_sigmas"] == pytest.approx(pipeline_sigmas(path, 32, steps), abs=1e-6)
    assert info["resolution"] == [32, 32]


def test_the_flux2_preset_uses_the_flux2_rule_not_flux1s(cli):
    from conftest import strict_json

    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    infos = {}
    for preset in ("flux", "flux2"):
        result = cli("inspect-schedule", "--preset", preset, "--resolution", "1024x1024", "--steps", "28", "--format",
                     "json")
        infos[preset] = strict_json(result.stdout)
    assert infos["flux2"]["shift_mu"] == pytest.approx(compute_empirical_mu(64 * 64, 28))
    assert infos["flux2"]["shift_mu"] != pytest.approx(infos["flux"]["shift_mu"])
