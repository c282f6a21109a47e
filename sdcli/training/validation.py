"""The validation loss: held-out images at fixed timesteps and fixed noise, so it moves only when the model does.

The training loss is measured on images the model trains on, at a random timestep and noise each step,
so it is noisy and says nothing about over-fitting. Here each held-out image (`--validation-split`,
chosen by `sdcli.training.data.hold_out`, or `--validation-data`) is noised at `LEVELS` noise levels spread
evenly over the schedule (`objective.validation_timesteps` for DDPM, `objective.validation_sigmas` for
flow matching), with its latent sample and noise drawn once from a generator seeded by (seed, image):
the same draws at every evaluation and in every run with the same seed. The loss is the objective's own
(`objective.ddpm_loss` / `objective.flow_loss`: the same target and weighting as training, plain noise
without --noise-offset), through the same inputs path (cached latents where the cache is on), with the
caption never dropped, no flip, a centre crop in its bucket, the models in eval mode, no gradients, and the EMA weights
with --ema (what is saved). Averaged over the levels it is the midpoint-rule estimate of the training loss
under uniform timesteps.

Several processes: each computes the images i with i mod world = rank, the same number of forward passes
on every process (a process with fewer images repeats one at weight 0, so DDP's and FSDP's collectives
stay in step), and one sum over processes gives every process the mean; the main process logs it. No
random stream of training is touched (every draw has its own generator, and eval mode has no dropout),
so a run with validation resumes exactly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from sdcli.training import data

LEVELS = 4  # noise levels per held-out image
_STREAM = 4  # mix_seed stream of the per-image draws (1: epochs, 2: steps, 3: the split)


@dataclass
class HeldOut:
    """The held-out images, where they came from, and their inputs (filled in once the model is loaded)."""

    examples: list[data.Example]
    root: Path  # names in the record are relative to it
    source: str  # "--validation-split 0.1" or "--validation-data DIR"
    sizes: list[tuple[int, int]] | None = None  # (w, h) per example, laid out as training lays out its own
    inputs: Any = None  # TrainingInputs over `examples`

    def names(self) -> list[str]:
        return [str(e.path.relative_to(self.root)) if e.path.is_relative_to(self.root) else str(e.path)
                for e in self.examples]

    def line(self) -> str:
        n = len(self.examples)
        shown = ", ".join(self.names()[:4]) + (", ..." if n > 4 else "")
        return f"validation: {n} image{'s' * (n != 1)} ({self.source}), loss at {LEVELS} fixed noise levels: {shown}"


def select(cfg, report: data.DataReport, warn) -> tuple[data.DataReport, HeldOut | None]:
    """The training report and the held-out images: split from --data, or read from --validation-data."""
    from sdcli.errors import DataError

    if cfg.validation_split is not None:
        train, held = data.hold_out(report, cfg.validation_split, cfg.seed)
        return train, HeldOut(held, report.root, f"--validation-split {cfg.validation_split:g}, seed {cfg.seed}")
    if cfg.validation_data is not None:
        try:
            other = data.discover(cfg.validation_data, cfg.caption_column, cfg.strict, cfg.allow_empty_captions,
                                  warn=warn, caption_extension=cfg.caption_extension)
        except DataError as exc:
            raise DataError(f"--validation-data: {exc}") from None
        return report, HeldOut(other.examples, other.root, f"--validation-data {cfg.validation_data}")
    return report, None


def lay_out(held: HeldOut, assign: Callable[[data.DataReport], Any]) -> None:
    """Each held-out image's size, by training's own layout (``assign(report) -> buckets.Layout``): the bucket
    nearest its aspect ratio, or the square without buckets, so it is measured in the shape it would train
    at; one too small for any bucket under --no-upscale is dropped with a warning, as training drops it."""
    from sdcli.errors import DataError

    report = data.DataReport(root=held.root, examples=list(held.examples))
    try:
        layout = assign(report)
    except DataError as exc:
        raise DataError(f"held-out images ({held.source}): {exc}") from None
    held.examples, held.sizes = report.examples, layout.sizes


def noise_levels(family, scheduler, device):
    """The fixed levels: DDPM's timesteps, or flow matching's (σ, model timestep)."""
    from sdcli.training import objective

    if family.flow:
        return objective.validation_sigmas(scheduler, LEVELS, device)
    return objective.validation_timesteps(scheduler, LEVELS, device)


def loss_function(cfg, family, pipe, scheduler, denoiser) -> Callable[[Any, Any, Any], Any]:
    """(batch, noise, levels) -> the objective's loss, with training's target and weighting."""
    from sdcli.training import objective

    if not family.flow:
        def ddpm(batch, noise, timesteps):
            return objective.ddpm_loss(denoiser, scheduler, batch.latents, batch.cond, noise, timesteps,
                                       snr_gamma=cfg.snr_gamma, debiased=cfg.debiased_loss, mask=batch.weights,
                                       snr_floor=cfg.debiased_snr_floor)
        return ddpm

    def flow(batch, noise, levels):
        sigmas, timesteps = levels

        def predict(noisy, t):
            return family.predict(pipe, denoiser, noisy, t, batch.cond, cfg.distilled_guidance)

        return objective.flow_loss(predict, batch.latents, noise, sigmas, timesteps, weighting=cfg.weighting_scheme,
                                   mask=batch.weights)
    return flow


def image_loss(loss_at, inputs, index: int, seed: int, levels, device):
    """One held-out image's loss: the image at each level (caption kept, no flip), its latent samples and
    noise drawn from a generator seeded by (seed, index) alone."""
    import torch

    from sdcli.training.objective import sample_noise

    generator = torch.Generator(device).manual_seed(data.mix_seed(seed, _STREAM, index))
    batch = inputs.batch([data.Item(index)] * LEVELS, generator)
    noise = sample_noise(batch.latents, generator)  # plain noise: offset noise is a training augmentation
    return loss_at(batch, noise, levels)


def held_out_loss(loss_at, inputs, seed: int, levels, accelerator) -> float:
    """The mean loss over the held-out images, computed in shares by every process and summed across them."""
    import torch

    n, rank, world = len(inputs.examples), accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    total, count = 0.0, 0
    with torch.no_grad():
        for j in range(-(-n // world)):
            i = j * world + rank
            loss = image_loss(loss_at, inputs, i if i < n else rank % n, seed, levels, device).item()
            if i < n:
                total, count = total + loss, count + 1
    if world > 1:
        total, count = accelerator.reduce(torch.tensor([total, count], device=device), "sum").tolist()
    return total / count


@contextlib.contextmanager
def evaluating(models: list[Any], ema=None, params=None) -> Iterator[None]:
    """Eval mode (no dropout, as generate runs the model) and, with an EMA, the averaged weights that will be
    saved; training mode and the live weights afterwards."""
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    training = [m for m in models if m.training]
    for m in training:
        m.eval()
    try:
        yield
    finally:
        for m in training:
            m.train()
        if ema is not None:
            ema.restore(params)


def measure(run) -> float:
    """The validation loss of the model as it is now (`sdcli.training.loop.Run`); every process must call it."""
    cfg, held = run.cfg, run.held_out
    loss_at = loss_function(cfg, run.family, run.pipe, run.noise_scheduler, run.models[0])
    levels = noise_levels(run.family, run.noise_scheduler, run.accelerator.device)
    with evaluating(run.models, run.ema, run.params):
        return held_out_loss(loss_at, held.inputs, cfg.seed, levels, run.accelerator)
