"""`finetune(config)`: the training loop, readable top to bottom.

accelerate owns devices, mixed precision, gradient accumulation and the
process group (so `accelerate launch` / `torchrun` run the same code on many
GPUs); peft owns LoRA; diffusers owns the noise schedule, EMA and the lr
schedules. What is ours: which data a step sees, the objective
(`sdcli.training.objective`), the cache (`sdcli.training.inputs`) and
checkpoints that resume exactly.

Every random draw in a step comes from a generator seeded by (seed, rank,
micro-step), and the data order from (seed, epoch): a run stopped at step k and
resumed replays steps k+1... exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sdcli.errors import ModelError, UsageError
from sdcli.training import checkpoints, data, outputs
from sdcli.training.config import DEFAULT_MAX_STEPS, TEXT_ENCODER_LORA_TARGETS, FinetuneConfig
from sdcli.training.progress import Notes, TrainingProgress


@dataclass
class StepInfo:
    """What the per-step callback sees (the same shape for progress, tests and notebooks)."""

    step: int
    max_steps: int
    epoch: int
    loss: float
    lr: float
    images_per_s: float


@dataclass
class FinetuneResult:
    out: Path
    weights: Path
    steps: int
    losses: list[float]
    world_size: int
    samples_per_rank: list[int]
    cache_seconds: float
    train_seconds: float
    images_per_s: float  # global images per second over the steps this call ran
    checkpoints: list[Path] = field(default_factory=list)
    validation_images: list[Path] = field(default_factory=list)


class StopRequest:
    """First Ctrl-C asks the loop to stop after the current step (and checkpoint); a second one stops now."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave Ctrl-C as it is
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def finetune(cfg: FinetuneConfig, callback: Callable[[StepInfo], None] | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and write the result to ``cfg.out``."""
    from sdcli.pipeline import resolve_device, resolve_model

    # 1. Check inputs before anything heavy is loaded.
    cfg.check()
    cfg.model = _normalise_model(resolve_model(cfg.model))
    resume_dir = checkpoints.find_resume(cfg.resume, cfg.out) if cfg.resume else None
    outputs.check_out(cfg.out, cfg.overwrite, resuming=resume_dir is not None)
    if cfg.device != "auto":
        resolve_device(cfg.device)

    # 2. Processes, device and precision.
    accelerator = _accelerator(cfg)
    try:
        return _run(cfg, accelerator, resume_dir, callback)
    finally:
        _release(accelerator)


def _run(cfg: FinetuneConfig, accelerator, resume_dir: Path | None, callback) -> FinetuneResult:
    import torch
    from diffusers.optimization import get_scheduler

    from sdcli.training.inputs import TrainingInputs
    from sdcli.training.objective import step_loss, training_scheduler

    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    say = Notes(main and not cfg.quiet)
    kind = f", {accelerator.distributed_type.value}" if world > 1 else ""
    say(f"finetune: {world} process{'es' * (world > 1)} (world size {world}{kind}), "
        f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}")

    # 3. Data: what was found and what was skipped, before any model loads.
    report = data.discover(cfg.data, cfg.caption_column, cfg.strict, cfg.allow_empty_captions, warn=say)
    examples = report.examples

    # 4. Model: frozen VAE and text encoder, LoRA or full UNet.
    pipe, family = _load(cfg)
    cfg.resolution = _resolution(cfg.resolution, pipe)
    for line in report.lines(cfg.resolution):
        say(line)
    if cfg.uncond_prob == 0:
        say("warning: --uncond-prob 0: captions are never dropped, so the model learns no unconditional "
            "prediction and classifier-free guidance will have nothing to extrapolate from")
    noise_scheduler = training_scheduler(pipe.scheduler.config)
    trained = _make_trainable(pipe, cfg, accelerator.device)
    params = [p for model in trained for p in model.parameters() if p.requires_grad]
    say(f"training {'LoRA rank %d' % cfg.rank if cfg.lora else 'the full UNet'}"
        f"{' and the text encoder' if cfg.train_text_encoder else ''}: {sum(p.numel() for p in params):,} parameters, "
        f"{family}, {noise_scheduler.config.prediction_type}")

    # 5. Inputs: encode every image and caption once when nothing that makes them is trained.
    inputs = TrainingInputs(
        pipe, examples, resolution=cfg.resolution, center_crop=cfg.center_crop, device=accelerator.device,
        cache_latents=cfg.cache and cfg.center_crop, cache_text=cfg.cache and not cfg.train_text_encoder,
    )
    t_cache = time.perf_counter()
    if inputs.cache_latents or inputs.cache_text:
        # Every process builds the whole cache: each may see any example in a later epoch.
        inputs.build_cache(cfg.flip, batch_size=max(cfg.batch_size, 8))
        say(f"cached {'latents' if inputs.cache_latents else ''}"
            f"{' and ' if inputs.cache_latents and inputs.cache_text else ''}"
            f"{'text embeddings' if inputs.cache_text else ''} in {time.perf_counter() - t_cache:.1f}s")
    if not inputs.cache_latents and cfg.cache:
        say("note: --random-crop encodes each image every step (a cached latent has one crop only)")
    cache_seconds = time.perf_counter() - t_cache
    _park_frozen(pipe, inputs, accelerator.device)

    # 6. Optimizer, lr schedule, EMA; accelerate wraps what needs wrapping (DDP, autocast).
    per_epoch = data.batches_per_epoch(len(examples), cfg.batch_size, world)
    max_steps = cfg.max_steps or (math.ceil(cfg.epochs * per_epoch / cfg.gradient_accumulation)
                                  if cfg.epochs else DEFAULT_MAX_STEPS)
    optimizer = _optimizer(cfg, params)
    # A prepared scheduler steps once per process per optimizer step, hence the * world.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=max_steps * world)
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    models, optimizer, lr_scheduler = list(prepared[:-2]), prepared[-2], prepared[-1]
    unet = models[0]
    ema = None
    if cfg.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if cfg.lora:
        checkpoints.keep_trainable_only(accelerator)

    # 7. Resume: weights, optimizer, lr schedule, EMA and RNG from the checkpoint; data position from its step.
    start = 0
    if resume_dir is not None:
        start = _resume(cfg, accelerator, resume_dir, world, say)
    if main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and resume_dir is None:
            outputs.clear_previous(cfg.out)
    accelerator.wait_for_everyone()
    loss_log = outputs.LossLog(cfg.out / outputs.LOSS_FILE, start if resume_dir else None) if main else None

    def state(step: int) -> dict[str, Any]:
        return {"step": step, "world_size": world, "config": cfg.to_json(), "family": family}

    # 8. The loop: one micro-batch per iteration, an optimizer step every --gradient-accumulation.
    step, micro = start, start * cfg.gradient_accumulation
    losses: list[float] = []
    saved: list[Path] = []
    rendered: list[Path] = []
    samples_seen, running = 0, []
    epoch_plan: tuple[int, list[data.Item]] | None = None
    progress = TrainingProgress(main and not cfg.quiet, max_steps, start)
    images_per_step = cfg.batch_size * cfg.gradient_accumulation * world
    t_train = time.perf_counter()
    for model in models:
        model.train()
    try:
        with StopRequest() as stop:
            while step < max_steps:
                epoch, k = divmod(micro, per_epoch)
                if epoch_plan is None or epoch_plan[0] != epoch:
                    epoch_plan = (epoch, data.epoch_items(len(examples), epoch, cfg.seed, cfg.flip, cfg.uncond_prob))
                items = data.rank_batch(epoch_plan[1], k, cfg.batch_size, rank, world)
                generator = torch.Generator(accelerator.device).manual_seed(data.mix_seed(cfg.seed, 2, rank, micro))
                with accelerator.accumulate(*models):
                    batch = inputs.batch(items, generator)
                    loss = step_loss(unet, noise_scheduler, batch.latents, batch.cond, generator,
                                     noise_offset=cfg.noise_offset, snr_gamma=cfg.snr_gamma)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                micro += 1
                samples_seen += len(items)
                running.append(loss.detach().float())
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if ema is not None:
                    ema.step(params)
                # One collective per step: the mean loss over processes, and whether any was asked to stop,
                # so every process stops (and checkpoints) at the same step. Also a CPU-GPU sync point.
                stats = torch.stack([torch.stack(running).mean(), torch.tensor(float(stop.requested), device=loss.device)])
                stats = accelerator.reduce(stats, "sum").tolist()
                mean_loss, stopping = stats[0] / world, stats[1] > 0
                running = []
                losses.append(mean_loss)
                lr = lr_scheduler.get_last_lr()[0]
                rate = progress.rate(step) * images_per_step
                if loss_log:
                    loss_log.append(step=step, epoch=epoch, loss=mean_loss, lr=lr, images_per_s=rate,
                                    elapsed_s=time.perf_counter() - t_train)
                progress.update(step, mean_loss)
                if callback:
                    callback(StepInfo(step, max_steps, epoch, mean_loss, lr, rate))
                if stopping:
                    progress.close()
                    path = checkpoints.save_checkpoint(accelerator, cfg.out, step, state(step), cfg.keep_checkpoints)
                    say(f"interrupted: saved {path}; continue with --resume latest")
                    raise KeyboardInterrupt
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < max_steps:
                    saved.append(checkpoints.save_checkpoint(accelerator, cfg.out, step, state(step), cfg.keep_checkpoints))
                if cfg.validation_prompts and step % cfg.validation_every == 0 and step < max_steps:
                    rendered += _validate(cfg, accelerator, pipe, inputs, ema, params, step)
    finally:
        progress.close()
        if loss_log:
            loss_log.close()
    train_seconds = time.perf_counter() - t_train

    # 9. Outputs: a last checkpoint to extend the run from, validation images, the weights, settings, card, curve.
    if cfg.checkpoint_every and step > start:
        saved.append(checkpoints.save_checkpoint(accelerator, cfg.out, step, state(step), cfg.keep_checkpoints))
    if cfg.validation_prompts and step > start:
        rendered += _validate(cfg, accelerator, pipe, inputs, ema, params, step)
    per_rank = accelerator.gather(torch.tensor([samples_seen], device=accelerator.device)).tolist()
    say(f"samples per process: {', '.join(map(str, per_rank))} (world size {world})")
    weights = cfg.out / (outputs.LORA_FILE if cfg.lora else "model_index.json")
    if main:
        if ema is not None:
            ema.copy_to(params)
        raw = [accelerator.unwrap_model(m) for m in models]
        if cfg.lora:
            weights = outputs.save_lora(pipe, raw[0], raw[1:], cfg.out)
        else:
            weights = outputs.save_full(pipe, cfg.out)
        record = {
            "base_model": cfg.model, "family": family, "prediction_type": noise_scheduler.config.prediction_type,
            "method": "lora" if cfg.lora else "full", "steps": step, "world_size": world,
            "samples_per_rank": per_rank, "final_loss": losses[-1] if losses else float("nan"),
            "data": {"images": len(examples), "skipped": [list(s) for s in report.skipped],
                     "captions": dict(report.caption_sources)},
            "config": cfg.to_json(),
        }
        outputs.write_settings(cfg.out, record)
        outputs.write_model_card(cfg.out, record)
        outputs.plot_loss(cfg.out / outputs.LOSS_FILE, cfg.out / outputs.LOSS_PLOT)
        say(f"wrote {weights}")
    accelerator.wait_for_everyone()
    ran = step - start
    return FinetuneResult(
        out=cfg.out, weights=weights, steps=step, losses=losses, world_size=world, samples_per_rank=per_rank,
        cache_seconds=cache_seconds, train_seconds=train_seconds,
        images_per_s=ran * images_per_step / train_seconds if train_seconds > 0 and ran else 0.0,
        checkpoints=saved, validation_images=rendered,
    )


# ---------------------------------------------------------------------------
# The steps above, one function each.


def _normalise_model(model: str) -> str:
    """Local paths become absolute, so the settings JSON and a resume name the same model."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _accelerator(cfg: FinetuneConfig):
    from accelerate import Accelerator

    from sdcli.pipeline import resolve_device

    # accelerate only forms a CPU process group (gloo, under torchrun) when told it is on the CPU.
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and resolve_device("auto") == "cpu")
    try:
        return Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation,
            cpu=cpu,
        )
    except ValueError as exc:
        raise UsageError(f"--mixed-precision {cfg.mixed_precision}: {exc}") from None


