"""finetune on flow-matching transformers (SD3, Flux): what the transformer sees, the null prompt, the LoRA
plain diffusers loads, exact resume, full fine-tuning, and the options each objective refuses."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import one_error_line
from sdcli.errors import UsageError
from sdcli.training import finetune
from sdcli.training.checkpoints import checkpoint_dirs
from sdcli.training.data import Item, discover
from sdcli.families import BY_NAME as FAMILIES
from sdcli.training.inputs import TextEncoding, TrainingInputs

FAMILY = {"sd3": "sd3", "flux": "flux", "flux-schnell": "flux"}


def _pipe(path):
    from sdcli.pipeline import load_pipeline

    return load_pipeline(path, device="cpu").pipe


def _record_calls(model) -> list[dict]:
    calls: list[dict] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)
    return calls


@pytest.mark.parametrize("name", ["sd3", "flux", "flux-schnell"])
def test_the_transformer_gets_from_training_what_its_pipeline_gives_it(tiny_flow_models, name):
    """Text encoding, latent packing, position ids, guidance input and timestep scale: as the pipeline's own call."""
    pipe = _pipe(tiny_flow_models[name])
    family = FAMILIES[FAMILY[name]]
    guidance = 3.5 if name == "flux" else None
    calls = _record_calls(pipe.transformer)
    with torch.no_grad():
        pipe("a red circle", num_inference_steps=1, height=16, width=16, generator=torch.Generator().manual_seed(0),
             output_type="latent", guidance_scale=guidance or 1.0)  # SD3: 1.0 runs the conditional branch only
        theirs = calls[-1]
        noisy, timesteps = theirs["hidden_states"], theirs["timestep"]
        if family.name == "flux":  # back to (B, C, h, w) and the 0..1000 axis, which training works on
            noisy = type(pipe)._unpack_latents(noisy, 16, 16, pipe.vae_scale_factor)
            timesteps = timesteps * 1000
        hidden, pooled = TextEncoding(pipe, "cpu", family).encode(["a red circle"])
        family.predict(pipe, pipe.transformer, noisy, timesteps, family.conditioning(hidden, pooled, None), guidance)
    ours = calls[-1]
    options = ("joint_attention_kwargs", "attention_kwargs")  # LoRA scale and the like: none in training
    assert len(calls) == 2 and set(ours) >= {k for k, v in theirs.items() if v is not None and k not in options}
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(ours[key], value, msg=key)
        elif key not in options:
            assert ours.get(key) == value, key
    assert (ours.get("guidance") is None) == (name != "flux")


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_dropped_captions_train_the_family_null_prompt_and_the_cache_changes_nothing(tiny_flow_models, tmp_path,
                                                                                   make_images, name):
    from sdcli.training.objective import flow_step_loss, flow_training_scheduler

    make_images(tmp_path / "data", n=2, size=(24, 16))
    examples = discover(tmp_path / "data").examples
    pipe = _pipe(tiny_flow_models[name])
    family = FAMILIES[name]

    def inputs(cached):
        made = TrainingInputs(pipe, examples, family=family, resolution=16, center_crop=True, device="cpu",
                              cache_latents=cached, cache_text=cached)
        if cached:
            made.build_cache(flip=True, batch_size=2)
        return made

    items = [Item(0, drop=True), Item(1, flip=True)]
    cached = inputs(True).batch(items, torch.Generator().manual_seed(3))
    live = inputs(False).batch(items, torch.Generator().manual_seed(3))
    # What each pipeline feeds the unconditional side: SD3 encodes the empty negative prompt; Flux the empty prompt.
    with torch.no_grad():
        if name == "sd3":
            _, null, _, null_pooled = pipe.encode_prompt("a cat", None, None, device="cpu",
                                                         do_classifier_free_guidance=True, negative_prompt=None)
        else:
            null, null_pooled, _ = pipe.encode_prompt("", None, device="cpu")
        caption, caption_pooled = TextEncoding(pipe, "cpu", family).encode([examples[1].caption])
    for batch in (cached, live):
        torch.testing.assert_close(batch.cond["encoder_hidden_states"][0], null[0])
        torch.testing.assert_close(batch.cond["pooled_projections"][0], null_pooled[0])
        torch.testing.assert_close(batch.cond["encoder_hidden_states"][1], caption[0])
        torch.testing.assert_close(batch.cond["pooled_projections"][1], caption_pooled[0])
    assert not torch.allclose(null[0], caption[0])
    torch.testing.assert_close(cached.latents, live.latents, rtol=1e-5, atol=1e-5)

    scheduler = flow_training_scheduler(pipe.scheduler.config)
    guidance = 1.0 if name == "flux" else None

    def loss(batch):
        def predict(noisy, timesteps):
            return family.predict(pipe, pipe.transformer, noisy, timesteps, batch.cond, guidance)

        with torch.no_grad():
            return flow_step_loss(predict, scheduler, batch.latents, torch.Generator().manual_seed(5),
                                  sampling="logit-normal", logit_mean=0.0, logit_std=1.0, weighting="cosmap")

    torch.testing.assert_close(loss(cached), loss(live), rtol=1e-5, atol=1e-6)


