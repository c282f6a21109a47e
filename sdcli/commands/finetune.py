"""`sdcli finetune`: fine-tune a pipeline (LoRA or full) on a folder of captioned images.

A thin wrapper: its options are the settings declared on `FinetuneConfig`
(`sdcli.training.config`); it builds one and calls `sdcli.training.finetune`,
which tests and Python users call directly. Runs unchanged under
`accelerate launch` or `torchrun` for several GPUs.
"""

from __future__ import annotations

import json as jsonlib
from typing import Any

from sdcli import options
from sdcli.declare import command
from sdcli.training.config import FinetuneConfig


def _finetune(json: options.Json = False, *, values: dict[str, Any]) -> None:
    """Fine-tune a pipeline on captioned images; writes LoRA weights or a full pipeline to --out."""
    from sdcli.training import finetune

    result = finetune(FinetuneConfig(**values))
    if result.world_size > 1 and not _is_main():
        return  # one answer on stdout, from the main process
    if json:
        print(jsonlib.dumps({
            "out": str(result.out), "weights": str(result.weights), "steps": result.steps,
            "final_loss": result.losses[-1] if result.losses else None, "world_size": result.world_size,
            "checkpoints": [str(p) for p in result.checkpoints],
            "validation_images": [str(p) for p in result.validation_images],
        }))
    else:
        print(result.out)


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


finetune_cmd = command(FinetuneConfig, _finetune)
