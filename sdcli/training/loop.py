"""`finetune(config)`: set up, train, write the outputs; readable top to bottom.

accelerate owns devices, mixed precision, gradient accumulation and the
process group (so `accelerate launch` / `torchrun` run the same code on many
GPUs, sharded by FSDP2 when accelerate's config says so: `sdcli.training.sharding`);
peft owns LoRA; diffusers owns the noise schedule, EMA and the lr schedules.
What is ours: which data a step sees (`sdcli.training.data`), the objective
(`sdcli.training.objective`), the cache (`sdcli.training.inputs`) and
checkpoints that resume exactly (`sdcli.training.checkpoints`).

Every random draw in a step comes from a generator seeded by (seed, rank,
micro-step), and the data order from (seed, epoch): a run stopped at step k and
resumed replays steps k+1... exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sdcli import threads
from sdcli.errors import OutputError, SdcliError, UsageError
from sdcli.training import (buckets, checkpoints, data, outputs, prior, setup, sharding, trackers, validation,
                            zero)
from sdcli.training.config import DEFAULT_MAX_STEPS, FinetuneConfig
from sdcli.progress import Counted, Notes, TrainingProgress, while_slow


@dataclass
class StepInfo:
    """What the per-step callback sees (the same shape for progress, tests and notebooks)."""

    step: int
    max_steps: int
    epoch: int
    loss: float
    lr: float
    images_per_s: float
    val_loss: float | None = None  # the held-out loss, on the steps that measure one


@dataclass
class FinetuneResult:
    out: Path
    weights: Path
    steps: int
    losses: list[float]  # mean loss of each step this call ran
    world_size: int
    samples_per_rank: list[int]
    cache_seconds: float
    train_seconds: float
    images_per_s: float  # global images per second over the steps this call ran
    checkpoints: list[Path] = field(default_factory=list)
    validation_images: list[Path] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> held-out loss, for the steps this call ran


@dataclass
class Run:
    """Everything set up for training; `_train` and `_finish` read it."""

    cfg: FinetuneConfig
    accelerator: Any
    say: Notes
    report: data.DataReport
    pipe: Any
    family: Any  # sdcli.families.Family
    noise_scheduler: Any  # DDPM's, or the flow-matching scheduler whose training σ's are drawn from
    inputs: Any  # TrainingInputs
    models: list[Any]  # as prepared by accelerate; the denoiser (UNet or transformer) first
    params: list[Any]  # the trained parameters
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    per_epoch: int  # micro-batches per process per epoch
    max_steps: int
    start: int  # the step this call starts from (0, or a checkpoint's)
    cache_seconds: float
    held_out: validation.HeldOut | None = None  # --validation-split / --validation-data
    layout: buckets.Layout | None = None  # each example's size; the epoch's groups of one size
    classes: prior.ClassImages | None = None  # DreamBooth's class images (--class-data)
    fingerprint: str | None = None  # the base model's (`checkpoints.model_fingerprint`), recorded in checkpoints

    @property
    def several_captions(self) -> bool:
        """Whether any image has several captions (--captions-from), so each sample draws one."""
        return any(e.captions for e in self.report.examples)

    @property
    def family_name(self) -> str:
        """sd1, sd2, sdxl, sd3 or flux: what records call the model."""
        return self.family.record_name(self.pipe)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def checkpoint(self, step: int) -> Path:
        state = {"step": step, "world_size": self.world, "config": self.cfg.to_json(), "family": self.family_name,
                 "model_fingerprint": self.fingerprint}
        if self.accelerator.is_main_process:
            outputs.record_written(self.cfg.out, {checkpoints.DIRNAME})
        return checkpoints.save_checkpoint(self.accelerator, self.cfg.out, step, state, self.cfg.keep_checkpoints,
                                           self.parts)

    @property
    def parts(self) -> checkpoints.Parts:
        return checkpoints.Parts(self.models, self.optimizer, self.lr_scheduler, self.ema, self.cfg.lora)


@dataclass
class Trained:
    step: int
    losses: list[float]
    samples_seen: int
    seconds: float
    saved: list[Path]
    rendered: list[Path]
    val_losses: dict[int, float] = field(default_factory=dict)


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
    """Fine-tune ``cfg.model`` on ``cfg.data`` and write the result to ``cfg.out``.

    ``callback(StepInfo)`` runs after every optimizer step. Ctrl-C (SIGINT) stops after the
    current step, saves a checkpoint and raises KeyboardInterrupt.
    """
    from sdcli.families import model_facts
    from sdcli.pipeline import absolute_if_local, local_kind, resolve_device, resolve_model

    # 1. Check inputs before anything heavy is loaded.
    cfg.check()
    sharding.check(cfg)  # accelerate's FSDP/DeepSpeed config: what cannot shard is refused before loading
    cfg.model = absolute_if_local(resolve_model(cfg.model))
    if local_kind(cfg.model) != "file":
        facts = model_facts(cfg.model, cfg.revision)  # a pipeline class of no family sdcli knows is refused here
        if facts.family.encode is None:  # a family without training hooks (the generic one): refused before loading
            from sdcli.errors import ModelError

            raise ModelError(f"--model {cfg.model} is a {facts.class_name}, which sdcli generates with but cannot "
                             "train; finetune trains Stable Diffusion 1.x/2.x, SDXL, SD3, Flux.1, FLUX.2, Chroma, "
                             "Z-Image and Qwen-Image pipelines")
        family = facts.family
        if family.references(facts.class_name or "") and not family.references_optional:
            # an editing model learns from (reference, result) pairs
            from sdcli.errors import ModelError

            raise ModelError(f"--model {cfg.model} is a {facts.class_name}, an editing model, which learns from "
                             "reference images finetune does not take; train its text-to-image model instead")
    resume_dir = checkpoints.find_resume(cfg.resume, cfg.out) if cfg.resume else None
    if resume_dir is not None:
        checkpoints.check_unpickled(resume_dir, cfg.allow_pickle)  # a checkpoint that would unpickle: refused now
    outputs.check_out(cfg.out, cfg.overwrite, resuming=resume_dir is not None, writes=outputs.names_written(cfg))
    if cfg.device != "auto":
        resolve_device(cfg.device)
    # One lock for the whole run, taken by the main process (RANK 0 under torchrun/accelerate).
    lock = outputs.lock_out(cfg.out) if os.environ.get("RANK", "0") == "0" else None

    # 2. Processes, device and precision; on a CPU, generate's thread rule (sdcli.threads) for all that runs the
    # model here: loading, class images, training steps and validation images.
    try:
        accelerator = setup.make_accelerator(cfg)
        threads.apply(cfg.threads, str(accelerator.device))
        try:
            with setup.attention_for_training(str(accelerator.device)):
                run = _setup(cfg, accelerator, resume_dir)
                trained = _train(run, callback)
                return _finish(run, trained)
        finally:
            setup.release(accelerator)
    finally:
        if lock is not None:
            lock.release()


def _setup(cfg: FinetuneConfig, accelerator, resume_dir: Path | None) -> Run:
    from diffusers.optimization import get_scheduler

    from sdcli.images import check_name_length
    from sdcli import kohya
    from sdcli.training.inputs import TrainingInputs
    from sdcli.training.objective import flow_training_scheduler, training_scheduler

    world = accelerator.num_processes
    say = Notes(accelerator.is_main_process and not cfg.quiet)
    kind = f", {accelerator.distributed_type.value}" if world > 1 else ""
    say(f"finetune: {world} process{'es' * (world > 1)} (world size {world}{kind}), "
        f"device {accelerator.device}, mixed precision {cfg.mixed_precision}")

    # 3. Data: every image opened once; what cannot train is skipped (or stops the run) here.
    report = data.discover(cfg.data_sources, cfg.caption_column, cfg.strict, cfg.allow_empty_captions, warn=say,
                           caption_extension=cfg.caption_extension, masks=cfg.masks, alpha_mask=cfg.alpha_mask,
                           captions_from=cfg.captions_from)
    report, held_out = validation.select(cfg, report, warn=say)

    # 4. Model: frozen VAE and text encoder, LoRA or the full denoiser; options its objective lacks are refused.
    with while_slow(say, f"loading {cfg.model} ..."):  # minutes for a big model: a log says what the run waits for
        pipe, family = setup.load(cfg)
    name = family.record_name(pipe)
    tool_file = name in family.kohya or family.comfy_lora_prefix  # the kohya or ComfyUI copy beside diffusers'
    if cfg.lora and tool_file and cfg.lora_format == kohya.LoraFormat.both.value:
        # Named after OUT: a long --out name can make it too long only now the family is known.
        check_name_length(cfg.out / kohya.file_name(cfg.out), "--out")
    fingerprint = checkpoints.model_fingerprint(pipe)  # before any adapter: the base model as loaded
    if resume_dir is not None:
        # First, so a checkpoint of another model is called that, not a list of settings that differ.
        checkpoints.check_same_model(resume_dir, checkpoints.read_state(resume_dir), cfg.model, name,
                                     fingerprint)
    sides = tuple(setup.resolution_for(r, pipe, family) for r in (cfg.resolutions or (None,)))
    cfg.resolution = sides[0] if len(sides) == 1 else sides
    step = setup.bucket_sides(cfg, pipe, family)
    # What cannot fit (a step in memory, the weights on disk) is refused before anything is encoded or trained.
    from sdcli.memory import check_training

    check_training(cfg, pipe, family, str(accelerator.device))
    layout, examples = buckets.assign_each(report, cfg.resolutions, step, cfg.min_bucket, cfg.max_bucket,
                                           enabled=cfg.buckets, upscale=cfg.upscale, strict=cfg.strict, warn=say)
    if held_out is not None:
        validation.lay_out(held_out, lambda held: buckets.assign(
            held, max(cfg.resolutions), step, cfg.min_bucket, cfg.max_bucket, enabled=cfg.buckets, upscale=cfg.upscale,
            strict=cfg.strict, warn=say))
    if resume_dir is not None:
        _same_run(cfg, resume_dir)  # every setting is settled: refuse a different run before anything is encoded
    classes = None
    if cfg.class_data is not None:
        # The base model makes the missing class images, before any adapter is added to it.
        made = prior.fill(cfg, pipe, family, accelerator.device, accelerator.is_main_process)
        accelerator.wait_for_everyone()
        classes = prior.load(cfg, *made, warn=say)
        classes.layout, classes.examples = buckets.assign_each(
            classes.report, cfg.resolutions, step, cfg.min_bucket, cfg.max_bucket, enabled=cfg.buckets,
            upscale=cfg.upscale, strict=cfg.strict, warn=say)
    for line in report.lines(None if cfg.buckets else max(cfg.resolutions)):
        say(line)
    for line in layout.lines():
        say(line)
    if held_out is not None:
        say(held_out.line())
    if classes is not None:
        say(classes.line(cfg.prior_loss_weight, cfg.class_prompt))
    too_long = data.long_captions(report, getattr(pipe, "tokenizer", None)) if say.enabled else None
    if too_long:
        say(too_long)
    if cfg.uncond_prob == 0:
        say("warning: --uncond-prob 0: captions are never dropped, so the model learns no unconditional "
            "prediction and classifier-free guidance will have nothing to extrapolate from")
    noise_scheduler = (flow_training_scheduler if family.flow else training_scheduler)(pipe.scheduler.config)
    trained = setup.make_trainable(pipe, family, cfg, accelerator.device)
    if resume_dir is not None:  # a checkpoint from before fingerprints: its weights must fit these models
        checkpoints.check_fits(resume_dir, checkpoints.read_state(resume_dir), cfg.model, name, trained, cfg.lora)
    params = [p for model in trained for p in model.parameters() if p.requires_grad]
    kind = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}[cfg.adapter]
    say(f"training {f'{kind} rank {cfg.rank}' if cfg.lora else 'the full ' + family.denoiser}"
        f"{' and the text encoder' if cfg.train_text_encoder else ''}: {sum(p.numel() for p in params):,} parameters, "
        f"{name}, {_objective(cfg, family, noise_scheduler)}")

    # 5. Inputs: encode every image and caption once when nothing that makes them is trained.
    inputs = TrainingInputs(
        pipe, examples, family=family, sizes=layout.sizes, center_crop=cfg.center_crop,
        device=accelerator.device,
        cache_latents=cfg.cache and cfg.center_crop, cache_text=cfg.cache and not cfg.train_text_encoder,
        shuffle_captions=cfg.shuffle_captions, keep_tokens=cfg.keep_tokens, unmasked_weight=cfg.unmasked_weight,
    )
    t_cache = time.perf_counter()
    if inputs.cache_latents or inputs.cache_text:
        # Every process builds the whole cache: each may see any example in a later epoch. In batches
        # of the training batch size, so building it never needs more memory than a training step.
        inputs.build_cache(cfg.flip, batch_size=cfg.batch_size, progress=Counted("caching", say.enabled))
        what = " and ".join(w for w, on in (("latents", inputs.cache_latents), ("text embeddings", inputs.cache_text)) if on)
        say(f"cached {what} in {time.perf_counter() - t_cache:.1f}s")
    if cfg.cache and not inputs.cache_latents:
        say("note: --random-crop encodes each image every step (a cached latent has one crop only)")
    if cfg.cache and cfg.shuffle_captions and not cfg.train_text_encoder:
        say("note: --shuffle-captions encodes captions every step (each step has its own tag order)")
    if held_out is not None:
        # Centre crops in their buckets, so a held-out latent is one fixed thing: cached whenever --cache is on.
        held_out.inputs = TrainingInputs(
            pipe, held_out.examples, family=family, sizes=held_out.sizes, center_crop=True,
            device=accelerator.device, cache_latents=cfg.cache, cache_text=inputs.cache_text,
            unmasked_weight=cfg.unmasked_weight)
        if cfg.cache:
            held_out.inputs.build_cache(False, batch_size=cfg.batch_size,
                                        progress=Counted("caching held-out", say.enabled))
    if classes is not None:
        # The class prompt is never dropped nor shuffled (`sdcli.training.prior`); its latents cache like the rest.
        classes.inputs = TrainingInputs(
            pipe, classes.examples, family=family, sizes=classes.layout.sizes, center_crop=cfg.center_crop,
            device=accelerator.device, cache_latents=inputs.cache_latents, cache_text=inputs.cache_text)
        if inputs.cache_latents or inputs.cache_text:
            classes.inputs.build_cache(cfg.flip, batch_size=cfg.batch_size,
                                       progress=Counted("caching class images", say.enabled))
        classes.per_epoch = data.batches_per_epoch(classes.layout.groups(), cfg.batch_size * world)
    cache_seconds = time.perf_counter() - t_cache
    setup.park_frozen(pipe, inputs, accelerator.device)

    # 6. Optimizer, lr schedule, EMA; accelerate wraps what needs wrapping (DDP, autocast).
    per_epoch = data.batches_per_epoch(layout.groups(), cfg.batch_size * world)
    max_steps = cfg.max_steps or (math.ceil(cfg.epochs * per_epoch / cfg.gradient_accumulation)
                                  if cfg.epochs else DEFAULT_MAX_STEPS)
    optimizer = setup.make_optimizer(cfg, params)
    # A prepared scheduler steps once per process per optimizer step, hence the * world.
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * world,
                                 num_training_steps=max_steps * world)
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    models, optimizer, lr_scheduler = list(prepared[:-2]), prepared[-2], prepared[-1]
    # FSDP replaces each parameter by its shard (a new tensor), ZeRO-3 empties it and keeps its partition
    # aside: the loop, EMA and clipping use what this process holds.
    params = zero.local_views([p for model in models for p in model.parameters() if p.requires_grad])
    if cfg.train_text_encoder:
        inputs.text.use(models[1:])
        if held_out is not None:
            held_out.inputs.text.use(models[1:])
        if classes is not None:
            classes.inputs.text.use(models[1:])
    ema = None
    if cfg.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=cfg.ema_decay)
        ema.to(accelerator.device)

    # 7. Resume: weights, optimizer, lr schedule, EMA and RNG from the checkpoint; data position from its step.
    parts = checkpoints.Parts(models, optimizer, lr_scheduler, ema, cfg.lora)
    start = _resume(cfg, accelerator, resume_dir, say, parts) if resume_dir is not None else 0
    if accelerator.is_main_process:
        cfg.out.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and resume_dir is None:
            outputs.clear_previous(cfg.out)
        outputs.record_written(cfg.out, {outputs.LOSS_FILE} | ({outputs.LOGS_DIR} if cfg.trackers else set()))
    accelerator.wait_for_everyone()
    trackers.start(accelerator, cfg, cfg.out / outputs.LOGS_DIR)
    return Run(cfg=cfg, accelerator=accelerator, say=say, report=report, pipe=pipe, family=family,
               noise_scheduler=noise_scheduler, inputs=inputs, models=models, params=params, optimizer=optimizer,
               lr_scheduler=lr_scheduler, ema=ema, per_epoch=per_epoch, max_steps=max_steps, start=start,
               cache_seconds=cache_seconds, held_out=held_out, layout=layout, classes=classes, fingerprint=fingerprint)


def _train(run: Run, callback) -> Trained:
    """8. The loop: one micro-batch per iteration, an optimizer step every --gradient-accumulation."""
    import torch

    cfg, accelerator, denoiser = run.cfg, run.accelerator, run.models[0]
    rank, world, main = accelerator.process_index, run.world, accelerator.is_main_process
    groups = run.layout.groups()
    step, micro = run.start, run.start * cfg.gradient_accumulation
    losses: list[float] = []
    saved: list[Path] = []
    rendered: list[Path] = []
    val_losses: dict[int, float] = {}
    samples_seen, running = 0, []
    plan: tuple[int, list[list[data.Item]]] | None = None
    class_plan: tuple[int, list[list[data.Item]]] | None = None
    loss_log = outputs.LossLog(cfg.out / outputs.LOSS_FILE, run.start if cfg.resume else None) if main else None
    progress = TrainingProgress(main and not cfg.quiet, run.max_steps, run.start)
    images_per_step = cfg.batch_size * cfg.gradient_accumulation * world
    t0 = time.perf_counter()
    for model in run.models:
        model.train()
    try:
        with StopRequest() as stop:
            while step < run.max_steps:
                epoch, k = divmod(micro, run.per_epoch)
                if plan is None or plan[0] != epoch:
                    plan = (epoch, data.epoch_batches(groups, epoch, cfg.seed, cfg.flip, cfg.uncond_prob,
                                                      cfg.batch_size * world, cfg.shuffle_captions,
                                                      several_captions=run.several_captions))
                items = data.rank_share(plan[1][k], cfg.batch_size, rank)
                generator = torch.Generator(accelerator.device).manual_seed(data.mix_seed(cfg.seed, 2, rank, micro))
                class_items = None
                if run.classes is not None:
                    # Class batches run through the class images' own epochs, by the global micro-batch count, so
                    # every class image takes its turn and the order is still a function of the seed alone.
                    class_epoch, j = divmod(micro, run.classes.per_epoch)
                    if class_plan is None or class_plan[0] != class_epoch:
                        class_plan = (class_epoch, data.epoch_batches(
                            run.classes.layout.groups(), class_epoch, data.mix_seed(cfg.seed, 4), cfg.flip, 0.0,
                            cfg.batch_size * world))
                    class_items = data.rank_share(class_plan[1][j], cfg.batch_size, rank)
                with accelerator.accumulate(*run.models):
                    loss = _micro_loss(run, denoiser, items, class_items, generator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
                    run.optimizer.step()
                    run.lr_scheduler.step()
                    run.optimizer.zero_grad(set_to_none=True)
                micro += 1
                samples_seen += len(items)
                running.append(loss.detach().float())
                if not accelerator.sync_gradients:
                    continue
                step += 1
                if run.ema is not None:
                    run.ema.step(run.params)
                # One collective per step: the mean loss over processes, and whether any was asked to stop,
                # so every process stops (and checkpoints) at the same step. Also a CPU-GPU sync point.
                # The weights' norm rides along: a finite loss can still step the weights to inf or NaN (the loss
                # is measured before the update), and the last step's update is what would be written.
                flag = torch.tensor(float(stop.requested), device=loss.device)
                weights = [sharding.local(p).detach() for p in run.params]  # this process's shard under FSDP
                norm = torch.nn.utils.get_total_norm(weights, float("inf")).to(loss.device, torch.float32)  # max |w|
                total_loss, stops, weights_norm = accelerator.reduce(
                    torch.stack([torch.stack(running).mean(), flag, norm]), "sum").tolist()
                running = []
                losses.append(total_loss / world)
                lr = run.lr_scheduler.get_last_lr()[0]
                rate = progress.rate(step) * images_per_step
                # Measured before the row is written, so a step stopped by Ctrl-C still has its value.
                val_loss = None
                if run.held_out is not None and (step % cfg.validation_every == 0 or step == run.max_steps):
                    val_loss = val_losses[step] = validation.measure(run)
                if loss_log:
                    loss_log.append(step=step, epoch=epoch, loss=losses[-1], lr=lr, images_per_s=rate,
                                    elapsed_s=time.perf_counter() - t0, val_loss=val_loss)
                trackers.log_step(accelerator, cfg, step, {
                    "train/loss": losses[-1], "train/lr": lr, "train/steps_per_s": rate / images_per_step,
                    "train/images_per_s": rate, "validation/loss": val_loss})
                if not math.isfinite(losses[-1]):
                    raise _diverged(cfg, step, losses[-1])
                if not math.isfinite(weights_norm):
                    raise _diverged(cfg, step, weights_norm, what="trained weights")
                progress.update(step, losses[-1], val_loss)
                if callback:
                    callback(StepInfo(step, run.max_steps, epoch, losses[-1], lr, rate, val_loss))
                if stops > 0:
                    progress.close()
                    run.say(f"interrupted: saved {run.checkpoint(step)}; continue with --resume latest")
                    raise KeyboardInterrupt
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < run.max_steps:
                    saved.append(run.checkpoint(step))
                if cfg.validation_prompts and step % cfg.validation_every == 0 and step < run.max_steps:
                    rendered += _validate(run, step)
    finally:
        progress.close()
        if loss_log:
            loss_log.close()
    return Trained(step, losses, samples_seen, time.perf_counter() - t0, saved, rendered, val_losses)


def _micro_loss(run: Run, denoiser, items, class_items, generator):
    """One micro-batch's loss: the objective on the instance batch, plus --prior-loss-weight × the same
    objective on its paired class batch (DreamBooth). The two batches may be different buckets, so the
    denoiser runs once on each; every draw comes from ``generator``, instance first."""
    from sdcli.training.objective import prior_preservation_loss

    def loss_of(inputs, chosen):
        return _step_loss(run, denoiser, inputs.batch(chosen, generator), generator)

    if class_items is None:
        return loss_of(run.inputs, items)
    return prior_preservation_loss(lambda: loss_of(run.inputs, items),
                                   lambda: loss_of(run.classes.inputs, class_items), run.cfg.prior_loss_weight)


def _step_loss(run: Run, denoiser, batch, generator):
    """The family's objective: DDPM's ε or v regression for a UNet, flow matching for a transformer."""
    from sdcli.training import objective

    cfg = run.cfg
    if not run.family.flow:
        return objective.step_loss(denoiser, run.noise_scheduler, batch.latents, batch.cond, generator,
                                   noise_offset=cfg.noise_offset, snr_gamma=cfg.snr_gamma,
                                   debiased=cfg.debiased_loss, snr_floor=cfg.debiased_snr_floor, mask=batch.weights)

    def predict(noisy, timesteps):
        return run.family.predict(run.pipe, denoiser, noisy, timesteps, batch.cond, cfg.distilled_guidance)

    # The shape options are set only for the sampling they shape (cfg.settle_for), and read only by it.
    return objective.flow_step_loss(predict, run.noise_scheduler, batch.latents, generator,
                                    sampling=cfg.timestep_sampling, logit_mean=cfg.logit_mean,
                                    logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, weighting=cfg.weighting_scheme,
                                    mask=batch.weights)


def _objective(cfg: FinetuneConfig, family, scheduler) -> str:
    """The objective in a few words, for the set-up line and the record."""
    if not family.flow:
        return scheduler.config.prediction_type
    shape = ""
    if cfg.timestep_sampling == "logit-normal":
        shape = f" m={cfg.logit_mean:g} s={cfg.logit_std:g}"
    elif cfg.timestep_sampling == "mode":
        shape = f" scale {cfg.mode_scale:g}"
    # A static shift is in the training σ's; a resolution-dependent one (Flux) is applied at sampling only.
    shift = "none in training" if scheduler.config.use_dynamic_shifting else f"{scheduler.config.shift:g}"
    guidance = f", distilled guidance {cfg.distilled_guidance:g}" if cfg.distilled_guidance is not None else ""
    return (f"flow matching (sigma {cfg.timestep_sampling}{shape}, weighting {cfg.weighting_scheme}, "
            f"shift {shift}{guidance})")


def _diverged(cfg: FinetuneConfig, step: int, loss: float, what: str = "loss") -> SdcliError:
    """The loss or the weights are NaN or infinite: every later step would train on garbage, and what would be
    written is garbage, so stop and say why."""
    hint = ("float16 overflow: try --mixed-precision bf16 or no" if cfg.mixed_precision == "fp16"
            else "try a lower --learning-rate")
    value = "NaN" if loss != loss else "infinite" if what != "loss" else str(loss)
    return SdcliError(f"the {what} became {value} at step {step}, so training stopped and no weights were written "
                      f"({hint}); earlier checkpoints, if any, are in {cfg.out / checkpoints.DIRNAME}")


def _finish(run: Run, done: Trained) -> FinetuneResult:
    """9. A last checkpoint to extend the run from, validation images, the weights, settings, card, curve."""
    import torch

    cfg, accelerator = run.cfg, run.accelerator
    if cfg.checkpoint_every and done.step > run.start:
        done.saved.append(run.checkpoint(done.step))
    if cfg.validation_prompts and done.step > run.start:
        done.rendered += _validate(run, done.step)
    per_rank = accelerator.gather(torch.tensor([done.samples_seen], device=accelerator.device)).tolist()
    run.say(f"samples per process: {', '.join(map(str, per_rank))} (world size {run.world})")
    weights = cfg.out / (outputs.LORA_FILE if cfg.lora else "model_index.json")
    if run.ema is not None:
        run.ema.copy_to(run.params)  # on every process: under FSDP each holds its shard of the average
    # Past DDP and torch.compile's wrapper, so saved names are the model's own; under FSDP a plain copy of the
    # denoiser, gathered onto the main process (None on the others), so one file in diffusers' layout is written.
    raw = [getattr(m, "_orig_mod", m) for m in map(accelerator.unwrap_model, run.models)]
    with sharding.plain_copy(accelerator, raw[0]) as denoiser:
        raw[0] = denoiser
        if accelerator.is_main_process:
            weights = _save(run, raw)
    if accelerator.is_main_process:
        from sdcli.pipeline import model_reference

        logged = outputs.read_losses(cfg.out / outputs.LOSS_FILE)[1]
        record = {
            "base_model": model_reference(cfg.model), "family": run.family_name,  # bundled:shapes, not its path
            "prediction_type": "flow" if run.family.flow else run.noise_scheduler.config.prediction_type,
            "objective": _objective(cfg, run.family, run.noise_scheduler), "denoiser": run.family.denoiser,
            "method": "lora" if cfg.lora else "full", "steps": done.step, "world_size": run.world,
            "distributed": accelerator.distributed_type.value,
            "samples_per_rank": per_rank, "final_loss": logged[-1] if logged else None,
            "data": {"images": len(run.report.examples), "skipped": [list(s) for s in run.report.skipped],
                     "captions": dict(run.report.caption_sources),
                     "folders": [{"path": str(s.root), "repeats": s.repeats, "images": s.images}
                                 for s in run.report.sources],
                     "samples_per_epoch": run.per_epoch * cfg.batch_size * run.world},
            "buckets": run.layout.record(),
            "prior_preservation": run.classes.record(cfg) if run.classes is not None else None,
            "validation": _validation_record(run, cfg.out / outputs.LOSS_FILE),
            "config": cfg.to_json(),
        }
        outputs.record_written(cfg.out, {outputs.SETTINGS_FILE, outputs.CARD_FILE, outputs.LOSS_PLOT})
        outputs.write_settings(cfg.out, record)
        outputs.write_model_card(cfg.out, record)
        outputs.plot_loss(cfg.out / outputs.LOSS_FILE, cfg.out / outputs.LOSS_PLOT)
        run.say(f"wrote {weights}")
    accelerator.wait_for_everyone()
    ran = done.step - run.start
    images_per_step = cfg.batch_size * cfg.gradient_accumulation * run.world
    return FinetuneResult(
        out=cfg.out, weights=weights, steps=done.step, losses=done.losses, world_size=run.world,
        samples_per_rank=per_rank, cache_seconds=run.cache_seconds, train_seconds=done.seconds,
        images_per_s=ran * images_per_step / done.seconds if done.seconds > 0 and ran else 0.0,
        checkpoints=done.saved, validation_images=done.rendered, val_losses=done.val_losses,
    )


def _save(run: Run, raw: list[Any]) -> Path:
    """The trained weights into OUT (``raw``: the plain models, the denoiser first), all or nothing."""
    cfg = run.cfg
    try:
        with outputs.staged(cfg.out) as stage, sharding.swapped(run.pipe, run.family.denoiser, raw[0]):
            return (outputs.save_lora(run.pipe, run.family, raw[0], raw[1:], cfg.out, cfg, into=stage)
                    if cfg.lora else outputs.save_full(run.pipe, cfg.out, into=stage))
    except Exception as exc:
        why = outputs.disk_failure(exc)
        if why is None:
            raise
        last = checkpoints.checkpoint_dirs(cfg.out)
        then = (f"; the training is saved in {last[-1]}: continue with --resume latest once it can be written"
                if last else "")
        raise OutputError(f"cannot write the trained weights to {cfg.out}: {why}; nothing half-written was "
                          f"kept{then}") from exc


def _validation_record(run: Run, loss_file: Path) -> dict[str, Any] | None:
    """What the validation loss was measured on and how, for training_settings.json."""
    if run.held_out is None:
        return None
    from sdcli.training.validation import LEVELS, noise_levels

    levels = noise_levels(run.family, run.noise_scheduler, "cpu")
    steps, values = outputs.read_validation_losses(loss_file)
    return {
        "source": run.held_out.source, "images": run.held_out.names(), "sizes": run.held_out.sizes,
        "noise_levels": LEVELS,
        # DDPM: the timesteps t; flow matching: the sigmas.
        ("sigmas" if run.family.flow else "timesteps"): (levels[0] if run.family.flow else levels).tolist(),
        "final_val_loss": values[-1] if values else None, "final_val_loss_step": steps[-1] if steps else None,
    }


def _same_run(cfg: FinetuneConfig, path: Path) -> None:
    """Refuse a resume whose settings would change what a step computes."""
    saved = checkpoints.read_state(path)
    differ = cfg.incompatible_with(saved.get("config", {}))
    if differ:
        now = cfg.to_json()
        changes = ", ".join(f"{name} ({saved['config'][name]!r} -> {now[name]!r})" for name in differ)
        raise UsageError(f"--resume {path}: settings differ from the checkpoint's, so it would not continue "
                         f"the same run: {changes}")


def _resume(cfg: FinetuneConfig, accelerator, path: Path, say, parts: checkpoints.Parts) -> int:
    saved = checkpoints.read_state(path)
    _same_run(cfg, path)
    world = accelerator.num_processes
    if saved.get("world_size", 1) != world:
        raise UsageError(f"--resume {path}: made with {saved.get('world_size')} processes, now {world}; "
                         "resume with the same number so the data order continues")
    for name in ("model", "data"):
        if saved["config"].get(name) != cfg.to_json()[name]:
            say(f"warning: --{name} differs from the checkpoint's ({saved['config'].get(name)})")
    checkpoints.load_checkpoint(accelerator, path, parts, allow_pickle=cfg.allow_pickle)
    say(f"resumed from {path} at step {saved['step']}")
    return int(saved["step"])


def _validate(run: Run, step: int) -> list[Path]:
    """Render the validation prompts on the main process (EMA weights if any); the others wait (under FSDP,
    after helping to gather the denoiser)."""
    cfg, accelerator, pipe = run.cfg, run.accelerator, run.pipe
    paths: list[Path] = []
    # Under FSDP the main process renders with a plain copy of the denoiser gathered from every shard.
    with validation.evaluating(run.models, run.ema, run.params), \
            sharding.plain_copy(accelerator, accelerator.unwrap_model(run.models[0]), accelerator.device) as denoiser:
        if accelerator.is_main_process:
            outputs.record_written(cfg.out, {outputs.VALIDATION_DIR})
            pipe.vae.to(accelerator.device)
            for encoder in run.inputs.text.encoders:
                encoder.to(accelerator.device)
            try:
                with sharding.swapped(pipe, run.family.denoiser, getattr(denoiser, "_orig_mod", denoiser)), \
                        accelerator.autocast():
                    paths = outputs.render_validation(pipe, run.family_name, accelerator.device, cfg, step,
                                                      run.family.guidance_of(pipe))
            finally:
                setup.park_frozen(pipe, run.inputs, accelerator.device)
            trackers.log_images(accelerator, cfg, step, paths)
    accelerator.wait_for_everyone()
    return paths
