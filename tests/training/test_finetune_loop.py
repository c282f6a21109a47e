"""finetune() end to end on tiny pipelines: outputs plain diffusers loads, exact resume, checkpoints."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from sdcli.errors import OutputError, UsageError
from sdcli.training import finetune
from sdcli.training.checkpoints import checkpoint_dirs

from conftest import one_error_line


def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 500, text).sample


def test_lora_output_loads_in_plain_diffusers_at_the_trained_scale(tiny_sd, dataset, tmp_path, make_config):
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

    out = tmp_path / "lora"
    result = finetune(make_config(dataset, out, tiny_sd, rank=4, lora_alpha=8, checkpoint_every=100, max_steps=3))
    assert result.weights == out / "pytorch_lora_weights.safetensors" and result.weights.is_file()
    assert not (out / "model_index.json").exists()

    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    base = _unet_out(pipe.unet)
    pipe.load_lora_weights(str(out))  # plain diffusers, no sdcli code
    assert pipe.unet.peft_config[pipe.get_active_adapters()[0]].lora_alpha == 8
    loaded = _unet_out(pipe.unet)
    assert not torch.allclose(loaded, base, atol=1e-6)

    # The same adapters put back the way training held them (from the final checkpoint) give the same output,
    # so nothing was lost or rescaled on the way through the diffusers format.
    fresh = DiffusionPipeline.from_pretrained(tiny_sd).unet
    fresh.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    state = load_file(str(checkpoint_dirs(out)[-1] / "model.safetensors"))
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    assert not unexpected and all("lora" not in k for k in missing)
    torch.testing.assert_close(_unet_out(fresh), loaded, rtol=1e-5, atol=1e-6)

    settings = json.loads((out / "training_settings.json").read_text())
    assert settings["method"] == "lora" and settings["steps"] == 3 and settings["config"]["lora_alpha"] == 8
    assert settings["sdcli_version"] and settings["world_size"] == 1
    assert "load_lora_weights" in (out / "README.md").read_text()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "loss.csv").read_text().count("\n") == 1 + 3


def test_full_output_is_a_pipeline_folder_diffusers_loads(tiny_models, dataset, tmp_path, make_config):
    from diffusers import DiffusionPipeline

    out = tmp_path / "full"
    finetune(make_config(dataset, out, tiny_models["sd2"], lora=False, max_steps=2, snr_gamma=5.0))
    original = DiffusionPipeline.from_pretrained(tiny_models["sd2"])
    trained = DiffusionPipeline.from_pretrained(str(out))
    assert trained.scheduler.config.prediction_type == "v_prediction"
    assert not torch.allclose(_unet_out(trained.unet), _unet_out(original.unet), atol=1e-6)
    for a, b in zip(trained.vae.parameters(), original.vae.parameters()):
        assert torch.equal(a, b)  # the VAE is never trained
    assert list(out.glob("unet/*.safetensors"))
    assert json.loads((out / "training_settings.json").read_text())["method"] == "full"


def _weights(out, lora):
    path = out / "pytorch_lora_weights.safetensors" if lora else next((out / "unet").glob("*.safetensors"))
    return load_file(str(path))


def _mixed_aspect(root, make_images):
    """Two --data folders of squares, landscapes (24x16, 32x12) and a portrait, the second counted 3 times:
    four buckets of the tiny model's 16x16 area, of 3, 5, 2 and 1 samples an epoch."""
    make_images(root / "a" / "square", n=2)
    make_images(root / "a" / "wide", n=2, size=(24, 16))
    make_images(root / "a" / "wider", n=1, size=(32, 12))
    make_images(root / "b" / "tall", n=1, size=(16, 24))
    make_images(root / "b" / "square", n=1)
    return [root / "a", f"{root / 'b'}:3"]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_ctrl_c_then_resume_ends_with_the_same_weights_as_never_stopping(tiny_sd, tmp_path, make_images, make_config,
                                                                        lora):
    # Buckets (the default) and repeats on mixed aspect ratios: without a split, 2 + 3 + 1 + 1 batches of 2, seven
    # micro-batches an epoch, so the epoch turns over inside the resumed part, mid optimizer step.
    dataset = _mixed_aspect(tmp_path / "data", make_images)
    # DreamBooth class images in two buckets of their own (3 batches a pass, so their passes turn over too).
    make_images(tmp_path / "class" / "square", n=3, captions="none")
    make_images(tmp_path / "class" / "wide", n=2, size=(24, 16), captions="none")
    settings = dict(lora=lora, max_steps=6, batch_size=2, gradient_accumulation=2, flip=True, uncond_prob=0.3,
                    lr_scheduler="cosine", lr_warmup_steps=2, noise_offset=0.05, ema=lora, ema_decay=0.9,
                    snr_gamma=None if lora else 5.0, checkpoint_every=0, seed=11,
                    class_data=tmp_path / "class", class_prompt="a shape", prior_loss_weight=0.5,
                    # The validation loss (on EMA weights, at step 2 just before the stop) takes no training draw.
                    validation_split=0.25 if lora else None, validation_every=2)
    whole = finetune(make_config(dataset, tmp_path / "whole", tiny_sd, **settings))
    table = json.loads((tmp_path / "whole" / "training_settings.json").read_text())["buckets"]["table"]
    assert len(table) > 2
    if not lora:  # nothing held out
        assert [(row["size"], row["per_epoch"]) for row in table] == [([12, 20], 3), ([16, 16], 5), ([20, 12], 2),
                                                                      ([24, 8], 1)]

    def press_ctrl_c(info):
        if info.step == 2:
            signal.raise_signal(signal.SIGINT)  # the handler asks for a stop; the loop stops after this step

    with pytest.raises(KeyboardInterrupt):
        finetune(make_config(dataset, tmp_path / "split", tiny_sd, **settings), callback=press_ctrl_c)
    assert [p.name for p in checkpoint_dirs(tmp_path / "split")] == ["checkpoint-000003"]
    assert not (tmp_path / "split" / "pytorch_lora_weights.safetensors").exists()
    resumed = finetune(make_config(dataset, tmp_path / "split", tiny_sd, resume="latest", **settings))

    assert resumed.steps == whole.steps == 6 and len(resumed.losses) == 3
    assert resumed.losses == whole.losses[3:]
    a, b = _weights(tmp_path / "whole", lora), _weights(tmp_path / "split", lora)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = (tmp_path / "split" / "loss.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2", "3", "4", "5", "6"]
    val = [[line.split(",")[-1] for line in (tmp_path / run / "loss.csv").read_text().splitlines()[1:]]
           for run in ("whole", "split")]
    assert val[0] == val[1] and all(val[0][1::2]) == lora


