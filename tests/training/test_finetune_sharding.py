"""accelerate's FSDP config as sdcli finetune reads it: what cannot shard is one line, before loading.

The runs themselves (two CPU processes under FSDP2) are in test_finetune_multiprocess.py; DeepSpeed's
refusals and runs are in test_finetune_deepspeed.py."""

from __future__ import annotations

import pytest
from conftest import one_error_line

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
