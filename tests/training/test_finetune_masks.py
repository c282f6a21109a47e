"""Masked loss: each latent pixel's squared error weighted by its loss mask, downsampled to the latent, the mask
cropped, mirrored and bucketed with its image (live and cached alike)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sdcli.training.data import Item, discover
from sdcli.training.inputs import TrainingInputs
from sdcli.training.objective import sample_noise, sample_timesteps, step_loss, training_scheduler

from conftest import one_error_line


def _pipe(path):
    from sdcli.pipeline import load_pipeline

    return load_pipeline(path, device="cpu").pipe


def _mask(path, size, white_columns):
    """A mask file of ``size`` (w, h): white in the first ``white_columns`` columns, black elsewhere."""
    w, h = size
    a = np.zeros((h, w), dtype=np.uint8)
    a[:, :white_columns] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "L").save(path, lossless=True)  # (webp: lossless)
    return path


def _inputs(pipe, examples, *, cached=False, center=True, sizes=None, unmasked=0.0):
    inputs = TrainingInputs(pipe, examples, sizes=sizes, resolution=16, center_crop=center, device="cpu",
                            cache_latents=cached, cache_text=cached, unmasked_weight=unmasked)
    if cached:
        inputs.build_cache(flip=True)
    return inputs


def test_the_masked_loss_is_the_mask_weighted_mean_squared_error_by_hand(tiny_sd, tmp_path, make_images):
    make_images(tmp_path / "data", n=1)  # 16x16: the tiny VAE halves it to an 8x8 latent
    _mask(tmp_path / "masks" / "img00.png", (16, 16), white_columns=5)
    examples = discover(tmp_path / "data", masks=tmp_path / "masks").examples
    pipe = _pipe(tiny_sd)
    batch = _inputs(pipe, examples, unmasked=0.25).batch([Item(0)], torch.Generator().manual_seed(1))
    # Latent column x covers pixel columns 2x and 2x+1: columns 0-1 white (1), column 2 half (pixels 4 white, 5
    # black: m = 0.5, w = 0.5 + 0.25 * 0.5), the rest black (the unmasked weight 0.25).
    assert batch.weights.shape == (1, 1, 8, 8)
    assert batch.weights[0, 0, 0].tolist() == [1.0, 1.0, 0.625, 0.25, 0.25, 0.25, 0.25, 0.25]
    assert torch.equal(batch.weights[0, 0], batch.weights[0, 0, :1].expand(8, 8))

    scheduler = training_scheduler(pipe.scheduler.config)
    with torch.no_grad():
        loss = step_loss(pipe.unet, scheduler, batch.latents, batch.cond, torch.Generator().manual_seed(7),
                         mask=batch.weights)
        plain = step_loss(pipe.unet, scheduler, batch.latents, batch.cond, torch.Generator().manual_seed(7))
        # By hand: the same draws (noise, then t), x_t, the ε prediction, and the weighted mean of the squares.
        g = torch.Generator().manual_seed(7)
        noise = sample_noise(batch.latents, g)
        t = sample_timesteps(1, scheduler.config.num_train_timesteps, g, "cpu")
        eps = pipe.unet(scheduler.add_noise(batch.latents, noise, t), t, **batch.cond).sample
        w = torch.tensor([1.0, 1.0, 0.625] + [0.25] * 5).view(1, 1, 1, 8)
        by_hand = (w * (eps - noise) ** 2).sum() / eps.numel()
    torch.testing.assert_close(loss, by_hand, rtol=1e-6, atol=0)
    torch.testing.assert_close(plain, ((eps - noise) ** 2).mean(), rtol=1e-6, atol=0)
    assert loss < plain


def test_masks_follow_crops_flips_buckets_and_the_cache_and_another_size_is_resized(tiny_sd, tmp_path, make_images):
    make_images(tmp_path / "data", n=1, size=(24, 16))
    # Twice the image's size, white on its left third: resized to the image, white on pixel columns 0-7.
    _mask(tmp_path / "masks" / "img00.webp", (48, 32), white_columns=16)
    report = discover(tmp_path / "data", masks=tmp_path / "masks")
    assert "note: 1 mask of another size than their image resized to it: img00.webp (48x32 for 24x16)" in \
        "\n".join(report.lines())
    pipe = _pipe(tiny_sd)

    def white_latent_columns(inputs, item):
        weights = inputs.batch([item], torch.Generator().manual_seed(0)).weights[0, 0]
        assert torch.equal(weights, weights[:1].expand_as(weights))  # columns only, as the mask is
        # More white than black (resizing the mask blurs its edge a little, as it does the image's).
        return [x for x, v in enumerate(weights[0].tolist()) if v > 0.5], weights.shape[-1]

    live = _inputs(pipe, report.examples)
    # Centre crop of the 24-wide image to 16: pixel columns 4-19, so white 4-7, latent columns 0-1.
    assert white_latent_columns(live, Item(0)) == ([0, 1], 8)
    assert white_latent_columns(live, Item(0, flip=True)) == ([6, 7], 8)
    cached = _inputs(pipe, report.examples, cached=True)
    for item in (Item(0), Item(0, flip=True)):
        assert white_latent_columns(cached, item) == white_latent_columns(live, item)
    # A random crop at the left edge keeps pixel columns 0-15: white 0-7, latent columns 0-3.
    assert white_latent_columns(_inputs(pipe, report.examples, center=False), Item(0, crop=(0.0, 0.0))) == \
        ([0, 1, 2, 3], 8)
    # A 24x16 bucket takes the whole image: a latent 12 wide, white 0-3.
    assert white_latent_columns(_inputs(pipe, report.examples, sizes=[(24, 16)]), Item(0)) == ([0, 1, 2, 3], 12)


def _broken_mask(root, data):
    (root / "masks").mkdir()
    (root / "masks" / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return ["--masks", root / "masks"], "the loss mask", "img01.png"


def _missing_in_metadata(root, data):
    rows = [{"file_name": f"img0{i}.png", "text": "x", "mask": f"m{i}.png"} for i in range(2)]
    _mask(data / "m0.png", (16, 16), 3)
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [], "the loss mask m1.png of img01.png", "no such file"


def _no_folder(root, data):
    return ["--masks", root / "nowhere"], "--masks", "does not exist"


@pytest.mark.parametrize("case", [_broken_mask, _missing_in_metadata, _no_folder])
def test_a_mask_that_cannot_be_read_is_refused_naming_it_before_the_model_loads(cli, tiny_sd, tmp_path, make_images,
                                                                              no_pipeline_loads, case):
    data = tmp_path / "data"
    make_images(data, n=2, captions="txt")
    extra, *expected = case(tmp_path, data)
    result = cli("finetune", "--data", data, "--model", tiny_sd, "--out", tmp_path / "out", "--max-steps", "1",
                 "--quiet", *extra)
    line = one_error_line(result)
    assert all(part in line for part in expected), line
    assert not no_pipeline_loads and not (tmp_path / "out").exists()


def test_finetune_trains_on_masks_from_metadata_and_alpha(tiny_sd, tmp_path, make_images, make_config, capsys):
    from sdcli.training import finetune

    data = tmp_path / "data"
    make_images(data, n=4, captions="none")
    rows = [{"file_name": f"img0{i}.png", "text": "a shape", **({"mask": f"masks/m{i}.png"} if i < 2 else {})}
            for i in range(4)]
    for i in range(2):
        _mask(data / "masks" / f"m{i}.png", (16, 16), 4)
    for i in (2, 3):  # an alpha channel: transparent on the right half
        rgba = Image.open(data / f"img0{i}.png").convert("RGBA")
        alpha = np.full((16, 16), 255, np.uint8)
        alpha[:, 8:] = 0
        rgba.putalpha(Image.fromarray(alpha))
        rgba.save(data / f"img0{i}.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = dict(max_steps=2, flip=True, quiet=False)
    masked = finetune(make_config(data, tmp_path / "masked", tiny_sd, alpha_mask=True, **settings))
    assert "loss masks: 2 from metadata, 2 from alpha" in capsys.readouterr().err
    whole = finetune(make_config(data, tmp_path / "whole", tiny_sd, alpha_mask=True, unmasked_weight=1.0, **settings))
    # The same pictures with no masks at all.
    shutil.copytree(data, tmp_path / "unmasked", ignore=shutil.ignore_patterns("masks"))
    (tmp_path / "unmasked" / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": r["file_name"], "text": r["text"]}) + "\n" for r in rows))
    plain = finetune(make_config(tmp_path / "unmasked", tmp_path / "plain", tiny_sd, **settings))
    # The masks are not training images; a weight of 1 everywhere is the plain loss.
    record = json.loads((tmp_path / "masked" / "training_settings.json").read_text())
    assert record["data"]["images"] == 4 and record["config"]["alpha_mask"] is True
    assert all(m < p for m, p in zip(masked.losses, plain.losses))
    assert whole.losses == pytest.approx(plain.losses, rel=1e-5)
