"""The same command under torchrun: two CPU processes (gloo) train one model together, and resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_processes_both_train_and_the_output_loads(tiny_sd, tmp_path, make_images):
    import torch
    from diffusers import DiffusionPipeline

    data = tmp_path / "data"
    make_images(data, n=4)
    make_images(data / "wide", n=2, size=(24, 16))  # buckets: each process takes its half of each one-size batch
    make_images(data / "tall", n=2, size=(16, 24))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sdcli", "finetune", "--data", str(data), "--model", tiny_sd, "--out", str(out), "--full",
           "--max-steps", "30", "--batch-size", "2", "--lr", "2e-3", "--uncond-prob", "0", "--checkpoint-every", "15"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "world size 2" in run.stderr
    assert run.stdout.strip() == str(out)  # one answer, from the main process only

    settings = json.loads((out / "training_settings.json").read_text())
    assert settings["world_size"] == 2
    assert [row["size"] for row in settings["buckets"]["table"]] == [[12, 20], [16, 16], [20, 12]]
    assert settings["samples_per_rank"] == [60, 60]  # 30 steps x batch 2, on each rank
    ckpt = out / "checkpoints" / "checkpoint-000030"
    assert sorted(p.name for p in ckpt.glob("random_states_*.json")) == ["random_states_0.json", "random_states_1.json"]
    assert not [p.name for p in ckpt.iterdir() if p.suffix in (".pkl", ".bin")]  # nothing a resume would unpickle

    losses = [float(line.split(",")[2]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    pipe = DiffusionPipeline.from_pretrained(str(out))
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 16, 16, 3)

    # Resumed from the half-way checkpoint into a new folder, two processes end where the first run did.
    again = tmp_path / "again"
    resume = [*cmd[: cmd.index("--out") + 1], str(again), *cmd[cmd.index("--out") + 2:],
              "--resume", str(out / "checkpoints" / "checkpoint-000015")]
    run = subprocess.run(resume, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from" in run.stderr and "at step 15" in run.stderr
    a = load_file(str(next((out / "unet").glob("*.safetensors"))))
    b = load_file(str(next((again / "unet").glob("*.safetensors"))))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_train_an_sd3_lora_plain_diffusers_loads(tiny_flow_models, tmp_path, make_images):
    from diffusers import DiffusionPipeline

    data = tmp_path / "data"
    make_images(data, n=4)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sdcli", "finetune", "--data", str(data), "--model", tiny_flow_models["sd3"], "--out", str(out),
           "--max-steps", "3", "--batch-size", "1", "--timestep-sampling", "logit-normal", "--checkpoint-every", "0"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "world size 2" in run.stderr and "sd3, flow matching" in run.stderr
    assert run.stdout.strip() == str(out)
    settings = json.loads((out / "training_settings.json").read_text())
    assert settings["world_size"] == 2 and settings["samples_per_rank"] == [3, 3]
    pipe = DiffusionPipeline.from_pretrained(tiny_flow_models["sd3"])
    pipe.load_lora_weights(str(out))
    assert pipe.get_active_adapters()


@pytest.mark.slow
def test_two_processes_share_the_validation_loss_and_log_the_whole_mean(tiny_sd, tmp_path, make_images):
    """3 held-out images on 2 processes (one repeats an image at weight 0): the logged value is the mean over
    the 3, the same number one process computes from the saved model."""
    from diffusers import DiffusionPipeline

    from sdcli.training import validation
    from sdcli.training.data import discover
    from sdcli.families import BY_NAME as FAMILIES
    from sdcli.training.inputs import TrainingInputs
    from sdcli.training.objective import training_scheduler

    data = tmp_path / "data"
    make_images(data, n=5)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sdcli", "finetune", "--data", str(data), "--model", tiny_sd, "--out", str(out), "--full",
           "--max-steps", "2", "--batch-size", "1", "--checkpoint-every", "0", "--validation-split", "0.6",
           "--validation-every", "1", "--seed", "4"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    held = json.loads((out / "training_settings.json").read_text())["validation"]["images"]
    assert len(held) == 3
    logged = [line.split(",")[-1] for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert len(logged) == 2 and all(logged)

    pipe = DiffusionPipeline.from_pretrained(str(out))
    examples = [e for e in discover(data).examples if e.path.name in held]
    inputs = TrainingInputs(pipe, examples, family=FAMILIES["sd1"], resolution=16, center_crop=True, device="cpu",
                            cache_latents=False, cache_text=False)
    scheduler = training_scheduler(pipe.scheduler.config)
    loss_at = validation.loss_function(type("Cfg", (), {"snr_gamma": None, "debiased_loss": False, "debiased_snr_floor": None})(), FAMILIES["sd1"], pipe, scheduler,
                                       pipe.unet)
    one = type("OneProcess", (), {"process_index": 0, "num_processes": 1, "device": "cpu"})()
    mean = validation.held_out_loss(loss_at, inputs, 4, validation.noise_levels(FAMILIES["sd1"], scheduler, "cpu"),
                                    one)
    assert mean == pytest.approx(float(logged[-1]), rel=1e-5)
