"""The validation loss (held-out images at fixed timesteps and noise) and --log-with's trackers."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from conftest import one_error_line
from sdcli.training import finetune, validation
from sdcli.training.data import Item, discover, hold_out, mix_seed
from sdcli.families import BY_NAME as FAMILIES
from sdcli.training.inputs import TrainingInputs

QUICK = ("--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "0", "--lr", "1e-2", "--quiet")


def _rows(out):
    with (out / "loss.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _pipe(path):
    from sdcli.pipeline import load_pipeline

    return load_pipeline(path, device="cpu").pipe


class _OneProcess:
    """What `validation.held_out_loss` asks of an accelerator, for one CPU process."""

    process_index, num_processes, device = 0, 1, "cpu"


# 1. The split ------------------------------------------------------------------------------------------


def test_the_split_is_a_function_of_the_seed_and_holds_out_whole_images(make_images, tmp_path):
    make_images(tmp_path / "data", n=10)
    report = discover(tmp_path / "data")
    train, held = hold_out(report, 0.3, seed=5)
    assert len(held) == 3 and len(train.examples) == 7 and len(report.examples) == 10  # the input is untouched
    assert {e.path for e in held}.isdisjoint(e.path for e in train.examples)
    assert [e.path for e in hold_out(discover(tmp_path / "data"), 0.3, seed=5)[1]] == [e.path for e in held]
    assert len({tuple(e.path.name for e in hold_out(report, 0.3, seed=s)[1]) for s in range(6)}) > 1
    # An image counted several times (--data DIR:N) goes wholly to one side.
    report.examples.append(report.examples[0])
    train, held = hold_out(report, 0.3, seed=5)
    assert {e.path for e in held}.isdisjoint(e.path for e in train.examples) and len(held) == 3


# 2. The loss: the objective at fixed levels and noise --------------------------------------------------


def _abar(config, t):
    """Stable Diffusion's scaled-linear ᾱ_t, written out rather than read from diffusers."""
    assert config.beta_schedule == "scaled_linear"
    T = config.num_train_timesteps
    betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)[t].float().view(-1, 1, 1, 1)


