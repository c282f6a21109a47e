"""DreamBooth prior preservation: the loss, class images made once and reused, and what is refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import one_error_line

from sdcli.training import finetune
from sdcli.training.objective import flow_step_loss, prior_preservation_loss, step_loss, training_scheduler

T = 1000


class TwoPredictions:
    """Stands in for the denoiser: returns the next fixed prediction each call and remembers what it saw."""

    def __init__(self, *predictions):
        self.predictions, self.seen = list(predictions), []

    def __call__(self, sample, timestep, return_dict=False, **cond):
        self.seen.append((sample.clone(), timestep.clone()))
        out = self.predictions[len(self.seen) - 1]
        return (out,)


def _abar():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_ddpm_prior_loss_is_instance_mse_plus_weight_times_class_mse(weight):
    scheduler = training_scheduler({"_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                                    "beta_schedule": "scaled_linear", "num_train_timesteps": T,
                                    "prediction_type": "epsilon"})
    torch.manual_seed(0)
    instance, klass = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 6, 10)  # two buckets: two shapes
    pred_i, pred_c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 6, 10)
    unet = TwoPredictions(pred_i, pred_c)
    g = torch.Generator().manual_seed(7)
    cond = {"encoder_hidden_states": None}
    loss = prior_preservation_loss(lambda: step_loss(unet, scheduler, instance, cond, g),
                                   lambda: step_loss(unet, scheduler, klass, cond, g), weight)

    # By hand: the instance batch's draws first, then the class batch's, from the one generator.
    h = torch.Generator().manual_seed(7)
    expected = torch.tensor(0.0)
    for x0, pred, w in ((instance, pred_i, 1.0), (klass, pred_c, weight)):
        noise = torch.randn(x0.shape, generator=h)
        t = torch.randint(0, T, (x0.shape[0],), generator=h)
        abar = _abar()[t].float().view(-1, 1, 1, 1)
        expected = expected + w * ((pred - noise) ** 2).mean()
        seen = unet.seen[0 if x0 is instance else 1]
        torch.testing.assert_close(seen[0], abar.sqrt() * x0 + (1 - abar).sqrt() * noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_flow_prior_loss_is_the_same_objective_on_the_class_batch():
    from sdcli.training.objective import flow_training_scheduler

    scheduler = flow_training_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": T,
                                         "shift": 1.0})
    torch.manual_seed(1)
    instance, klass = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    pred_i, pred_c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    calls = []

    def predict_with(pred):
        def predict(noisy, timesteps):
            calls.append(noisy)
            return pred
        return predict

    g = torch.Generator().manual_seed(3)
    loss = prior_preservation_loss(lambda: flow_step_loss(predict_with(pred_i), scheduler, instance, g),
                                   lambda: flow_step_loss(predict_with(pred_c), scheduler, klass, g), 0.5)
    h = torch.Generator().manual_seed(3)
    expected = torch.tensor(0.0)
    for x0, pred, w in ((instance, pred_i, 1.0), (klass, pred_c, 0.5)):
        noise = torch.randn(x0.shape, generator=h)
        u = torch.rand(x0.shape[0], generator=h)
        sigma = ((T - (u * T).long().clamp(0, T - 1)) / T).view(-1, 1, 1, 1)
        expected = expected + w * ((pred - (noise - x0)) ** 2).mean()
        torch.testing.assert_close(calls[0 if x0 is instance else 1], (1 - sigma) * x0 + sigma * noise,
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_class_images_are_generated_once_with_records_and_reused(tiny_sd, dataset, tmp_path, make_config, capsys):
    from PIL import Image

    from sdcli.generation.metadata import read_settings

    classes = tmp_path / "class"
    settings = dict(class_data=classes, class_prompt="a photo of a shape", num_class_images=3, max_steps=2,
                    quiet=False)
    first = finetune(make_config(dataset, tmp_path / "one", tiny_sd, **settings))
    assert first.steps == 2
    said = capsys.readouterr().err
    assert "(3 generated, 0 reused)" in said
    # stderr is not a terminal here: the class images and the cache say how far they are, as training does.
    assert f"generating 3 class images of 'a photo of a shape' in {classes}" in said
    assert re.search(r"^class images 1/\d+  .*  eta \d+:\d\d:\d\d$", said, re.M)
    assert re.search(r"^caching (\d+)/\1  .*  eta 0:00:00$", said, re.M)
    images = sorted(classes.glob("*.png"))
    assert len(images) == 3
    for image in images:
        assert Image.open(image).size == (16, 16)
        assert image.with_suffix(".txt").read_text().strip() == "a photo of a shape"
        record = read_settings(image)  # made by generate's own code, so it carries its record
        assert record["prompt"] == "a photo of a shape" and record["finetune_class_image"]
    made = {p.name: p.read_bytes() for p in images}
    record = json.loads((tmp_path / "one" / "training_settings.json").read_text())["prior_preservation"]
    assert (record["class_prompt"], record["prior_loss_weight"], record["images"], record["generated"],
            record["reused"]) == ("a photo of a shape", 1.0, 3, 3, 0)

    finetune(make_config(dataset, tmp_path / "two", tiny_sd, **settings))
    assert "(0 generated, 3 reused)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in classes.glob("*.png")} == made
    again = json.loads((tmp_path / "two" / "training_settings.json").read_text())
    assert again["prior_preservation"]["generated"] == 0 and again["config"]["class_data"] == str(classes)


def test_class_data_changes_what_trains(tiny_sd, dataset, tmp_path, make_config, make_images):
    classes = make_images(tmp_path / "class", n=2, size=(24, 16), captions="none")[0].parent
    plain = finetune(make_config(dataset, tmp_path / "plain", tiny_sd, max_steps=2))
    prior = finetune(make_config(dataset, tmp_path / "prior", tiny_sd, max_steps=2, class_data=classes,
                                 class_prompt="a shape", prior_loss_weight=2.0))
    assert prior.losses[0] > plain.losses[0]  # the same instance draws, plus a positive class term


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--class-data", "{empty}", "--class-prompt", "a dog"], "has no images; add class images or pass "
                                                                  "--num-class-images"),
        (["--class-data", "{missing}", "--class-prompt", "a dog"], "does not exist"),
        (["--class-data", "{classes}"], "needs --class-prompt"),
        (["--class-prompt", "a dog"], "--class-prompt is for DreamBooth prior preservation, which needs --class-data"),
        (["--prior-loss-weight", "1"], "--prior-loss-weight is for DreamBooth"),
        (["--class-data", "{classes}", "--class-prompt", "a dog", "--prior-loss-weight", "0"],
         "--prior-loss-weight must be positive and at most 1000, got 0"),
        (["--class-data", "{classes}", "--class-prompt", "a dog", "--prior-loss-weight", "-1"],
         "--prior-loss-weight must be positive and at most 1000, got -1"),
        (["--class-data", "{classes}", "--class-prompt", "a dog", "--num-class-images", "-2"],
         "--num-class-images must not be negative, got -2"),
    ],
    ids=["empty-folder", "missing-folder", "no-prompt", "no-folder", "weight-alone", "weight-0", "weight-negative",
         "count-negative"],
)
def test_bad_dreambooth_options_are_one_line_and_write_nothing(cli, tiny_sd, dataset, tmp_path, make_images, args,
                                                               message):
    (tmp_path / "empty").mkdir()
    make_images(tmp_path / "classes", n=1)
    folders = {"{empty}": tmp_path / "empty", "{missing}": tmp_path / "missing", "{classes}": tmp_path / "classes"}
    args = [folders.get(a, a) for a in args]
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "out", "--max-steps", "2",
                 *args)
    assert message in one_error_line(result, 2)
    assert not (tmp_path / "out").exists() and not (tmp_path / "missing").exists()
    assert list((tmp_path / "empty").iterdir()) == []
