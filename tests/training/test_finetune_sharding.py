"""Training with sharded weights (sdcli.training.sharding): what accelerate's FSDP config cannot shard is one
line before loading, and two CPU processes under FSDP2 or DeepSpeed ZeRO train, checkpoint in sdcli's format and
resume bit-identically (DeepSpeed's own refusals are in test_finetune_deepspeed.py)."""

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

# What `accelerate launch --config_file F` puts in each process's environment for that config.
FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}


@pytest.mark.parametrize("env, flags, named", [
    ({**FSDP2, "FSDP_VERSION": "1"}, [], "FSDP version 1"),
    (FSDP2, ["--train-text-encoder"], "--train-text-encoder with FSDP"),
    (FSDP2, ["--full", "--train-text-encoder"], "--train-text-encoder with FSDP"),
    (FSDP2, ["--compile"], "--compile with FSDP"),
    (FSDP2, ["--quantize", "int8-weight"], "a quantized base cannot be sharded"),
], ids=["fsdp1", "text-encoder-lora", "text-encoder-full", "compile", "quantized-base"])
def test_what_accelerates_config_cannot_shard_is_one_line_before_loading(cli, dataset, tmp_path, monkeypatch, env,
                                                                         flags, named):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # A model that does not exist: the refusal must come before anything tries to load it.
    line = one_error_line(cli("finetune", "--data", dataset, "--model", tmp_path / "no-model", "--out",
                              tmp_path / "out", *flags, *QUICK), 2)
    assert named in line
    assert not (tmp_path / "out").exists()


def test_one_process_under_an_fsdp_config_trains_as_usual(cli, tiny_sd, dataset, tmp_path, monkeypatch):
    """accelerate shards nothing with one process, so nothing is refused (here --train-text-encoder)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    result = cli("finetune", "--data", dataset, "--model", tiny_sd, "--out", tmp_path / "out",
                 "--full", "--train-text-encoder", *QUICK)
    assert result.exit_code == 0, result.stderr


FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
"""

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


def _launch_config(tmp_path, backend):
    config = tmp_path / "launch.yaml"
    if backend == "zero3":
        (tmp_path / "ds.json").write_text(json.dumps(ZERO3_JSON))
        config.write_text(ZERO3_CONFIG.format(json=tmp_path / "ds.json"))
    else:
        config.write_text({"fsdp2": FSDP_CONFIG, "zero2": ZERO2_CONFIG}[backend])
    return config


@pytest.mark.slow
# Each backend once, full and LoRA each at least once, ZeRO's two partition layouts (stage 2: the optimizer's flat
# fp32 partitions; stage 3: the weights' own). LoRA under FSDP2 shards as the full run does (the gathering is over
# whatever trains); it was dropped to keep CI inside its time (each case is two launches, about 25 s).
@pytest.mark.parametrize("backend, method", [
    ("fsdp2", ["--full"]),
    pytest.param("zero2", ["--full"], marks=needs_deepspeed), pytest.param("zero3", [], marks=needs_deepspeed),
], ids=["fsdp2-full", "zero2-full", "zero3-lora"])
def test_sharded_training_trains_checkpoints_and_resumes_exactly(backend, method, tiny_sd, tmp_path, make_images):
    """`accelerate launch --config_file` with FSDP2 or DeepSpeed ZeRO on two CPU processes (gloo): the weights are
    sharded, yet each checkpoint holds whole tensors in sdcli's format (the Adam moments gathered from the shards),
    EMA averages, validation renders, the weights load in diffusers, and a resume from step 1 ends bit-identical to
    the uninterrupted run, checkpoints included."""
    import torch
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    data = tmp_path / "data"
    make_images(data, n=4)
    config = _launch_config(tmp_path, backend)
    # DeepSpeed finds no GPU and says so on stdout unless told it runs on the CPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    out, again = tmp_path / "out", tmp_path / "again"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "-m", "sdcli", "finetune", "--data", str(data), "--model", tiny_sd, "--out", str(out), *method,
           "--max-steps", "2", "--batch-size", "1", "--lr", "1e-3", "--checkpoint-every", "1", "--ema",
           "--validation-prompt", "a red circle", "--validation-every", "1", "--validation-steps", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    kind = "FSDP" if backend == "fsdp2" else "DEEPSPEED"
    assert f"world size 2, {kind}" in run.stderr
    assert run.stdout.strip() == str(out)  # the backends' own chatter goes to stderr
    settings = json.loads((out / "training_settings.json").read_text())
    assert settings["distributed"] == kind and settings["samples_per_rank"] == [2, 2]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000001", "step-000002"]

    # The checkpoint holds every trained tensor whole (gathered from the shards), as one process writes it.
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
    # At step 2 an average, not a copy of the weights (under ZeRO-3 each process averages its partition).
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
