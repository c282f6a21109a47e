"""DeepSpeed ZeRO through accelerate (sdcli.training.zero): what its config cannot do with sdcli's flags is one
line before loading; ZeRO-2 and ZeRO-3 on two CPU processes (gloo) train, checkpoint in sdcli's format and
resume bit-identically."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import one_error_line
from safetensors.torch import load_file

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install 'sdcli[deepspeed]')")

QUICK = ("--max-steps", "1", "--batch-size", "1", "--checkpoint-every", "0")
# What `accelerate launch --config_file F` puts in each process's environment for distributed_type DEEPSPEED.
ZERO2 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "WORLD_SIZE": "2"}


def _ds_file(tmp_path, **config):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, **config}))
    return {"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}


@needs_deepspeed
@pytest.mark.parametrize("env, config, flags, named", [
    (ZERO2, None, ["--train-text-encoder"], "--train-text-encoder with DeepSpeed"),
    (ZERO2, None, ["--compile"], "--compile with DeepSpeed"),
    (ZERO2, None, ["--quantize", "int8-weight"], "a quantized base cannot be sharded"),
    (ZERO2, None, ["--mixed-precision", "fp16"], "--mixed-precision fp16 with DeepSpeed"),
    ({**ZERO2, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"}, None, [],
     "gradient_accumulation_steps: 2, but --gradient-accumulation is 1"),
    ({**ZERO2, "ACCELERATE_GRADIENT_CLIPPING": "0.5"}, None, [], "gradient_clipping: 0.5, but --max-grad-norm is 1"),
    ({**ZERO2, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, None, [],
     "zero_optimization.offload_optimizer.device cpu"),
    ({**ZERO2, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, None, [], "zero_optimization.stage 0"),
    (None, {"train_micro_batch_size_per_gpu": 4}, [], "train_micro_batch_size_per_gpu: 4, but --batch-size is 1"),
    (None, {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, [], "has an optimizer section"),
    (None, {"bf16": {"enabled": True}}, [], "enables bf16"),
    (None, {"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}, [],
     "zero_optimization.sub_group_size is auto"),
], ids=["text-encoder", "compile", "quantized-base", "fp16", "accumulation", "clipping", "offload",
        "stage0", "micro-batch", "optimizer", "bf16-weights", "unknown-auto"])
def test_what_deepspeed_cannot_do_with_sdclis_flags_is_one_line_before_loading(cli, dataset, tmp_path, monkeypatch,
                                                                               env, config, flags, named):
    for key, value in (env if env is not None else _ds_file(tmp_path, **config)).items():
        monkeypatch.setenv(key, value)
    # A model that does not exist: the refusal must come before anything tries to load it.
    line = one_error_line(cli("finetune", "--data", dataset, "--model", tmp_path / "no-model", "--out",
                              tmp_path / "out", *flags, *QUICK), 2)
    assert named in line
    assert not (tmp_path / "out").exists()


def test_deepspeed_not_installed_is_one_line(cli, dataset, tmp_path, monkeypatch):
    from sdcli.training import zero

    monkeypatch.setattr(zero, "available", lambda: False)
    for key, value in ZERO2.items():
        monkeypatch.setenv(key, value)
    line = one_error_line(cli("finetune", "--data", dataset, "--model", tmp_path / "no-model", "--out",
                              tmp_path / "out", *QUICK), 2)
    assert "pip install 'sdcli[deepspeed]'" in line


def test_deepspeeds_autos_take_sdclis_values(tmp_path, monkeypatch, make_config):
    """Where the config says auto, DeepSpeed gets sdcli's micro-batch, accumulation, clipping and batch."""
    pytest.importorskip("deepspeed")
    from sdcli.training import zero

    for key, value in _ds_file(tmp_path, train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
                               gradient_clipping="auto", train_batch_size="auto").items():
        monkeypatch.setenv(key, value)
    cfg = make_config(tmp_path, tmp_path / "out", "model", batch_size=3, gradient_accumulation=2, max_grad_norm=0.25)
    ds = zero.plugin(cfg, 4).deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"],
            ds["train_batch_size"]) == (3, 2, 0.25, 24)


ZERO2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
deepspeed_config:
  zero_stage: 2
"""

# ZeRO-3 from a DeepSpeed JSON config, every weight cut (no small ones kept whole), sdcli's values for the autos.
ZERO3_JSON = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "reduce_bucket_size": "auto"},
              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto"}
ZERO3_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_processes: 2
num_machines: 1
machine_rank: 0
use_cpu: true
deepspeed_config:
  deepspeed_config_file: {json}
"""