def _transformer_out(transformer, family, pipe_cls, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    config = transformer.config
    text = torch.randn(1, 7, config.joint_attention_dim, generator=g)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=g)
    with torch.no_grad():
        if family == "sd3":
            return transformer(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                               timestep=torch.tensor([500.0]), return_dict=False)[0]
        packed = pipe_cls._pack_latents(latents, 1, 4, 8, 8)
        ids = pipe_cls._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
        guidance = torch.tensor([1.0]) if config.guidance_embeds else None
        return transformer(hidden_states=packed, encoder_hidden_states=text, pooled_projections=pooled,
                           timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(7, 3), guidance=guidance,
                           return_dict=False)[0]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lora_loads_in_plain_diffusers_at_the_trained_scale_and_changes_the_image(tiny_flow_models, dataset, tmp_path,
                                                                                   make_config, name):
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

    out = tmp_path / "lora"
    result = finetune(make_config(dataset, out, tiny_flow_models[name], resolution=16, max_steps=3, rank=4,
                                  lora_alpha=8, learning_rate=1e-2, checkpoint_every=100,
                                  timestep_sampling="logit-normal", weighting_scheme="sigma_sqrt"))
    assert result.weights == out / "pytorch_lora_weights.safetensors"
    keys = load_file(str(result.weights)).keys()
    assert keys and all(k.startswith("transformer.") and ".lora_" in k for k in keys)
    if name == "flux":  # the single-stream blocks' attention too, as diffusers' Flux LoRA script targets it
        assert any(k.startswith("transformer.single_transformer_blocks.") for k in keys)

    pipe = DiffusionPipeline.from_pretrained(tiny_flow_models[name])  # plain diffusers from here on
    kwargs = dict(num_inference_steps=2, height=16, width=16, output_type="np")
    before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    base = _transformer_out(pipe.transformer, name, type(pipe))
    pipe.load_lora_weights(str(out))
    assert pipe.transformer.peft_config[pipe.get_active_adapters()[0]].lora_alpha == 8
    after = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(after - before).max() > 1e-3
    loaded = _transformer_out(pipe.transformer, name, type(pipe))
    assert not torch.allclose(loaded, base, atol=1e-6)

    # The adapters as training held them (the final checkpoint) give the same output: nothing lost or rescaled.
    fresh = DiffusionPipeline.from_pretrained(tiny_flow_models[name]).transformer
    fresh.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    state = load_file(str(checkpoint_dirs(out)[-1] / "model.safetensors"))
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all("lora" not in k for k in missing)
    torch.testing.assert_close(_transformer_out(fresh, name, type(pipe)), loaded, rtol=1e-5, atol=1e-6)

    settings = json.loads((out / "training_settings.json").read_text())
    assert settings["family"] == name and settings["prediction_type"] == "flow"
    config = settings["config"]
    assert (config["timestep_sampling"], config["logit_mean"], config["logit_std"], config["mode_scale"],
            config["weighting_scheme"]) == ("logit-normal", 0.0, 1.0, None, "sigma_sqrt")
    assert config["distilled_guidance"] == (1.0 if name == "flux" else None)
    assert "flow matching" in (out / "README.md").read_text()


