"""`finetune`'s CUDA path, run only where a GPU is (`python -m pytest -m gpu -q`); CI has none."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sdcli.training import finetune

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_defaults_are_fp16_and_channels_last_and_compile_works(tiny_sd, dataset, tmp_path, make_config):
    result = finetune(make_config(dataset, tmp_path / "out", tiny_sd, max_steps=3, compile=True))
    record = json.loads((tmp_path / "out" / "training_settings.json").read_text())["config"]
    assert record["mixed_precision"] == "fp16" and record["channels_last"] is True and record["compile"] is True
    assert all(math.isfinite(loss) for loss in result.losses)
    assert result.weights.is_file()


@pytest.mark.parametrize("precision", ["auto", "bf16"])
@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_models_train_and_validate_on_cuda(tiny_flow_models, dataset, tmp_path, make_config, name, precision):
    out = tmp_path / "out"
    result = finetune(make_config(dataset, out, tiny_flow_models[name], resolution=16, max_steps=3,
                                  mixed_precision=precision, timestep_sampling="logit-normal",
                                  validation_prompts=["a red circle"], validation_every=3, validation_steps=2))
    record = json.loads((out / "training_settings.json").read_text())["config"]
    # auto is bf16 for flow models on a card with it (they overflow float16), fp16 on one without.
    auto = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert record["mixed_precision"] == (auto if precision == "auto" else "bf16")
    assert all(math.isfinite(loss) for loss in result.losses), result.losses
    assert result.weights.is_file() and [p.name for p in result.validation_images] == ["00-a-red-circle.png"]


def test_full_sd3_fine_tune_in_bf16_on_cuda(tiny_flow_models, dataset, tmp_path, make_config):
    result = finetune(make_config(dataset, tmp_path / "out", tiny_flow_models["sd3"], lora=False, max_steps=3,
                                  mixed_precision="bf16"))
    assert all(math.isfinite(loss) for loss in result.losses) and result.weights.is_file()


@pytest.mark.parametrize("model", ["sd1", "flux"])
def test_validation_loss_on_cuda_is_repeatable_under_autocast(tiny_models, tiny_flow_models, dataset, tmp_path,
                                                              make_config, model):
    """The held-out draws come from CUDA generators and the forward runs in fp16/bf16 autocast (eval mode, EMA
    swapped in): the same values in two runs with one seed, up to cuDNN's run-to-run kernel choice, and finite."""
    path = tiny_models["sd1"] if model == "sd1" else tiny_flow_models["flux"]
    runs = [finetune(make_config(dataset, tmp_path / name, path, resolution=16, max_steps=3, ema=True,
                                 validation_split=0.5, validation_every=1, log_with=None))
            for name in ("a", "b")]
    assert sorted(runs[0].val_losses) == sorted(runs[1].val_losses) == [1, 2, 3]
    assert list(runs[1].val_losses.values()) == pytest.approx(list(runs[0].val_losses.values()), rel=1e-3)
    assert all(math.isfinite(v) for v in runs[0].val_losses.values())


def test_buckets_train_in_fp16_with_channels_last(tiny_sd, tmp_path, make_images, make_config):
    # Three aspect ratios, so the channels-last UNet sees latents of three shapes under fp16 autocast.
    for w, h in ((16, 16), (24, 16), (16, 24)):
        make_images(tmp_path / "data" / f"{w}x{h}", n=2, size=(w, h))
    out = tmp_path / "out"
    result = finetune(make_config(tmp_path / "data", out, tiny_sd, max_steps=6, batch_size=1, channels_last=True))
    record = json.loads((out / "training_settings.json").read_text())
    assert record["config"]["mixed_precision"] == "fp16" and record["config"]["channels_last"] is True
    assert len(record["buckets"]["table"]) == 3
    assert all(math.isfinite(loss) for loss in result.losses), result.losses


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs two GPUs (NCCL takes one process per GPU)")
@pytest.mark.parametrize("method", [["--full"], []], ids=["full", "lora"])
def test_fsdp2_on_two_gpus_in_bf16_trains_and_resumes_exactly(method, tiny_sd, tmp_path, make_images):
    """accelerate's FSDP2 config on two GPUs with bf16 mixed precision (the LoRA's frozen base in bf16 beside its
    float32 layers): a run resumed from step 1 ends where the uninterrupted one did."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = tmp_path / "data"
    make_images(data, n=4)
    config = tmp_path / "fsdp.yaml"
    config.write_text("distributed_type: FSDP\nnum_processes: 2\nnum_machines: 1\nmachine_rank: 0\n"
                      "mixed_precision: bf16\nfsdp_config:\n  fsdp_version: 2\n"
                      "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out, again = tmp_path / "out", tmp_path / "again"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "-m", "sdcli",
           "finetune", "--data", str(data), "--model", tiny_sd, "--out", str(out), *method, "--max-steps", "2",
           "--batch-size", "1", "--checkpoint-every", "1", "--ema", "--validation-prompt", "a red circle",
           "--validation-steps", "2", "--validation-every", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "world size 2, FSDP" in run.stderr and "mixed precision bf16" in run.stderr
    resume = [*cmd[: cmd.index("--out") + 1], str(again), *cmd[cmd.index("--out") + 2:],
              "--resume", str(out / "checkpoints" / "checkpoint-000001")]
    run = subprocess.run(resume, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    name = "unet/diffusion_pytorch_model.safetensors" if method else "pytorch_lora_weights.safetensors"
    a, b = load_file(str(out / name)), load_file(str(again / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