@pytest.mark.parametrize("family", ["sd1", "sd2"])  # epsilon and v-prediction
def test_ddpm_validation_loss_is_the_objective_written_out_by_hand(tiny_models, dataset, family):
    from sdcli.training.objective import training_scheduler

    pipe = _pipe(tiny_models[family])
    fam = FAMILIES[family]
    inputs = TrainingInputs(pipe, discover(dataset).examples, family=fam, resolution=16, center_crop=True,
                            device="cpu", cache_latents=True, cache_text=True)
    inputs.build_cache(False)
    scheduler = training_scheduler(pipe.scheduler.config)
    levels = validation.noise_levels(fam, scheduler, "cpu")
    assert levels.tolist() == [125, 375, 625, 875]  # spread evenly over T = 1000
    cfg = type("Cfg", (), {"snr_gamma": None, "debiased_loss": False, "debiased_snr_floor": None})()
    loss_at = validation.loss_function(cfg, fam, pipe, scheduler, pipe.unet)
    with torch.no_grad():
        loss = validation.image_loss(loss_at, inputs, 2, 9, levels, "cpu")

        # By hand: the image's latent samples and its noise from the generator seeded by (seed, image) ...
        g = torch.Generator().manual_seed(mix_seed(9, 4, 2))
        batch = inputs.batch([Item(2)] * 4, g)
        x0, noise = batch.latents, torch.randn(batch.latents.shape, generator=g)
        # ... noised in one jump at the fixed t, and regressed onto ε or v.
        t = torch.tensor([125, 375, 625, 875])
        abar = _abar(pipe.scheduler.config, t)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        target = noise if family == "sd1" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
        hidden = inputs.hidden[[inputs.prompt_index[2]] * 4]  # the caption, never dropped
        expected = ((pipe.unet(x_t, t, hidden).sample - target) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert inputs.prompt_of(Item(2)) == "a green triangle"
    # The same image and seed give the same loss again; another seed draws other noise.
    with torch.no_grad():
        assert torch.equal(validation.image_loss(loss_at, inputs, 2, 9, levels, "cpu"), loss)
        assert not torch.allclose(validation.image_loss(loss_at, inputs, 2, 10, levels, "cpu"), loss)


def test_flow_validation_loss_is_the_objective_written_out_by_hand(tiny_flow_models, dataset):
    from sdcli.training.objective import flow_training_scheduler

    pipe = _pipe(tiny_flow_models["sd3"])
    fam = FAMILIES["sd3"]
    inputs = TrainingInputs(pipe, discover(dataset).examples, family=fam, resolution=16, center_crop=True,
                            device="cpu", cache_latents=False, cache_text=False)
    scheduler = flow_training_scheduler(pipe.scheduler.config)
    levels = validation.noise_levels(fam, scheduler, "cpu")
    # σ evenly spaced over the schedule (0.875 ... 0.125), through SD3's static shift 3: σ' = 3σ / (1 + 2σ).
    base = torch.tensor([0.875, 0.625, 0.375, 0.125], dtype=torch.float64)
    sigma = 3 * base / (1 + 2 * base)
    torch.testing.assert_close(levels[0].double(), sigma, rtol=1e-6, atol=1e-6)
    cfg = type("Cfg", (), {"distilled_guidance": None, "weighting_scheme": "none"})()
    loss_at = validation.loss_function(cfg, fam, pipe, scheduler, pipe.transformer)
    with torch.no_grad():
        loss = validation.image_loss(loss_at, inputs, 0, 3, levels, "cpu")
        g = torch.Generator().manual_seed(mix_seed(3, 4, 0))
        batch = inputs.batch([Item(0)] * 4, g)
        x0, noise = batch.latents, torch.randn(batch.latents.shape, generator=g)
        s = sigma.float().view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        prediction = pipe.transformer(hidden_states=x_t, timestep=sigma.float() * 1000, **batch.cond).sample
        expected = ((prediction - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_validation_loss_moves_only_when_the_model_does(tiny_sd, dataset):
    from sdcli.training.objective import training_scheduler

    pipe = _pipe(tiny_sd)
    fam = FAMILIES["sd1"]
    inputs = TrainingInputs(pipe, discover(dataset).examples, family=fam, resolution=16, center_crop=True,
                            device="cpu", cache_latents=True, cache_text=True)
    inputs.build_cache(False)
    scheduler = training_scheduler(pipe.scheduler.config)
    levels = validation.noise_levels(fam, scheduler, "cpu")
    loss_at = validation.loss_function(type("Cfg", (), {"snr_gamma": None, "debiased_loss": False, "debiased_snr_floor": None})(), fam, pipe, scheduler, pipe.unet)
    first = validation.held_out_loss(loss_at, inputs, 0, levels, _OneProcess())
    torch.randn(100)  # the global RNG moves on; the validation loss does not
    assert validation.held_out_loss(loss_at, inputs, 0, levels, _OneProcess()) == first
    with torch.no_grad():
        pipe.unet.conv_out.bias += 0.05
    assert validation.held_out_loss(loss_at, inputs, 0, levels, _OneProcess()) != first


# 3. In a run: loss.csv, the record, the progress line, the resume --------------------------------------


def test_two_runs_with_the_same_seed_log_the_same_validation_loss(tiny_sd, dataset, tmp_path, make_config, capsys):
    from diffusers import DiffusionPipeline

    from sdcli.training.objective import training_scheduler

    settings = dict(max_steps=5, validation_split=0.25, validation_every=2, flip=True, uncond_prob=0.5, seed=3)
    first = finetune(make_config(dataset, tmp_path / "a", tiny_sd, quiet=False, **settings))
    second = finetune(make_config(dataset, tmp_path / "b", tiny_sd, **settings))
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]
    assert first.val_losses == second.val_losses and sorted(first.val_losses) == [2, 4, 5]  # and the last step
    assert [bool(r["val_loss"]) for r in a] == [False, True, False, True, True]
    assert len(set(first.val_losses.values())) == 3  # the model moved, so did the loss
    assert "val_loss" in capsys.readouterr().err  # on the progress line

    record = json.loads((tmp_path / "a" / "training_settings.json").read_text())
    held = [e.path.name for e in hold_out(discover(dataset), 0.25, seed=3)[1]]
    assert record["validation"]["images"] == held and len(held) == 1
    assert record["validation"]["timesteps"] == [125, 375, 625, 875]
    assert record["data"]["images"] == 3  # the held-out image did not train
    assert record["validation"]["final_val_loss"] == float(a[-1]["val_loss"])

    # The logged value is the objective's on the saved weights, recomputed here from plain diffusers.
    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    pipe.load_lora_weights(str(tmp_path / "a"))
    examples = [e for e in discover(dataset).examples if e.path.name in held]
    inputs = TrainingInputs(pipe, examples, family=FAMILIES["sd1"], resolution=16, center_crop=True, device="cpu",
                            cache_latents=False, cache_text=False)
    scheduler = training_scheduler(pipe.scheduler.config)
    loss_at = validation.loss_function(type("Cfg", (), {"snr_gamma": None, "debiased_loss": False, "debiased_snr_floor": None})(), FAMILIES["sd1"], pipe, scheduler,
                                       pipe.unet)
    again = validation.held_out_loss(loss_at, inputs, 3, validation.noise_levels(FAMILIES["sd1"], scheduler, "cpu"),
                                     _OneProcess())
    assert again == pytest.approx(first.val_losses[5], rel=1e-5)


def test_validation_data_folder_is_measured_and_not_trained_on(tiny_sd, dataset, tmp_path, make_config, make_images):
    held = make_images(tmp_path / "held", n=2)
    result = finetune(make_config(dataset, tmp_path / "o", tiny_sd, max_steps=2, validation_data=held[0].parent,
                                  validation_every=1))
    record = json.loads((tmp_path / "o" / "training_settings.json").read_text())
    assert record["data"]["images"] == 4 and record["validation"]["images"] == ["img00.png", "img01.png"]
    assert sorted(result.val_losses) == [1, 2] and all(v > 0 for v in result.val_losses.values())


@pytest.mark.parametrize("buckets", [True, False], ids=["buckets", "square"])
def test_held_out_images_are_measured_in_the_shape_they_would_train_at(tiny_sd, dataset, tmp_path, make_config,
                                                                       make_images, buckets):
    make_images(tmp_path / "held" / "square", n=1)
    make_images(tmp_path / "held" / "tall", n=1, size=(16, 24))
    result = finetune(make_config(dataset, tmp_path / "o", tiny_sd, max_steps=1, validation_data=tmp_path / "held",
                                  buckets=buckets))
    record = json.loads((tmp_path / "o" / "training_settings.json").read_text())["validation"]
    assert record["images"] == ["square/img00.png", "tall/img00.png"]
    assert record["sizes"] == ([[16, 16], [12, 20]] if buckets else [[16, 16], [16, 16]])  # as training's layout
    assert result.val_losses[1] > 0


def test_measuring_the_validation_loss_leaves_training_as_it_was(tiny_sd, dataset, tmp_path, make_config,
                                                                make_images):
    from safetensors.torch import load_file

    held = make_images(tmp_path / "held", n=1)[0].parent
    settings = dict(max_steps=4, ema=True, ema_decay=0.9, flip=True, uncond_prob=0.5, seed=2)
    plain = finetune(make_config(dataset, tmp_path / "a", tiny_sd, **settings))
    measured = finetune(make_config(dataset, tmp_path / "b", tiny_sd, validation_data=held, validation_every=1,
                                    **settings))
    assert measured.losses == plain.losses and sorted(measured.val_losses) == [1, 2, 3, 4]
    a, b = (load_file(str(tmp_path / run / "pytorch_lora_weights.safetensors")) for run in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA swap was undone, train mode restored


def test_validation_loss_for_a_flow_model(tiny_flow_models, dataset, tmp_path, make_config):
    result = finetune(make_config(dataset, tmp_path / "o", tiny_flow_models["flux"], resolution=16, max_steps=2,
                                  validation_split=0.5, validation_every=1))
    record = json.loads((tmp_path / "o" / "training_settings.json").read_text())
    assert len(record["validation"]["images"]) == 2
    assert record["validation"]["sigmas"] == pytest.approx([0.875, 0.625, 0.375, 0.125])  # Flux: unshifted
    assert sorted(result.val_losses) == [1, 2] and result.val_losses[1] != result.val_losses[2]


def test_loss_plot_draws_the_validation_loss(tmp_path):
    from sdcli.training import outputs

    log = outputs.LossLog(tmp_path / "loss.csv", None)
    for step in range(1, 7):
        log.append(step=step, epoch=0, loss=1.0 / step, lr=1e-4, images_per_s=1.0, elapsed_s=1.0,
                   val_loss={3: 0.5, 6: 0.25}.get(step))
    log.close()
    assert outputs.read_validation_losses(tmp_path / "loss.csv") == ([3, 6], [0.5, 0.25])
    assert outputs.read_losses(tmp_path / "loss.csv")[0] == [1, 2, 3, 4, 5, 6]
    import matplotlib.pyplot as plt

    lines = []
    real_savefig = plt.Figure.savefig
    plt.Figure.savefig = lambda fig, path, **kw: (lines.extend(fig.axes[0].get_lines()), real_savefig(fig, path, **kw))
    try:
        outputs.plot_loss(tmp_path / "loss.csv", tmp_path / "loss.png")
    finally:
        plt.Figure.savefig = real_savefig
    # Six steps: no running mean of one step beside the loss (the legend said "mean of last 1").
    assert [line.get_label() for line in lines] == ["loss", "validation (held out, fixed noise)"]
    assert list(lines[-1].get_xdata()) == [3, 6]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


# 4. Trackers ---------------------------------------------------------------------------------------------


def test_tensorboard_gets_the_scalars_and_the_validation_images(tiny_sd, dataset, tmp_path, make_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    finetune(make_config(dataset, out, tiny_sd, max_steps=4, log_with="tensorboard", validation_split=0.25,
                         validation_every=2, validation_prompts=["a red circle"], validation_steps=2))
    events = EventAccumulator(str(out / "logs" / "sdcli-finetune"), size_guidance={"images": 0})
    events.Reload()
    rows = _rows(out)
    assert {"train/loss", "train/lr", "train/steps_per_s", "train/images_per_s", "validation/loss"} <= set(
        events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-5)
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([1e-3] * 4)
    assert [(e.step, pytest.approx(e.value, rel=1e-5)) for e in events.Scalars("validation/loss")] == [
        (int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    assert [e.step for e in events.Images("validation/00-a-red-circle")] == [2, 4]


def test_missing_tracker_package_is_one_line_naming_the_install(cli, tiny_sd, dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, whether or not it is installed here
    for choice in ("wandb", "all"):
        result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "o", *QUICK,
                     "--log-with", choice)
        assert "needs wandb, which is not installed (pip install wandb)" in one_error_line(result, 2)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "o", *QUICK,
                 "--log-with", "tensorboard")
    assert "(pip install tensorboard)" in one_error_line(result, 2)
    assert not (tmp_path / "o").exists()


# 5. Bad input: one line, non-zero exit, nothing written ------------------------------------------------


def _empty(tmp_path):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.md").write_text("no images")
    return ["--validation-data", tmp_path / "nothing"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (lambda p: ["--validation-split", "0"], 2, "--validation-split must be between 0 and 1"),
        (lambda p: ["--validation-split", "1"], 2, "--validation-split must be between 0 and 1"),
        (lambda p: ["--validation-split", "-0.2"], 2, "--validation-split must be between 0 and 1"),
        (lambda p: ["--validation-split", "0.9"], 2, "holds out 4 of 4 images, leaving none to train on"),
        (lambda p: ["--validation-split", "0.2", "--validation-data", p], 2,
         "give --validation-split or --validation-data, not both"),
        (_empty, 1, "--validation-data: no usable images (png, jpg, webp) in"),
        (lambda p: ["--validation-data", p / "missing"], 2, "missing does not exist"),
        (lambda p: ["--validation-prompt", "a (red:inf) circle"], 2, "--validation-prompt: the weight in '(red:inf)'"),
        (lambda p: ["--validation-prompt", "a [red:blue:nan]"], 2, "--validation-prompt: the switch step in"),
    ],
    ids=["zero", "one", "negative", "none-left", "both", "empty-folder", "missing-folder", "inf-weight", "nan-step"],
)
def test_bad_validation_options_are_one_line_and_write_nothing(cli, tiny_sd, dataset, tmp_path, args, code, message):
    out = tmp_path / "o"
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, *QUICK, *args(tmp_path))
    assert message in one_error_line(result, code)
    assert not out.exists()
