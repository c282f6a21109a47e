"""finetune on Chroma, Z-Image, Qwen-Image and FLUX.2 Klein (tiny random pipelines; FLUX.2-dev where it
differs: its guidance input): each model's own transformer call and objective, dropped captions to its null
prompt, the LoRA plain diffusers loads and `generate --lora` uses, the layout ComfyUI loads for each, DoRA, LoHa
and LoKr from either file on each (and on SD 2.x and SDXL), loss masks on Klein, exact resume, full fine-tunes, and
editing models refused."""

from __future__ import annotations

import json
import re
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import one_error_line, paths_of, pixels
from families.newflow import generate, new_flow_model, plain_diffusers  # noqa: F401 - fixtures (tests/families)
from sdcli.families import BY_NAME as FAMILIES
from sdcli.training import finetune
from sdcli.training.checkpoints import checkpoint_dirs
from sdcli.training.data import Item, discover
from sdcli.training.inputs import TextEncoding, TrainingInputs

NAMES = ["chroma", "zimage", "qwenimage", "klein"]
FAMILY = {"klein": "flux2", "flux2": "flux2"}  # the tiny FLUX.2 models (conftest's tiny_flux2_models) -> family
# What each family's generate does without a -g: plain diffusers' arguments for the same image.
GUIDED = {"chroma": {"guidance_scale": 3.0}, "zimage": {"guidance_scale": 4.0},
          "qwenimage": {"true_cfg_scale": 4.0, "negative_prompt": " "}, "klein": {"guidance_scale": 4.0},
          "flux2": {"guidance_scale": 4.0}}
# One pass a step, as training's prediction is (FLUX.2-dev's guidance is an input of that pass: training's too).
UNGUIDED = {"chroma": {"guidance_scale": 1.0}, "zimage": {"guidance_scale": 0.0}, "qwenimage": {"true_cfg_scale": 1.0},
            "klein": {"guidance_scale": 1.0}, "flux2": {"guidance_scale": 2.5}}
GUIDANCE_INPUT = {"flux2": 2.5}
# The module paths ComfyUI's LoRA loader maps for each family (comfy/lora.py, model_lora_keys_unet), for the
# default targets (to_q, to_k, to_v, to_out.0), each under its prefix:
COMFY = {
    # Chroma is ComfyUI's Flux class: diffusers' Flux paths under transformer. (utils.flux_to_diffusers)
    "chroma": r"transformer\.(transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)"
              r"|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v))",
    # Z-Image is ComfyUI's Lumina 2 class: utils.z_image_to_diffusers's paths under diffusion_model.
    "zimage": r"diffusion_model\.(layers|noise_refiner|context_refiner)\.\d+\.attention\.(to_q|to_k|to_v|to_out\.0)",
    # ComfyUI's Qwen-Image has diffusers' module names: every one, under diffusion_model.
    "qwenimage": r"diffusion_model\.transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)",
    # FLUX.2 is ComfyUI's Flux class too (model_base.Flux2): utils.flux_to_diffusers's double-block paths under
    # transformer. (the default targets are in the double-stream blocks only: single ones have no to_out.0)
    "klein": r"transformer\.transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)",
    "flux2": r"transformer\.transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)",
}


@pytest.fixture(scope="session")
def flow_model(new_flow_model, tiny_flux2_models):
    """``flow_model(name)``: the tiny pipeline's folder, the FLUX.2 ones from conftest's."""
    return lambda name: tiny_flux2_models[name] if name in FAMILY else new_flow_model(name)


def _family(name):
    return FAMILIES[FAMILY.get(name, name)]


def _pipe(path):
    from sdcli.pipeline import load_pipeline

    return load_pipeline(path, device="cpu").pipe