def _release(accelerator) -> None:
    """Let a later finetune() in this process choose its own precision (accelerate keeps a singleton)."""
    from accelerate.state import AcceleratorState, GradientState

    accelerator.end_training()
    AcceleratorState._reset_state()
    GradientState._reset_state()


def _load(cfg: FinetuneConfig):
    from sdcli.pipeline import load_pipeline

    # On the CPU in float32: accelerate places what trains, _park_frozen the rest.
    loaded = load_pipeline(cfg.model, revision=cfg.revision, variant=cfg.variant, allow_pickle=cfg.allow_pickle,
                           device="cpu", dtype="float32")
    if loaded.family not in ("sd1", "sd2", "sdxl"):
        raise ModelError(f"finetune supports Stable Diffusion 1.x, 2.x and SDXL pipelines; {cfg.model} is a {loaded.family}")
    return loaded.pipe, loaded.family


def _resolution(resolution: int | None, pipe) -> int:
    """The model's native size by default; otherwise a size its VAE and UNet can halve cleanly."""
    vae_factor = pipe.vae_scale_factor
    native = pipe.unet.config.sample_size * vae_factor
    if resolution is None:
        return native
    multiple = vae_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise UsageError(f"--resolution {resolution} must be a multiple of {multiple} for this model (native {native})")
    return resolution


