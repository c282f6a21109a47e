"""`sdcli finetune`: fine-tune a pipeline (LoRA or full) on a folder of captioned images.

A thin wrapper: parse options into a `FinetuneConfig` and call
`sdcli.training.finetune`, which tests and Python users call directly.
Runs unchanged under `accelerate launch` or `torchrun` for several GPUs.
"""

from __future__ import annotations

import json as jsonlib
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdcli import defaults
from sdcli.errors import UsageError
from sdcli.options import (
    AllowPickle, ChannelsLast, Device, DeviceOpt, Json, Model, OutPath, Overwrite, Quiet, Revision, Variant,
)

TRAIN = "Training"
DATA = "Data"
LONG = "Checkpoints and validation"


class LrScheduler(str, Enum):
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


class MixedPrecision(str, Enum):
    auto = "auto"
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


def finetune_cmd(
    data: Annotated[Path, typer.Option("--data", help="Folder of images with captions (name.txt, metadata.jsonl or metadata.csv).", show_default=False, rich_help_panel=DATA)],
    model: Model = None,
    out: OutPath = None,
    revision: Revision = None,
    variant: Variant = None,
    allow_pickle: AllowPickle = False,
    device: DeviceOpt = Device.auto,
    channels_last: ChannelsLast = None,
    caption_column: Annotated[str, typer.Option(help="Caption column in metadata.jsonl/csv.", rich_help_panel=DATA)] = "text",
    strict: Annotated[bool, typer.Option("--strict", help="Stop at an unreadable image instead of skipping it.", rich_help_panel=DATA)] = False,
    allow_empty_captions: Annotated[bool, typer.Option("--allow-empty-captions", help="Train images without a caption as the null prompt instead of stopping.", rich_help_panel=DATA)] = False,
    resolution: Annotated[Optional[int], typer.Option(help="Square training size in pixels. Default: the model's native size.", show_default=False, rich_help_panel=DATA)] = None,
    center_crop: Annotated[bool, typer.Option("--center-crop/--random-crop", help="Crop the centre, or a random square each step (random crop cannot cache latents).", rich_help_panel=DATA)] = True,
    flip: Annotated[bool, typer.Option("--flip/--no-flip", help="Mirror half the images at random.", rich_help_panel=DATA)] = False,
    uncond_prob: Annotated[float, typer.Option(help="Chance a caption is replaced by the null prompt, so guidance has an unconditional branch to use.", rich_help_panel=TRAIN)] = defaults.UNCOND_PROB,
    snr_gamma: Annotated[Optional[float], typer.Option(help="Min-SNR loss weighting with this gamma (5 is common). Default: plain MSE.", show_default=False, rich_help_panel=TRAIN)] = None,
    noise_offset: Annotated[float, typer.Option(help="Offset noise strength (0.05-0.1 helps very dark/bright images).", rich_help_panel=TRAIN)] = 0.0,
    lora: Annotated[bool, typer.Option("--lora/--full", help="Train LoRA adapters (small file) or the whole UNet (a full pipeline folder).", rich_help_panel=TRAIN)] = True,
    rank: Annotated[int, typer.Option(help="LoRA rank.", rich_help_panel=TRAIN)] = 4,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (scale = alpha / rank). Default: the rank.", show_default=False, rich_help_panel=TRAIN)] = None,
    lora_targets: Annotated[str, typer.Option(help="Comma list of UNet modules that get LoRA adapters.", rich_help_panel=TRAIN)] = "to_k,to_q,to_v,to_out.0",
    train_text_encoder: Annotated[bool, typer.Option("--train-text-encoder", help="Train the text encoder(s) too (LoRA or full, like the UNet).", rich_help_panel=TRAIN)] = False,
    learning_rate: Annotated[Optional[float], typer.Option("--learning-rate", "--lr", help="AdamW learning rate. Default: 1e-4 for LoRA, 1e-5 for --full.", show_default=False, rich_help_panel=TRAIN)] = None,
    lr_scheduler: Annotated[LrScheduler, typer.Option(help="Learning-rate schedule after warm-up (diffusers.optimization).", rich_help_panel=TRAIN)] = LrScheduler.constant,
    lr_warmup_steps: Annotated[int, typer.Option(help="Steps of linear learning-rate warm-up.", rich_help_panel=TRAIN)] = 0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.", rich_help_panel=TRAIN)] = 1e-2,
    batch_size: Annotated[int, typer.Option(help="Images per step on each process.", rich_help_panel=TRAIN)] = 1,
    gradient_accumulation: Annotated[int, typer.Option(help="Micro-batches summed into one optimizer step.", rich_help_panel=TRAIN)] = 1,
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this (0: no clipping).", rich_help_panel=TRAIN)] = 1.0,
    mixed_precision: Annotated[MixedPrecision, typer.Option(help="Autocast precision for the UNet (frozen weights are stored in it too); auto: fp16 on CUDA, no elsewhere.", rich_help_panel=TRAIN)] = MixedPrecision.auto,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in backward: less memory, ~30% slower.", rich_help_panel=TRAIN)] = False,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile what trains (slow first steps, faster after).", rich_help_panel=TRAIN)] = False,
    ema: Annotated[bool, typer.Option("--ema", help="Keep an exponential moving average of the trained weights and save that.", rich_help_panel=TRAIN)] = False,
    ema_decay: Annotated[float, typer.Option(help="EMA decay per step.", rich_help_panel=TRAIN)] = 0.9999,
    use_8bit_adam: Annotated[bool, typer.Option("--use-8bit-adam", help="8-bit AdamW from bitsandbytes (must be installed).", rich_help_panel=TRAIN)] = False,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps to train. Default: 1000, unless --epochs.", show_default=False, rich_help_panel=TRAIN)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the data (instead of --max-steps).", show_default=False, rich_help_panel=TRAIN)] = None,
    seed: Annotated[int, typer.Option(help="Seed for LoRA init, data order, noise and validation images.", rich_help_panel=TRAIN)] = 0,
    cache: Annotated[bool, typer.Option("--cache/--no-cache", help="Encode images and captions once instead of every step.", rich_help_panel=TRAIN)] = True,
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps (0: only at the end and on Ctrl-C).", rich_help_panel=LONG)] = 500,
    keep_checkpoints: Annotated[int, typer.Option(help="Keep only the newest K checkpoints.", rich_help_panel=LONG)] = 3,
    resume: Annotated[Optional[str], typer.Option(help="Continue from 'latest' (in --out) or a checkpoint folder.", show_default=False, rich_help_panel=LONG)] = None,
    validation_prompt: Annotated[Optional[list[str]], typer.Option(help="Prompt rendered every --validation-every steps (repeatable).", show_default=False, rich_help_panel=LONG)] = None,
    validation_every: Annotated[int, typer.Option(help="Steps between validation images.", rich_help_panel=LONG)] = 100,
    validation_guidance: Annotated[float, typer.Option(help="Guidance scale for validation images.", rich_help_panel=LONG)] = defaults.GUIDANCE,
    validation_steps: Annotated[int, typer.Option(help="Sampling steps for validation images.", rich_help_panel=LONG)] = defaults.STEPS,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json: Json = False,
) -> None:
    """Fine-tune a pipeline on captioned images; writes LoRA weights or a full pipeline to --out."""
    from sdcli.training import FinetuneConfig, finetune

    if out is None:
        raise UsageError("--out is required: the folder the trained weights go to")
    config = FinetuneConfig(
        data=data, out=out, model=model, revision=revision, variant=variant, allow_pickle=allow_pickle,
        device=device.value, caption_column=caption_column, strict=strict, allow_empty_captions=allow_empty_captions,
        resolution=resolution, center_crop=center_crop, flip=flip, uncond_prob=uncond_prob, snr_gamma=snr_gamma,
        noise_offset=noise_offset, lora=lora, rank=rank, lora_alpha=lora_alpha,
        lora_targets=tuple(lora_targets.split(",")), train_text_encoder=train_text_encoder,
        learning_rate=learning_rate, lr_scheduler=lr_scheduler.value, lr_warmup_steps=lr_warmup_steps,
        weight_decay=weight_decay, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
        max_grad_norm=max_grad_norm, mixed_precision=mixed_precision.value,
        gradient_checkpointing=gradient_checkpointing, channels_last=channels_last, compile=compile, ema=ema,
        ema_decay=ema_decay, use_8bit_adam=use_8bit_adam,
        max_steps=max_steps, epochs=epochs, seed=seed, cache=cache, checkpoint_every=checkpoint_every,
        keep_checkpoints=keep_checkpoints, resume=resume, validation_prompts=list(validation_prompt or []),
        validation_every=validation_every, validation_guidance=validation_guidance,
        validation_steps=validation_steps, overwrite=overwrite, quiet=quiet,
    )
    result = finetune(config)
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
