"""DeepSpeed ZeRO through accelerate (sdcli.training.zero): what its config cannot do with sdcli's flags is one
line before loading (the runs under ZeRO-2 and ZeRO-3 are in test_finetune_sharding.py)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import one_error_line

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