def _make_trainable(pipe, cfg: FinetuneConfig, device) -> list[Any]:
    """Freeze what is not trained, add LoRA adapters, and place each model; returns the trained ones."""
    import torch
    from accelerate.utils import set_seed
    from diffusers.training_utils import cast_training_params

    set_seed(cfg.seed)  # LoRA's initial weights, identical on every process
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    pipe.vae.requires_grad_(False)
    for encoder in encoders:
        encoder.requires_grad_(False)
    pipe.unet.requires_grad_(not cfg.lora)
    if cfg.lora:
        _add_lora(pipe.unet, cfg, cfg.lora_targets, "--lora-targets")
    trained = [pipe.unet]
    if cfg.train_text_encoder:
        for encoder in encoders:
            if cfg.lora:
                _add_lora(encoder, cfg, TEXT_ENCODER_LORA_TARGETS, "text encoder")
            else:
                encoder.requires_grad_(True)
        trained += encoders
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for encoder in encoders:
                encoder.gradient_checkpointing_enable()
    # Frozen UNet weights may live in the training precision (half the memory); what trains stays float32.
    # The VAE and text encoder stay float32: they run once into the cache, and the SDXL VAE overflows in fp16.
    frozen_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    pipe.unet.to(device, dtype=frozen_dtype if cfg.lora else torch.float32)
    cast_training_params(trained, dtype=torch.float32)
    pipe.vae.to(device)
    for encoder in encoders:
        encoder.to(device)
    return trained