def test_checkpoints_are_pruned_to_the_newest_k_and_written_atomically(tiny_sd, dataset, tmp_path, make_config):
    out = tmp_path / "out"
    result = finetune(make_config(dataset, out, tiny_sd, max_steps=7, checkpoint_every=2, keep_checkpoints=2))
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-000006", "checkpoint-000007"]
    assert [p.name for p in (out / "checkpoints").iterdir()] != [] and not list((out / "checkpoints").glob(".tmp*"))
    state = json.loads((out / "checkpoints" / "checkpoint-000007" / "sdcli_state.json").read_text())
    assert state["step"] == 7 and state["config"]["seed"] == 0
    assert len(result.checkpoints) == 4
    # The LoRA checkpoint holds the adapters only, not a copy of the whole UNet.
    assert all("lora" in k for k in load_file(str(out / "checkpoints" / "checkpoint-000007" / "model.safetensors")))


def test_out_is_never_silently_overwritten_and_resume_checks_settings(tiny_sd, dataset, tmp_path, make_config):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not empty; pass --overwrite"):
        finetune(make_config(dataset, out, tiny_sd))
    finetune(make_config(dataset, out, tiny_sd, overwrite=True, max_steps=2, checkpoint_every=1))
    assert (out / "keep.txt").read_text() == "mine"  # --overwrite replaces our files only
    with pytest.raises(UsageError, match=r"settings differ.*rank \(4 -> 8\)"):
        finetune(make_config(dataset, out, tiny_sd, resume="latest", rank=8, max_steps=3))
    with pytest.raises(UsageError, match="no checkpoint in"):
        finetune(make_config(dataset, tmp_path / "fresh", tiny_sd, resume="latest"))
    # A longer --max-steps extends a finished run from its last checkpoint.
    more = finetune(make_config(dataset, out, tiny_sd, resume="latest", max_steps=3, checkpoint_every=1))
    assert more.steps == 3 and len(more.losses) == 1