@needs_deepspeed
@pytest.mark.slow
@pytest.mark.parametrize("stage, method", [("2", ["--full"]), ("3", [])], ids=["zero2-full", "zero3-lora"])
def test_deepspeed_trains_checkpoints_and_resumes_exactly(stage, method, tiny_sd, tmp_path, make_images):
    """`accelerate launch` with distributed_type DEEPSPEED on two CPU processes: the checkpoint holds whole tensors
    in sdcli's format (the Adam moments gathered from ZeRO's partitions), EMA averages, validation renders, the
    weights load in diffusers, and a resume from step 1 ends bit-identical to the uninterrupted run."""
    import torch
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    data = tmp_path / "data"
    make_images(data, n=4)
    config = tmp_path / "ds.yaml"
    if stage == "2":
        config.write_text(ZERO2_CONFIG)
    else:
        (tmp_path / "ds.json").write_text(json.dumps(ZERO3_JSON))
        config.write_text(ZERO3_CONFIG.format(json=tmp_path / "ds.json"))
    # DeepSpeed finds no GPU and says so on stdout unless told it runs on the CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    out, again = tmp_path / "out", tmp_path / "again"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "-m", "sdcli", "finetune", "--data", str(data), "--model", tiny_sd, "--out", str(out), *method,
           "--max-steps", "2", "--batch-size", "1", "--lr", "1e-3", "--checkpoint-every", "1", "--ema",
           "--validation-prompt", "a red circle", "--validation-every", "1", "--validation-steps", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "world size 2, DEEPSPEED" in run.stderr
    assert run.stdout.strip() == str(out)  # DeepSpeed's own chatter goes to stderr
    settings = json.loads((out / "training_settings.json").read_text())
    assert settings["distributed"] == "DEEPSPEED" and settings["samples_per_rank"] == [2, 2]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000001", "step-000002"]

    ckpt = out / "checkpoints" / "checkpoint-000001"
    assert not [p.name for p in ckpt.iterdir() if p.suffix in (".pkl", ".bin", ".pt")]
    saved = load_file(str(ckpt / "model.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert saved and all(tuple(v.shape) == shapes[k.replace(".base_layer", "")] for k, v in saved.items()
                         if "lora" not in k)
    # torch AdamW's layout, each moment whole: the shapes of the trained tensors, after one step.
    optimizer = json.loads((ckpt / "optimizer.json").read_text())
    moments = load_file(str(ckpt / "optimizer.safetensors"))
    assert sorted(tuple(t.shape) for t in moments.values() if t.ndim) == sorted(
        tuple(t.shape) for t in saved.values() for _ in ("exp_avg", "exp_avg_sq"))
    assert "exp_avg_sq" in json.dumps(optimizer) and all(
        t.item() == 1 for t in moments.values() if not t.ndim)  # "step"
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert sorted(tuple(t.shape) for t in ema.values()) == sorted(tuple(t.shape) for t in saved.values())
    # At step 2 an average, not a copy of the weights (under ZeRO-3 it averages each process's partition).
    last = ckpt.parent / "checkpoint-000002"
    weights = load_file(str(last / "model.safetensors")).values()
    assert any(not any(torch.equal(e, w) for w in weights) for e in load_file(str(last / "ema.safetensors")).values())

    resume = [*cmd[: cmd.index("--out") + 1], str(again), *cmd[cmd.index("--out") + 2:], "--resume", str(ckpt)]
    run = subprocess.run(resume, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "at step 1" in run.stderr
    losses = [(out / "loss.csv").read_text().splitlines()[-1], (again / "loss.csv").read_text().splitlines()[-1]]
    assert losses[0].split(",")[:3] == losses[1].split(",")[:3]
    if method:
        a, b = (load_file(str(next((d / "unet").glob("*.safetensors")))) for d in (out, again))
        pipe = DiffusionPipeline.from_pretrained(str(out))
    else:
        a, b = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (out, again))
        pipe = DiffusionPipeline.from_pretrained(tiny_sd)
        pipe.load_lora_weights(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("model", "optimizer", "ema"):
        x, y = (load_file(str(d / "checkpoints" / "checkpoint-000002" / f"{name}.safetensors")) for d in (out, again))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert image.shape == (1, 16, 16, 3)