def _denoiser_latents(family, pipe, latents, size):
    """Latents as the pipeline holds them -> (B, C, h, w), as training holds them."""
    if family.name == "flux2":  # its tokens, row by row, are the patchified normalised latent training works on
        w, h = (side // (pipe.vae_scale_factor * 2) for side in size)
        return latents.permute(0, 2, 1).reshape(latents.shape[0], -1, h, w)
    latents = family.unpack_latents(pipe, latents, size)
    return latents[:, :, 0] if latents.ndim == 5 else latents


@pytest.mark.parametrize("name", [*NAMES, "flux2"])
def test_a_training_prediction_is_the_velocity_the_pipeline_steps_with(flow_model, name):
    """The pipeline's last Euler step takes x_1 to x_1 − σ_1·v; training's prediction at (x_1, t_1) is that v:
    the text encoding, mask, packing (FLUX.2: patches, batch norm, positions), timestep axis, sign and guidance
    input of each model's own call, at once."""
    pipe = _pipe(flow_model(name))
    family = _family(name)
    seen = []
    with torch.no_grad():
        pipe(prompt="a red circle", num_inference_steps=2, width=16, height=16, output_type="latent",
             generator=torch.Generator().manual_seed(0), **UNGUIDED[name],
             callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].clone()) or {})
        x1, final = (_denoiser_latents(family, pipe, x, (16, 16)) for x in seen)
        sigma, t = pipe.scheduler.sigmas[1], pipe.scheduler.timesteps[1:2]
        assert 0 < sigma < 1
        hidden, mask = TextEncoding(pipe, "cpu", family).encode(["a red circle"])
        v = family.predict(pipe, pipe.transformer, x1, t, family.conditioning(hidden, mask, None),
                           GUIDANCE_INPUT.get(name))
    torch.testing.assert_close(x1 - sigma * v, final, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_dropped_captions_train_the_family_null_prompt_and_the_cache_changes_nothing(flow_model, tmp_path,
                                                                                   make_images, name):
    from sdcli.training.objective import flow_step_loss, flow_training_scheduler

    make_images(tmp_path / "data", n=2, size=(24, 16))
    examples = discover(tmp_path / "data").examples
    pipe = _pipe(flow_model(name))
    family = _family(name)
    # What guidance reads without a negative prompt: the model card's " " for Qwen-Image, "" for the others.
    assert family.null_prompt == (" " if name == "qwenimage" else "")

    def inputs(cached):
        made = TrainingInputs(pipe, examples, family=family, resolution=16, center_crop=True, device="cpu",
                              cache_latents=cached, cache_text=cached)
        if cached:
            made.build_cache(flip=True, batch_size=1)  # one prompt a chunk: the cache pads them to one length
        return made

    items = [Item(0, drop=True), Item(1, flip=True)]
    cached, live = (inputs(c).batch(items, torch.Generator().manual_seed(3)) for c in (True, False))
    text = TextEncoding(pipe, "cpu", family)
    with torch.no_grad():
        (null, null_mask), (caption, caption_mask) = text.encode([family.null_prompt]), text.encode(
            [examples[1].caption])
        empty, empty_mask = text.encode([""])
    if name == "qwenimage":  # " " is its own prompt there, not the empty one
        assert empty_mask.sum() != null_mask.sum() or not torch.equal(empty, null)
    if not family.text_mask:  # FLUX.2: every prompt at the pipeline's 512 tokens, padding read, no mask
        null_mask, caption_mask = (torch.ones(h.shape[:2], dtype=torch.bool) for h in (null, caption))
    for batch in (cached, live):
        hidden = batch.cond["encoder_hidden_states"]
        mask = batch.cond["text_mask"] > 0 if family.text_mask else torch.ones(hidden.shape[:2], dtype=torch.bool)
        for row, (theirs, their_mask) in enumerate(((null, null_mask), (caption, caption_mask))):
            torch.testing.assert_close(mask[row].sum(), (their_mask[0] > 0).sum())
            torch.testing.assert_close(hidden[row][mask[row]], theirs[0][their_mask[0] > 0])
    torch.testing.assert_close(cached.latents, live.latents, rtol=1e-5, atol=1e-5)

    scheduler = flow_training_scheduler(pipe.scheduler.config)

    def loss(batch):
        def predict(noisy, timesteps):
            return family.predict(pipe, pipe.transformer, noisy, timesteps, batch.cond, None)

        with torch.no_grad():
            return flow_step_loss(predict, scheduler, batch.latents, torch.Generator().manual_seed(5),
                                  sampling="logit-normal", weighting="cosmap")

    torch.testing.assert_close(loss(cached), loss(live), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", [*NAMES, "flux2"])
def test_the_lora_is_generate_loras_image_in_plain_diffusers_and_in_comfyuis_layout(cli, generate, flow_model,
                                                                                   plain_diffusers, dataset, tmp_path,
                                                                                   name):
    folder, out = flow_model(name), tmp_path / "style"
    trained = cli("finetune", "--data", dataset, "--model", folder, "--out", out, "--resolution", "16",
                  "--max-steps", "2", "--batch-size", "2", "--lr", "3e-2", "--rank", "4", "--lora-alpha", "8",
                  "--checkpoint-every", "0", "--quiet")
    assert trained.exit_code == 0, trained.stderr
    diffusers_file, comfy_file = out / "pytorch_lora_weights.safetensors", out / "style.safetensors"
    assert all(k.startswith("transformer.") for k in load_file(str(diffusers_file)))

    (made,) = paths_of(generate(folder, "-W", "16", "-H", "16", "--lora", out))
    theirs = plain_diffusers(folder, lora=str(out), width=16, height=16, **GUIDED[name])
    assert np.abs(pixels(made) - theirs).max() <= 1
    assert np.abs(theirs - plain_diffusers(folder, width=16, height=16, **GUIDED[name])).max() > 2

    # ComfyUI's layout: peft's halves and kohya's alpha beside them, on the modules its loader maps for the family.
    tensors, theirs_file = load_file(str(comfy_file)), load_file(str(diffusers_file))
    stems = {re.sub(r"\.(lora_A\.weight|lora_B\.weight|alpha)$", "", k) for k in tensors}
    family = _family(name)
    assert len(tensors) == (3 if family.comfy_lora_alpha else 2) * len(stems)
    assert all(re.fullmatch(COMFY[name], s) for s in stems)
    prefix = family.comfy_lora_prefix
    assert {s.removeprefix(prefix) for s in stems} == {re.sub(r"^transformer\.|\.lora_[AB]\.weight$", "", k)
                                                         for k in theirs_file}
    if family.comfy_lora_alpha:
        assert all(float(tensors[f"{s}.alpha"]) == 8.0 for s in stems)
    else:  # FLUX.2: alpha / rank = 2 folded into lora_B, read at scale 1 by ComfyUI and diffusers alike
        stem = next(iter(stems)).removeprefix(prefix)
        torch.testing.assert_close(tensors[f"{prefix}{stem}.lora_B.weight"],
                                   2 * theirs_file[f"transformer.{stem}.lora_B.weight"])
    # diffusers' own loader reads that layout back (its converters for Z-Image and Qwen-Image, Flux's for Chroma).
    assert np.abs(plain_diffusers(folder, lora=str(comfy_file), width=16, height=16, **GUIDED[name])
                  - theirs).max() <= 1
    settings = json.loads((out / "training_settings.json").read_text())
    assert settings["family"] == {"klein": "flux2-klein"}.get(name, name) and settings["prediction_type"] == "flow"
    assert settings["config"]["distilled_guidance"] == (1.0 if name == "flux2" else None)  # diffusers' FLUX.2 recipe
    card = (out / "README.md").read_text()
    assert "ComfyUI: copy style.safetensors into models/loras/" in card and "AUTOMATIC1111" not in card


def test_klein_loss_masks_weigh_its_tokens(tiny_flux2_models, tmp_path, make_images):
    """FLUX.2's denoiser sees one token per 2x2 latent patch: a loss mask is averaged over each token's pixels."""
    from PIL import Image

    make_images(tmp_path / "data", n=1, size=(32, 32))
    (tmp_path / "masks").mkdir()
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255  # the left half
    name = next((tmp_path / "data").glob("*.png")).stem
    Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
    examples = discover(tmp_path / "data", masks=tmp_path / "masks").examples
    pipe = _pipe(tiny_flux2_models["klein"])
    inputs = TrainingInputs(pipe, examples, family=FAMILIES["flux2"], resolution=32, center_crop=True, device="cpu",
                            cache_latents=False, cache_text=False, unmasked_weight=0.25)
    batch = inputs.batch([Item(0)], torch.Generator().manual_seed(0))
    side = 32 // (pipe.vae_scale_factor * 2)
    assert batch.latents.shape[-2:] == batch.weights.shape[-2:] == (side, side)
    assert batch.weights[..., :side // 2].eq(1).all() and batch.weights[..., side // 2:].eq(0.25).all()


def _image(pipe, name):
    """The pipeline's image in one pass a step (as floats: a scale slightly off shows)."""
    return pipe(prompt="a red circle", num_inference_steps=2, width=16, height=16, output_type="np",
                generator=torch.Generator().manual_seed(0), **UNGUIDED.get(name, {"guidance_scale": 1.0})).images[0]


def _plain_diffusers(model, out, adapter):
    """Plain diffusers with diffusers' file of ``adapter`` loaded as the README says: DoRA by the pipeline's loader,
    LoKr by the model's own (diffusers has no LoHa loader)."""
    from diffusers import DiffusionPipeline

    plain = DiffusionPipeline.from_pretrained(model)
    plain.set_progress_bar_config(disable=True)
    if adapter == "dora":
        plain.load_lora_weights(str(out))
    else:
        denoiser = "unet" if hasattr(plain, "unet") else "transformer"
        getattr(plain, denoiser).load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors",
                                                   prefix=denoiser)
    return plain


@pytest.mark.parametrize("name", ["sd2", "sdxl", *NAMES])
def test_each_adapters_tool_file_gives_the_diffusers_files_image(cli, flow_model, tiny_models, dataset, tmp_path,
                                                                 name):
    """DoRA, LoHa and LoKr on every family with a file for other tools (kohya's lora_unet_ names on SD, ComfyUI's
    transformer. or diffusion_model. prefix on the others; LyCORIS's tensor names, DoRA as peft's halves and
    dora_scale): generate --lora gives one image from that file and from diffusers', and plain diffusers gives it
    from diffusers' DoRA and LoKr. (Plain LoRA: the test above and tests/training/test_finetune_kohya.py; every
    adapter on SD 1.x: tests/test_adapters.py.)"""
    from sdcli.generation.engine import load_loras, remove_loras

    model = tiny_models[name] if name in tiny_models else flow_model(name)
    pipe = _pipe(model)

    def image(lora=None):  # as generate --lora applies a request's LoRA, and removes it after
        names = load_loras(pipe, [(str(lora), 1.0)]) if lora else []
        made = _image(pipe, name)
        remove_loras(pipe, names, had=False, active=[])
        return made

    base = image()
    for adapter in ("dora", "loha", "lokr"):
        out = tmp_path / adapter
        trained = cli("finetune", "--data", dataset, "--model", model, "--out", out, "--adapter", adapter,
                      "--resolution", "16", "--max-steps", "1", "--batch-size", "2", "--lr", "0.1", "--rank", "4",
                      "--lora-alpha", "2", "--checkpoint-every", "0", "--quiet")
        assert trained.exit_code == 0, trained.stderr
        from_out = image(out)
        moved = np.abs(from_out - base).max()
        assert moved > 1e-4, adapter  # the adapter trained and loaded
        # One image: a scale read another way (alpha / rank against alpha / dim) would differ by a share of moved.
        assert np.abs(image(out / f"{adapter}.safetensors") - from_out).max() <= moved / 100, adapter
        if adapter != "loha":
            assert np.abs(_image(_plain_diffusers(model, out, adapter), name) - from_out).max() <= moved / 100
    assert np.abs(image() - base).max() == 0  # each request's adapter removed after it


def test_zimage_ctrl_c_then_resume_ends_with_the_same_weights_as_never_stopping(new_flow_model, dataset, tmp_path,
                                                                               make_config):
    model = new_flow_model("zimage")
    settings = dict(resolution=16, max_steps=3, batch_size=2, uncond_prob=0.5, timestep_sampling="logit-normal",
                    checkpoint_every=0, seed=5)
    whole = finetune(make_config(dataset, tmp_path / "whole", model, **settings))

    def press_ctrl_c(info):
        if info.step == 1:
            signal.raise_signal(signal.SIGINT)  # the loop stops after the next step and checkpoints

    with pytest.raises(KeyboardInterrupt):
        finetune(make_config(dataset, tmp_path / "split", model, **settings), callback=press_ctrl_c)
    assert [p.name for p in checkpoint_dirs(tmp_path / "split")] == ["checkpoint-000002"]
    resumed = finetune(make_config(dataset, tmp_path / "split", model, resume="latest", **settings))
    assert resumed.steps == whole.steps == 3 and resumed.losses == whole.losses[2:]
    a = load_file(str(tmp_path / "whole" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,cls", [("qwenimage", "QwenImagePipeline"), ("klein", "Flux2KleinPipeline")])
def test_full_fine_tune_is_a_pipeline_folder_with_a_trained_transformer(flow_model, dataset, tmp_path, make_config,
                                                                        name, cls):
    from diffusers import DiffusionPipeline

    model, out = flow_model(name), tmp_path / "full"
    finetune(make_config(dataset, out, model, resolution=16, lora=False, max_steps=1, learning_rate=1e-2))
    original, trained = DiffusionPipeline.from_pretrained(model), DiffusionPipeline.from_pretrained(str(out))
    assert type(trained).__name__ == cls
    changed = [not torch.equal(a, b) for a, b in zip(trained.transformer.parameters(),
                                                     original.transformer.parameters())]
    assert any(changed)
    for a, b in zip(trained.text_encoder.parameters(), original.text_encoder.parameters()):
        assert torch.equal(a, b)  # the text encoder is never trained


def test_an_editing_model_is_refused_in_one_line_before_loading(cli, new_flow_model, dataset, tmp_path,
                                                               no_pipeline_loads):
    result = cli("finetune", "--data", dataset, "--model", new_flow_model("qwenimage-edit"), "--out",
                 tmp_path / "out", "--max-steps", "1", "--quiet")
    assert "QwenImageEditPipeline, an editing model" in one_error_line(result)
    assert no_pipeline_loads == [] and not (tmp_path / "out").exists()


def test_a_resolution_past_zimages_position_table_is_refused_in_one_line(cli, new_flow_model, dataset, tmp_path):
    # The tiny Z-Image's RoPE table covers 128 pixels a side (`sdcli.families.zimage.positions`).
    result = cli("finetune", "--data", dataset, "--model", new_flow_model("zimage"), "--out", tmp_path / "out",
                 "--max-steps", "1", "--quiet", "--resolution", "144")
    assert "--resolution 144 is larger than this model's position embedding covers (128)" in one_error_line(result, 2)
    assert not (tmp_path / "out" / "loss.csv").exists()