def test_validation_images_and_the_no_dropout_warning(tiny_sd, dataset, tmp_path, make_config, capsys):
    out = tmp_path / "out"
    result = finetune(make_config(dataset, out, tiny_sd, max_steps=4, uncond_prob=0.0, quiet=False,
                                  validation_prompts=["a red circle", "a blue square"], validation_every=2,
                                  validation_steps=2))
    names = sorted(str(p.relative_to(out)) for p in result.validation_images)
    assert names == ["validation/step-000002/00-a-red-circle.png", "validation/step-000002/01-a-blue-square.png",
                     "validation/step-000004/00-a-red-circle.png", "validation/step-000004/01-a-blue-square.png"]
    err = capsys.readouterr().err
    assert "--uncond-prob 0" in err and "guidance will have nothing to extrapolate from" in err
    assert "data: 4 images" in err and "captions: 4 from .txt" in err and "world size 1" in err


def _text_encoder_lora_supported() -> bool:
    """Whether transformers' PEFT integration accepts the installed peft (transformers 5 wants peft >= 0.22)."""
    from transformers.integrations.peft import MIN_PEFT_VERSION
    from transformers.utils.peft_utils import check_peft_version

    try:
        check_peft_version(MIN_PEFT_VERSION)
        return True
    except ValueError:
        return False


def _encode(pipe, prompt="a red circle"):
    ids = pipe.tokenizer([prompt], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_text_encoder_lora_is_saved_where_diffusers_finds_it(tiny_sd, dataset, tmp_path, make_config):
    from diffusers import DiffusionPipeline

    out = tmp_path / "te"
    config = make_config(dataset, out, tiny_sd, train_text_encoder=True, max_steps=3, learning_rate=1e-2)
    if not _text_encoder_lora_supported():
        with pytest.raises(UsageError, match="--train-text-encoder with --lora: .*upgrade peft, or use --full"):
            finetune(config)
        return
    finetune(config)
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    pipe = DiffusionPipeline.from_pretrained(tiny_sd)
    before = _encode(pipe)
    pipe.load_lora_weights(str(out))
    assert not torch.allclose(before, _encode(pipe), atol=1e-6)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_full_with_text_encoders_saves_them_trained(tiny_models, dataset, tmp_path, make_config, family):
    from diffusers import DiffusionPipeline

    out = tmp_path / "full-te"
    finetune(make_config(dataset, out, tiny_models[family], lora=False, train_text_encoder=True, max_steps=2,
                         cache=family == "sd1"))
    original, trained = DiffusionPipeline.from_pretrained(tiny_models[family]), DiffusionPipeline.from_pretrained(str(out))
    assert not torch.allclose(_encode(original), _encode(trained), atol=1e-6)
    if family == "sdxl":
        assert not torch.equal(original.text_encoder_2.text_model.final_layer_norm.weight,
                               trained.text_encoder_2.text_model.final_layer_norm.weight)


def test_sdxl_lora_trains_and_renders_in_plain_diffusers(tiny_models, dataset, tmp_path, make_config):
    from diffusers import DiffusionPipeline

    out = tmp_path / "xl"
    finetune(make_config(dataset, out, tiny_models["sdxl"], max_steps=2, flip=True, uncond_prob=0.5))
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"unet"}
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sdxl"])
    pipe.load_lora_weights(str(out))
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def test_gradient_checkpointing_and_no_cache_train_the_same_weights(tiny_sd, dataset, tmp_path, make_config):
    plain = finetune(make_config(dataset, tmp_path / "a", tiny_sd, max_steps=3, flip=True))
    other = finetune(make_config(dataset, tmp_path / "b", tiny_sd, max_steps=3, flip=True,
                                 gradient_checkpointing=True, cache=False))
    assert other.losses == pytest.approx(plain.losses, rel=1e-4)
    a, b = _weights(tmp_path / "a", True), _weights(tmp_path / "b", True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-5)  # Adam moves each weight ~1e-3 a step


