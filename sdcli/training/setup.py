"""Building what trains: the accelerator, the pipeline, LoRA adapters, precision and placement.

Each function is one step of `sdcli.training.loop.finetune`'s set-up; none of
them runs a training step.
"""

from __future__ import annotations

import contextlib
from typing import Any

from sdcli.errors import UsageError
from sdcli.training.config import TEXT_ENCODER_LORA_TARGETS, FinetuneConfig
from sdcli.training.outputs import LOGS_DIR


def make_accelerator(cfg: FinetuneConfig):
    from accelerate import Accelerator

    from sdcli.distributed import world_size
    from sdcli.pipeline import default_channels_last, resolve_device

    # accelerate only forms a CPU process group (gloo, under torchrun) when told it is on the CPU.
    device = cfg.device if cfg.device != "auto" else resolve_device("auto")
    cpu = device == "cpu"
    # "auto" settings are resolved here, so the settings record and a resume's comparison see what ran.
    if cfg.mixed_precision == "auto":
        cfg.mixed_precision = auto_precision(cfg, device)
    if cfg.channels_last is None:
        cfg.channels_last = default_channels_last(device, cfg.compile)
    if cpu and cfg.mixed_precision == "fp16":
        # torch has no float16 autocast on the CPU: half-precision weights would meet float32 inputs.
        raise UsageError("--mixed-precision fp16 needs a GPU; on the CPU use bf16 or no")
    # --log-with: accelerate's trackers, writing under OUT/logs (opened by `trackers.start` once set-up passed).
    extra = dict(log_with=cfg.trackers, project_dir=str(cfg.out / LOGS_DIR)) if cfg.trackers else {}
    from sdcli.training import sharding, zero

    if zero.available():
        zero.quiet(cpu)
    deepspeed = None
    if sharding.requested() == "deepspeed" and (world_size() > 1 or not cpu):  # on a GPU accelerate runs it alone too
        # DeepSpeed's config with sdcli's values; its precision is autocast over float32 weights (zero.py).
        deepspeed = zero.plugin(cfg, world_size())
        zero.set_precision(deepspeed, cfg.mixed_precision)
        extra["deepspeed_plugin"] = deepspeed
    try:
        accelerator = Accelerator(
            mixed_precision="no" if deepspeed is not None else cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation,
            cpu=cpu,
            # accelerate compiles what it prepares (the trained models); None keeps `accelerate config`'s choice.
            dynamo_backend="inductor" if cfg.compile else None,
            **extra,
        )
    except ValueError as exc:
        raise UsageError(f"--mixed-precision {cfg.mixed_precision}: {exc}") from None
    if deepspeed is not None:
        if cpu:
            zero.enable_on_cpu(accelerator, deepspeed)  # accelerate applies DeepSpeed on GPUs only
        zero.loads_whole(deepspeed)
    elif cpu:
        sharding.enable_on_cpu(accelerator)  # FSDP from accelerate's config, which it applies on GPUs only
    return accelerator


def auto_precision(cfg: FinetuneConfig, device: str) -> str:
    """What --mixed-precision auto means: half precision where it pays (CUDA; mps and the CPU train in
    float32), bf16 for SD3 and Flux, which were trained in it and overflow float16's range, where the
    card has it, fp16 (with a gradient scaler) otherwise."""
    if not device.startswith("cuda"):
        return "no"
    from sdcli.training.sharding import requested

    if requested() == "deepspeed":  # its float16 would need DeepSpeed's loss scaling (zero.plugin refuses it)
        return "bf16" if _bf16_supported() else "no"
    return "bf16" if _is_flow(cfg) and _bf16_supported() else "fp16"


def _is_flow(cfg: FinetuneConfig) -> bool:
    from sdcli.families import model_facts
    from sdcli.pipeline import local_kind, resolve_model

    model = resolve_model(cfg.model)
    return local_kind(model) != "file" and model_facts(model, cfg.revision).family.flow


def _bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@contextlib.contextmanager
def attention_for_training(device: str):
    """On CUDA, train without cuDNN's fused attention: its backward gives NaN gradients for some shapes on
    H100/H200 since torch 2.11 (pytorch/pytorch#196678; a tiny Flux LoRA went NaN by step 3 on an H100, then
    trained with it off). Flash and memory-efficient attention, both fused too, take its place; the setting is
    process-wide, so it is put back afterwards."""
    if not device.startswith("cuda"):
        yield
        return
    import torch

    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def release(accelerator) -> None:
    """Let a later finetune() in this process choose its own precision (accelerate keeps a singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    accelerator.end_training()
    AcceleratorState._reset_state()
    GradientState._reset_state()


def load(cfg: FinetuneConfig):
    """The pipeline and its training family; the settings the family's objective lacks are refused here,
    before anything is encoded or trained."""
    from sdcli.families import training_family
    from sdcli.pipeline import load_pipeline

    # On the CPU in float32: accelerate places what trains, park_frozen the rest. A base quantized by a CUDA-only
    # backend (bitsandbytes) is quantized as it loads onto the GPU it trains on.
    device = "cpu"
    if cfg.quantize:
        from sdcli.pipeline import resolve_device
        from sdcli.quantize import resolve

        trains_on = resolve_device(cfg.device)
        device = trains_on if resolve(cfg.quantize, trains_on).cuda_only else "cpu"
    loaded = load_pipeline(cfg.model, revision=cfg.revision, variant=cfg.variant, allow_pickle=cfg.allow_pickle,
                           device=device, dtype="float32", quantize=cfg.quantize)
    family = training_family(loaded.pipe)
    cfg.settle_for(loaded.family, family.flow, family.guidance_of(loaded.pipe))
    return loaded.pipe, family


def resolution_for(resolution: int | None, pipe, family) -> int:
    """The model's native size by default; otherwise a size its VAE and denoiser can divide cleanly."""
    native, multiple, largest = family.sizes(pipe)
    if resolution is None:
        return native
    if resolution % multiple:
        raise UsageError(f"--resolution {resolution} must be a multiple of {multiple} for this model (native {native})")
    if largest is not None and resolution > largest:
        raise UsageError(f"--resolution {resolution} is larger than this model's position embedding covers ({largest})")
    return resolution