def _add_lora(model, cfg: FinetuneConfig, targets, what: str) -> None:
    from peft import LoraConfig

    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=list(targets))
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


def _park_frozen(pipe, inputs, device) -> None:
    """Move what the cache replaced off the accelerator, so training holds the UNet only."""
    if inputs.cache_latents:
        pipe.vae.to("cpu")
    if inputs.cache_text:
        for encoder in inputs.text.encoders:
            encoder.to("cpu")


def _optimizer(cfg: FinetuneConfig, params):
    import torch

    if cfg.use_8bit_adam:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _resume(cfg: FinetuneConfig, accelerator, path: Path, world: int, say) -> int:
    saved = checkpoints.read_state(path)
    differ = cfg.incompatible_with(saved.get("config", {}))
    if differ:
        now = cfg.to_json()
        changes = ", ".join(f"{name} ({saved['config'][name]!r} -> {now[name]!r})" for name in differ)
        raise UsageError(f"--resume {path}: settings differ from the checkpoint's, so it would not continue the same run: {changes}")
    if saved.get("world_size", 1) != world:
        raise UsageError(f"--resume {path}: made with {saved.get('world_size')} processes, now {world}; "
                         "resume with the same number so the data order continues")
    for name in ("model", "data"):
        if saved["config"].get(name) != cfg.to_json()[name]:
            say(f"warning: --{name} differs from the checkpoint's ({saved['config'].get(name)})")
    checkpoints.load_checkpoint(accelerator, path, trainable_only=cfg.lora)
    say(f"resumed from {path} at step {saved['step']}")
    return int(saved["step"])


def _validate(cfg: FinetuneConfig, accelerator, pipe, inputs, ema, params, step: int) -> list[Path]:
    """Render the validation prompts on the main process (EMA weights if any); the others wait."""
    paths: list[Path] = []
    if accelerator.is_main_process:
        device = accelerator.device
        pipe.vae.to(device)
        for encoder in inputs.text.encoders:
            encoder.to(device)
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        try:
            with accelerator.autocast():
                paths = outputs.render_validation(
                    pipe, cfg.validation_prompts, cfg.out, step, guidance=cfg.validation_guidance,
                    steps=cfg.validation_steps, resolution=cfg.resolution, seed=cfg.seed)
        finally:
            if ema is not None:
                ema.restore(params)
            _park_frozen(pipe, inputs, device)
    accelerator.wait_for_everyone()
    return paths