def test_loss_falls_and_bf16_runs(tiny_sd, dataset, tmp_path, make_config):
    result = finetune(make_config(dataset, tmp_path / "a", tiny_sd, lora=False, max_steps=30, batch_size=4,
                                  learning_rate=2e-3, uncond_prob=0.0))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.8 * first, result.losses
    bf16 = finetune(make_config(dataset, tmp_path / "b", tiny_sd, max_steps=2, mixed_precision="bf16"))
    assert all(loss == loss for loss in bf16.losses)  # no NaN


def test_8bit_adam_without_bitsandbytes_is_a_clear_error(tiny_sd, dataset, tmp_path, make_config, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as when it is not installed
    with pytest.raises(UsageError, match="--use-8bit-adam needs bitsandbytes"):
        finetune(make_config(dataset, tmp_path / "x", tiny_sd, use_8bit_adam=True))


def test_channels_last_trains_the_same_and_saves_what_diffusers_loads(tiny_sd, dataset, tmp_path, make_config):
    from diffusers import DiffusionPipeline

    plain = finetune(make_config(dataset, tmp_path / "a", tiny_sd, lora=False, max_steps=3, channels_last=False))
    # Channels-last weights are not contiguous, which safetensors refuses; checkpoints and the model must still save.
    cl = finetune(make_config(dataset, tmp_path / "b", tiny_sd, lora=False, max_steps=3, channels_last=True,
                              checkpoint_every=2))
    assert cl.losses == pytest.approx(plain.losses, rel=1e-4)
    assert [p.name for p in cl.checkpoints] == ["checkpoint-000002", "checkpoint-000003"]
    trained = DiffusionPipeline.from_pretrained(str(tmp_path / "b"))
    torch.testing.assert_close(_unet_out(trained.unet), _unet_out(DiffusionPipeline.from_pretrained(
        str(tmp_path / "a")).unet), rtol=1e-3, atol=1e-4)
    lora = finetune(make_config(dataset, tmp_path / "c", tiny_sd, max_steps=2, channels_last=True))
    assert lora.weights.is_file()


def test_auto_precision_and_layout_are_resolved_and_recorded(tiny_sd, dataset, tmp_path, make_config):
    finetune(make_config(dataset, tmp_path / "a", tiny_sd, max_steps=1))
    recorded = json.loads((tmp_path / "a" / "training_settings.json").read_text())["config"]
    cuda = torch.cuda.is_available()
    assert recorded["mixed_precision"] == ("fp16" if cuda else "no") and recorded["channels_last"] is False  # eager


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("max_steps", [1, 20])
def test_a_diverging_run_stops_with_one_line_and_writes_no_weights(cli, tiny_sd, dataset, tmp_path, monkeypatch,
                                                                   bad, max_steps):
    # An update that leaves the weights non-finite (an overflow the up-front --lr range cannot rule out): the loss
    # was measured before it, so a one-step run used to write NaN weights and say "wrote".
    from sdcli.training import setup

    real = setup.make_optimizer

    def diverging(cfg, params):
        optimizer = real(cfg, params)

        def break_a_weight(*_):
            with torch.no_grad():
                params[0].view(-1)[0] = bad

        optimizer.register_step_post_hook(break_a_weight)
        return optimizer

    monkeypatch.setattr(setup, "make_optimizer", diverging)
    out = tmp_path / "out"
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", out, "--max-steps", max_steps,
                 "--batch-size", "2", "--checkpoint-every", "0", "--lr", "1e-3")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    word = "NaN" if bad != bad else "infinite"
    assert len(errors) == 1 and f"the trained weights became {word} at step 1" in errors[0], result.stderr
    assert "try a lower --learning-rate" in errors[0] and "Traceback" not in result.stderr
    assert "wrote" not in result.stderr and not (out / "pytorch_lora_weights.safetensors").exists()
    assert len((out / "loss.csv").read_text().splitlines()[1:]) == 1  # it stopped at the first bad step