def bucket_sides(cfg: FinetuneConfig, pipe, family) -> int:
    """Fill in --min-bucket and --max-bucket (half and twice --resolution, within what the model takes) and
    check them against the model; returns the bucket step, the granularity `resolution_for` checks."""
    _, step, largest = family.sizes(pipe)
    if not cfg.buckets:
        return step
    # With several --resolution sizes, the sides span them all: half the smallest to twice the largest.
    low, res = min(cfg.resolutions), max(cfg.resolutions)
    longest = largest // step * step if largest is not None else None
    if cfg.min_bucket is None:
        cfg.min_bucket = max(step, low // 2 // step * step)
    if cfg.max_bucket is None:
        cfg.max_bucket = res * 2 if longest is None else max(res, min(res * 2, longest))
    for flag, value in (("--min-bucket", cfg.min_bucket), ("--max-bucket", cfg.max_bucket)):
        if value % step:
            raise UsageError(f"{flag} {value} must be a multiple of {step} for this model (as --resolution must)")
    if cfg.min_bucket > low:
        raise UsageError(f"--min-bucket {cfg.min_bucket} is larger than --resolution {low}: no bucket would have "
                         "the model's area")
    if cfg.max_bucket < res:
        raise UsageError(f"--max-bucket {cfg.max_bucket} is smaller than --resolution {res}: not even the square "
                         "would fit")
    if longest is not None and cfg.max_bucket > longest:
        raise UsageError(f"--max-bucket {cfg.max_bucket} is larger than this model's position embedding covers "
                         f"({largest})")
    return step


def make_trainable(pipe, family, cfg: FinetuneConfig, device) -> list[Any]:
    """Freeze what is not trained, add LoRA adapters, and place each model; returns the trained ones,
    the denoiser (UNet or transformer) first."""
    import torch
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params

    set_seed(cfg.seed)  # LoRA's initial weights, identical on every process
    denoiser = getattr(pipe, family.denoiser)
    if cfg.channels_last and family.denoiser == "unet":
        # cuDNN's convolutions gain from it; a transformer is linear layers. Before LoRA is added, so its
        # (linear) weights keep the plain layout safetensors saves directly.
        denoiser.to(memory_format=torch.channels_last)
    encoders = [encoder for _, encoder in family.encoders(pipe)]
    pipe.vae.requires_grad_(False)
    for encoder in encoders:
        encoder.requires_grad_(False)
    denoiser.requires_grad_(not cfg.lora)
    if cfg.lora:
        add_lora(denoiser, cfg, cfg.lora_targets, "--lora-targets")
    trained = [denoiser]
    if cfg.train_text_encoder:
        for encoder in encoders:
            if cfg.lora:
                add_lora(encoder, cfg, TEXT_ENCODER_LORA_TARGETS, "text encoder")
            else:
                encoder.requires_grad_(True)
        trained += encoders
    if cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for encoder in encoders:
                encoder.gradient_checkpointing_enable()
    # Frozen denoiser weights may live in the training precision (half the memory); what trains stays float32.
    # The VAE and text encoder stay float32: they run once into the cache, and the SDXL VAE overflows in fp16.
    frozen_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    from sdcli.quantize import is_quantized

    from sdcli.training.sharding import shards

    # Under FSDP the denoiser stays where it loaded (the CPU): sharding moves each process's shard to its device,
    # so no GPU ever holds the whole of it.
    placed = device if shards() == 1 else None
    if is_quantized(denoiser):  # QLoRA: the base stays as quantized; only its LoRA layers are float32
        denoiser.to(device)
    else:
        denoiser.to(placed, dtype=frozen_dtype if cfg.lora else torch.float32)
    cast_training_params(trained, dtype=torch.float32)
    pipe.vae.to(device)
    for encoder in encoders:
        encoder.to(device)
    return trained


def add_lora(model, cfg: FinetuneConfig, targets, what: str) -> None:
    from sdcli.adapters import peft_config

    config = peft_config(cfg.adapter, cfg.rank, cfg.alpha, targets)
    try:
        model.add_adapter(config)
    except ValueError as exc:
        text = " ".join(str(exc).split())
        if "version of peft" in text.lower():
            # transformers' own PEFT integration (which diffusers' load_lora_weights also uses for text
            # encoders) refuses this peft: a text-encoder LoRA could be neither trained nor loaded.
            raise UsageError(f"--train-text-encoder with --lora: the installed transformers and peft do not work "
                             f"together ({text}); upgrade peft, or use --full, or drop --train-text-encoder") from None
        if "target" in text.lower():
            raise UsageError(f"{what} {','.join(targets)}: no such modules in {type(model).__name__}") from None
        raise


def park_frozen(pipe, inputs, device) -> None:
    """Move what the cache replaced off the accelerator, so training holds the denoiser only."""
    if inputs.cache_latents:
        pipe.vae.to("cpu")
    if inputs.cache_text:
        for encoder in inputs.text.encoders:
            encoder.to("cpu")


def make_optimizer(cfg: FinetuneConfig, params):
    import torch

    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
