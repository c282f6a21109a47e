"""The cache changes how fast a step is, never what it computes."""

from __future__ import annotations

import pytest
import torch

from sdcli import defaults
from sdcli.training.data import Item, discover, to_pixels, load_rgb
from sdcli.training.inputs import TrainingInputs
from sdcli.training.objective import step_loss, training_scheduler


def _pipe(path):
    from sdcli.pipeline import load_pipeline

    return load_pipeline(path, device="cpu").pipe


def _inputs(pipe, examples, cached: bool):
    inputs = TrainingInputs(pipe, examples, resolution=16, center_crop=True, device=torch.device("cpu"),
                            cache_latents=cached, cache_text=cached)
    if cached:
        inputs.build_cache(flip=True, batch_size=3)
    return inputs


ITEMS = [Item(0), Item(1, flip=True), Item(2, drop=True), Item(3, flip=True, drop=True), Item(1)]


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_cached_and_live_batches_give_the_same_loss(tiny_models, tmp_path, make_images, family):
    root = tmp_path / "data"
    make_images(root, n=4, size=(24, 16))  # not square: the crop matters
    examples = discover(root).examples
    pipe = _pipe(tiny_models[family])
    cached, live = _inputs(pipe, examples, True), _inputs(pipe, examples, False)
    a = cached.batch(ITEMS, torch.Generator().manual_seed(3))
    b = live.batch(ITEMS, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.cond["encoder_hidden_states"], b.cond["encoder_hidden_states"], rtol=1e-5, atol=1e-5)
    if family == "sdxl":
        for key in ("text_embeds", "time_ids"):
            torch.testing.assert_close(a.cond["added_cond_kwargs"][key], b.cond["added_cond_kwargs"][key])
        # (original h, w, crop top, left, target h, w); the mirrored crop is measured from the other side
        assert a.cond["added_cond_kwargs"]["time_ids"][:2].tolist() == [[16, 24, 0, 4, 16, 16], [16, 24, 0, 4, 16, 16]]
    scheduler = training_scheduler(pipe.scheduler.config)
    with torch.no_grad():
        la = step_loss(pipe.unet, scheduler, a.latents, a.cond, torch.Generator().manual_seed(5), snr_gamma=5.0)
        lb = step_loss(pipe.unet, scheduler, b.latents, b.cond, torch.Generator().manual_seed(5), snr_gamma=5.0)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)


def test_flip_is_the_latent_of_the_mirrored_image_and_draws_differ(tiny_sd, tmp_path, make_images):
    root = tmp_path / "data"
    make_images(root, n=2, size=(24, 16))
    examples = discover(root).examples
    pipe = _pipe(tiny_sd)
    inputs = _inputs(pipe, examples, True)
    px, _ = to_pixels(load_rgb(examples[1].path), 16, flip=True)
    with torch.no_grad():
        expected = pipe.vae.encode(px[None]).latent_dist.mean
    torch.testing.assert_close(inputs.mean[1][1][None], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(inputs.mean[1][0], inputs.mean[1][1])
    one = inputs.batch([Item(0)], torch.Generator().manual_seed(0)).latents
    two = inputs.batch([Item(0)], torch.Generator().manual_seed(1)).latents
    assert not torch.equal(one, two)  # a fresh sample of the latent distribution each step, not a frozen one


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_dropped_captions_get_the_unconditional_embedding_generate_uses(tiny_models, tmp_path, make_images, family):
    root = tmp_path / "data"
    make_images(root, n=2)
    examples = discover(root).examples
    pipe = _pipe(tiny_models[family])
    inputs = _inputs(pipe, examples, True)
    batch = inputs.batch([Item(0, drop=True), Item(1)], torch.Generator().manual_seed(0))
    # What the pipeline feeds the unconditional branch when `sdcli generate` passes no negative prompt.
    with torch.no_grad():
        if family == "sdxl":
            _, neg, _, neg_pooled = pipe.encode_prompt("a cat", device="cpu", do_classifier_free_guidance=True,
                                                       negative_prompt=None)
            torch.testing.assert_close(batch.cond["added_cond_kwargs"]["text_embeds"][0], neg_pooled[0])
        else:
            _, neg = pipe.encode_prompt("a cat", "cpu", 1, True, negative_prompt=None)
        conditional, _ = inputs.text.encode([examples[1].caption])
    torch.testing.assert_close(batch.cond["encoder_hidden_states"][0], neg[0])
    torch.testing.assert_close(batch.cond["encoder_hidden_states"][1], conditional[0])
    assert inputs.prompts[0] == defaults.NULL_PROMPT and len(inputs.prompts) == 3