@pytest.mark.slow
def test_compile_trains_the_same_steps_and_saves_the_same_names(tiny_sd, dataset, tmp_path, make_config):
    plain = finetune(make_config(dataset, tmp_path / "a", tiny_sd, max_steps=3))
    compiled = finetune(make_config(dataset, tmp_path / "b", tiny_sd, max_steps=3, compile=True, checkpoint_every=2))
    assert compiled.losses == pytest.approx(plain.losses, rel=1e-4)
    a, b = _weights(tmp_path / "a", True), _weights(tmp_path / "b", True)
    assert a.keys() == b.keys()  # no torch.compile prefix: diffusers' load_lora_weights finds every weight
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=2e-5)
    # The checkpoint resumes without compiling: same parameter names, and the same weights at the end.
    resumed = finetune(make_config(dataset, tmp_path / "b", tiny_sd, max_steps=3, compile=False,
                                   resume=str(compiled.checkpoints[0])))
    assert resumed.steps == 3
    for key, value in _weights(tmp_path / "b", True).items():
        torch.testing.assert_close(value, a[key], rtol=1e-3, atol=2e-5)


def test_training_on_cuda_turns_cudnn_attention_off_and_back_on():
    """cuDNN's fused attention gave NaN gradients to a tiny Flux LoRA on an H100 (torch 2.11); training on CUDA
    runs without it and gives the process-wide switch back, even when training fails. A flag, so checkable here."""
    from sdcli.training.setup import attention_for_training

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(RuntimeError), attention_for_training("cuda:0"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        raise RuntimeError("a failed step")
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with attention_for_training("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.fixture
def set_threads(monkeypatch):
    """What torch.set_num_threads was asked for (not applied, so the test session keeps its own count)."""
    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    return asked


def test_threads_option_reaches_torch_and_the_default_leaves_busy_cores_alone(cli, tiny_sd, dataset, tmp_path,
                                                                               monkeypatch, set_threads):
    from sdcli import threads

    args = ("finetune", "--data", dataset, "--model", tiny_sd, "--max-steps", "1", "--batch-size", "2",
            "--checkpoint-every", "0", "--device", "cpu")
    assert cli(*args, "--out", tmp_path / "a", "--threads", "3").exit_code == 0
    assert set_threads == [3]
    # generate's rule: one thread per core another process is not keeping busy (here 3 of 4 are busy).
    monkeypatch.setattr(threads, "cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda: 3.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert cli(*args, "--out", tmp_path / "b").exit_code == 0
    assert set_threads == [3, 1]
    assert "--threads must be between 1 and 1024, got 0" in one_error_line(cli(*args, "--out", tmp_path / "c",
                                                                                "--threads", "0"), 2)


def test_the_model_card_names_the_bundled_model_as_bundled_shapes(tiny_sd, dataset, tmp_path, make_config,
                                                                   monkeypatch):
    # Its install path differs on every machine (the card showed .../site-packages/sdcli/models/shapes).
    from pathlib import Path

    from sdcli import defaults

    monkeypatch.setattr(defaults, "BUNDLED_MODEL", Path(tiny_sd))  # the tiny model stands in for the bundled one
    out = tmp_path / "lora"
    finetune(make_config(dataset, out, tiny_sd, rank=4, max_steps=1))
    card = (out / "README.md").read_text()
    assert f"sdcli generate --model bundled:shapes --lora {out}" in card and "base_model: bundled:shapes" in card
    assert str(tiny_sd) not in card
    assert json.loads((out / "training_settings.json").read_text())["base_model"] == "bundled:shapes"