def test_sd3_ctrl_c_then_resume_ends_with_the_same_weights_as_never_stopping(tiny_flow_models, dataset, tmp_path,
                                                                            make_config):
    model = tiny_flow_models["sd3"]
    # With DreamBooth class images, made by the base SD3 model in the first run and reused by the others.
    settings = dict(resolution=16, max_steps=5, batch_size=2, gradient_accumulation=2, flip=True, uncond_prob=0.3,
                    lr_scheduler="cosine", lr_warmup_steps=2, ema=True, ema_decay=0.9, timestep_sampling="mode",
                    mode_scale=1.0, weighting_scheme="cosmap", checkpoint_every=0, seed=11,
                    class_data=tmp_path / "class", class_prompt="a shape", num_class_images=3)
    whole = finetune(make_config(dataset, tmp_path / "whole", model, **settings))

    def press_ctrl_c(info):
        if info.step == 2:
            signal.raise_signal(signal.SIGINT)  # the loop stops after the next step and checkpoints

    with pytest.raises(KeyboardInterrupt):
        finetune(make_config(dataset, tmp_path / "split", model, **settings), callback=press_ctrl_c)
    assert [p.name for p in checkpoint_dirs(tmp_path / "split")] == ["checkpoint-000003"]
    with pytest.raises(UsageError, match=r"settings differ.*weighting_scheme \('cosmap' -> 'none'\)"):
        finetune(make_config(dataset, tmp_path / "split", model, resume="latest", **{**settings,
                                                                                    "weighting_scheme": "none"}))
    resumed = finetune(make_config(dataset, tmp_path / "split", model, resume="latest", **settings))

    assert resumed.steps == whole.steps == 5 and resumed.losses == whole.losses[3:]
    assert len(list((tmp_path / "class").glob("*.png"))) == 3
    a = load_file(str(tmp_path / "whole" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "split" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_sd3_fine_tune_is_a_pipeline_folder_with_a_trained_transformer(tiny_flow_models, dataset, tmp_path,
                                                                            make_config):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    out = tmp_path / "full"
    finetune(make_config(dataset, out, tiny_flow_models["sd3"], resolution=16, lora=False, max_steps=2))
    original = DiffusionPipeline.from_pretrained(tiny_flow_models["sd3"])
    trained = DiffusionPipeline.from_pretrained(str(out))
    assert isinstance(trained, StableDiffusion3Pipeline) and list(out.glob("transformer/*.safetensors"))
    assert not torch.allclose(_transformer_out(trained.transformer, "sd3", None),
                              _transformer_out(original.transformer, "sd3", None), atol=1e-6)
    for a, b in zip(trained.vae.parameters(), original.vae.parameters()):
        assert torch.equal(a, b)  # the VAE is never trained
    for a, b in zip(trained.text_encoder_3.parameters(), original.text_encoder_3.parameters()):
        assert torch.equal(a, b)
    settings = json.loads((out / "training_settings.json").read_text())
    assert settings["method"] == "full" and "full transformer fine-tune" in (out / "README.md").read_text()


BAD = [
    ("sd1", ["--timestep-sampling", "logit-normal"], "--timestep-sampling is a flow-matching option"),
    ("sd1", ["--weighting-scheme", "cosmap"], "--weighting-scheme is a flow-matching option"),
    ("sd1", ["--distilled-guidance", "1"], "--distilled-guidance: this sd1 model has no guidance input"),
    ("sd3", ["--snr-gamma", "5"], "--snr-gamma is a loss weighting for DDPM models"),
    ("flux", ["--debiased-loss"], "--debiased-loss is a loss weighting for DDPM models"),
    ("sd1", ["--debiased-loss", "--snr-gamma", "5"], "--snr-gamma and --debiased-loss are two loss weightings"),
    ("sd1", ["--debiased-snr-floor", "0.01"], "--debiased-snr-floor sets a floor under --debiased-loss's weighting"),
    ("flux", ["--noise-offset", "0.05"], "--noise-offset: this flux model trains by flow matching"),
    ("sd3", ["--train-text-encoder"], "--train-text-encoder: finetune trains the transformer only"),
    ("sd3", ["--distilled-guidance", "2"], "--distilled-guidance: this sd3 model has no guidance input"),
    ("flux-schnell", ["--distilled-guidance", "2"], "--distilled-guidance: this flux model has no guidance input"),
    ("sd3", ["--logit-mean", "0.5"], "--logit-mean shapes --timestep-sampling logit-normal, which was not chosen"),
    ("sd3", ["--timestep-sampling", "mode", "--mode-scale", "3"], "--mode-scale must be between -1 and 1.75"),
    ("sd3", ["--timestep-sampling", "logit-normal", "--logit-std", "0"], "--logit-std must be positive"),
    ("sd3", ["--resolution", "64"], "--resolution 64 is larger than this model's position embedding covers (32)"),
    ("flux-schnell", ["--validation-guidance", "3"], "--validation-guidance: this flux model has no guidance"),
]


@pytest.mark.parametrize("name,args,message", BAD, ids=[" ".join(b[1]) + " on " + b[0] for b in BAD])
def test_options_the_objective_lacks_are_one_line_exit_2_before_training(cli, tiny_models, tiny_flow_models, dataset,
                                                                 tmp_path, name, args, message):
    model = {**tiny_models, **tiny_flow_models}[name]
    result = cli("finetune", "--data", dataset, "--model", model, "--out", tmp_path / "out", "--max-steps", "1",
                 "--quiet", *args)
    assert message in one_error_line(result, 2)  # a usage error, as the other refused options are
    assert not (tmp_path / "out" / "loss.csv").exists()


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_validation_images_and_generate_lora_are_plain_diffusers_with_the_lora(cli, tiny_flow_models, dataset,
                                                                             tmp_path, name):
    import numpy as np
    from diffusers import DiffusionPipeline
    from PIL import Image

    model, out = tiny_flow_models[name], tmp_path / "lora"
    # SD3's classifier-free scale; Flux-dev's distilled guidance (diffusers' default 3.5 there, so none is given).
    guidance = ["--guidance", "7.5"] if name == "sd3" else []
    validation = ["--validation-guidance", "7.5"] if name == "sd3" else []
    result = cli("finetune", "--data", dataset, "--model", model, "--out", out, "--resolution", "16",
                 "--max-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--checkpoint-every", "0",
                 "--validation-prompt", "a red circle", "--validation-every", "2", "--validation-steps", "3",
                 *validation, "--quiet")
    assert result.exit_code == 0, result.stderr
    shown = out / "validation" / "step-000002" / "00-a-red-circle.png"
    png = tmp_path / "gen.png"
    made = cli("generate", "a red circle", "--model", model, "--lora", out, "--seed", "0", "--steps", "3", *guidance,
               "--width", "16", "--height", "16", "--out", png, "--quiet")
    assert made.exit_code == 0, made.stderr

    pipe = DiffusionPipeline.from_pretrained(model)
    kwargs = dict(num_inference_steps=3, height=16, width=16, **({"guidance_scale": 7.5} if name == "sd3" else {}))
    reference = np.asarray(pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images[0])
    pipe.load_lora_weights(str(out))
    expected = np.asarray(pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images[0])
    produced = np.asarray(Image.open(png).convert("RGB"))
    assert np.array_equal(produced, expected)
    assert not np.array_equal(produced, reference)  # and the LoRA did change the picture
    # The last validation image is that same picture, made from the weights in training.
    assert np.abs(np.asarray(Image.open(shown).convert("RGB"), dtype=int) - produced.astype(int)).max() <= 1


def test_auto_precision_is_bf16_for_flow_models_on_a_card_with_it(tiny_flow_models, tiny_sd, monkeypatch, tmp_path):
    # SD3 and Flux overflow float16; diffusers' recipes train them in bf16. The CPU always trains in float32.
    from sdcli.training import FinetuneConfig, setup

    def auto(model, device, bf16=True):
        monkeypatch.setattr(setup, "_bf16_supported", lambda: bf16)
        return setup.auto_precision(FinetuneConfig(data=tmp_path, out=tmp_path / "o", model=model), device)

    assert auto(tiny_flow_models["sd3"], "cuda") == "bf16" and auto(tiny_flow_models["flux"], "cuda") == "bf16"
    assert auto(tiny_sd, "cuda") == "fp16"
    assert auto(tiny_flow_models["sd3"], "cuda", bf16=False) == "fp16"  # a T4 or V100
    assert auto(tiny_flow_models["sd3"], "cpu") == "no"
