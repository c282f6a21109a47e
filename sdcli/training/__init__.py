"""Fine-tuning a diffusion pipeline on captioned images (`sdcli finetune`).

- `config`: every training setting in one dataclass, checked before any work.
- `data`: finding images and captions, and turning an image into pixels.
- `objective`: the maths of one training step (noise, target, weighting; DDPM and flow matching).
- `inputs`: latents and text embeddings for a batch, computed live or from a cache.
- `setup`: the accelerator, the pipeline, LoRA adapters, precision and placement.
- `checkpoints`: atomic save, resume and pruning of training state.
- `outputs`: what a finished run leaves in OUT (weights, settings, card, loss log, validation images).
- `kohya`: the LoRA again in kohya's key layout, the file AUTOMATIC1111 and ComfyUI load.
- `profile`: where training puts its timesteps on a schedule, for `inspect-schedule --training`.
- `validation`: the held-out loss at fixed timesteps and noise (--validation-split, --validation-data).
- `trackers`: --log-with's TensorBoard and wandb logging, through accelerate.
- `loop`: `finetune(config)`, the training loop that ties them together (its progress
  bar and notes come from `sdcli.progress`, shared with `generate`).

Nothing here imports torch at module level; `sdcli --help` stays instant.
"""

from __future__ import annotations

from sdcli.training.config import FinetuneConfig


def finetune(config: FinetuneConfig, **kwargs):
    """Train as ``config`` says; see `sdcli.training.loop.finetune`."""
    from sdcli.training.loop import finetune as _finetune

    return _finetune(config, **kwargs)


__all__ = ["FinetuneConfig", "finetune"]
