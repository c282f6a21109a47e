"""DreamBooth prior preservation (Ruiz et al. 2023): class images trained beside the instance images.

Fine-tuning on a few photos of one dog ("sks dog") drifts the whole class: every "dog" starts to look
like it. DreamBooth keeps the class where the base model had it by also training on images the base
model itself makes for the class prompt ("a photo of a dog"), with the same denoising loss, weighted:
loss = instance loss + W × class loss, as diffusers' train_dreambooth scripts sum them.

Here: `fill` generates the missing class images through `sdcli generate`'s own code (each PNG carries
its record, a caption sidecar holds the class prompt), so a second run reuses them; `load` finds them
and gives every one the class prompt as its caption. Class images train without null-prompt dropout:
they are the base model's samples for the class prompt, so training them under the null prompt would
pull the unconditional prediction toward the class, the direction guidance pushes away from (the
instance captions' dropout keeps the unconditional branch trained).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sdcli.training import data
from sdcli.training.config import FinetuneConfig, class_images


@dataclass
class ClassImages:
    """The class side of a DreamBooth run: its examples, their layout and inputs, and where they came from."""

    report: data.DataReport
    generated: int
    reused: int
    layout: Any = None  # buckets.Layout
    inputs: Any = None  # TrainingInputs over examples
    examples: list[Any] | None = None  # report.examples as laid out: once per --resolution size
    per_epoch: int = 0  # global class batches in one pass over the class images

    def line(self, weight: float, prompt: str) -> str:
        n = len(self.report.examples)
        return (f"class data: {n} image{'s' * (n != 1)} in {self.report.root} as {prompt!r}, prior loss weight "
                f"{weight:g} ({self.generated} generated, {self.reused} reused)")

    def record(self, cfg: FinetuneConfig) -> dict[str, Any]:
        """What training_settings.json keeps."""
        return {"class_data": str(self.report.root), "class_prompt": cfg.class_prompt,
                "prior_loss_weight": cfg.prior_loss_weight, "num_class_images": cfg.num_class_images,
                "images": len(self.report.examples), "generated": self.generated, "reused": self.reused,
                "buckets": self.layout.table() if self.layout is not None else None}


def fill(cfg: FinetuneConfig, pipe: Any, family: Any, device: Any, is_main: bool = True) -> tuple[int, int]:
    """Generate class images until --class-data holds --num-class-images; (generated, reused).

    The base model makes them (call this before any adapter is added), at the training resolution with
    `generate`'s defaults (steps, guidance, sampler), one seed each from --seed and the image's number,
    so the same command makes the same images. Only the main process writes; the others count.
    """
    have = len(class_images(cfg.class_data))
    wanted = cfg.num_class_images or 0
    missing = max(0, wanted - have)
    if missing and is_main:
        _generate(cfg, pipe, family, device, first=have, count=missing)
    return missing, have


def _generate(cfg: FinetuneConfig, pipe: Any, family: Any, device: Any, first: int, count: int) -> list[Path]:
    from sdcli.generation import Engine, Settings
    from sdcli.generation.outputs import ImageWriter
    from sdcli.progress import note, progress_bar

    folder = Path(cfg.class_data)
    folder.mkdir(parents=True, exist_ok=True)
    # Seeds past those of the images already there, so topping up a folder never repeats an image.
    seeds = [data.mix_seed(cfg.seed, 5, first + i) % 2**32 for i in range(count)]
    settings = Settings(prompts=[cfg.class_prompt], model=cfg.model, revision=cfg.revision, variant=cfg.variant,
                        seeds=seeds, width=max(cfg.resolutions), height=max(cfg.resolutions),
                        device=str(device))
    engine = Engine.around(pipe, settings, family=family.record_name(pipe))
    p = engine.plan(settings)
    slug = re.sub(r"[^a-z0-9]+", "-", cfg.class_prompt.lower()).strip("-")[:40] or "class"
    writer = ImageWriter(folder, p, name=lambda job: f"{first + job.index:05d}-{slug}.png")
    pipe.to(device)
    written = []
    note(cfg.quiet, f"generating {count} class image{'s' * (count != 1)} of {cfg.class_prompt!r} in {folder}")
    total = len(p.share()) * p.task.denoising_steps(p.settings)
    try:
        with progress_bar("class images", total=total, disable=cfg.quiet) as advance:
            for item in engine.run(p, on_step=lambda step: advance(step.images),
                                   extra_record={"finetune_class_image": {"class_prompt": cfg.class_prompt}}):
                path = writer.write(item)
                # The sidecar after the image: a run stopped between the two leaves an image that `load` still
                # captions with the class prompt, and no caption without its image.
                path.with_name(path.stem + cfg.caption_extension).write_text(cfg.class_prompt + "\n")
                written.append(path)
    finally:
        pipe.to("cpu")
    writer.finish()
    return written


def load(cfg: FinetuneConfig, generated: int, reused: int, warn: Callable[[str], None] | None) -> ClassImages:
    """The class images as training examples, every one captioned with the class prompt (a sidecar or
    metadata caption in the folder is not used: prior preservation trains the class prompt)."""
    from sdcli.errors import DataError

    try:
        report = data.discover(Path(cfg.class_data), cfg.caption_column, cfg.strict, allow_empty_captions=True,
                               warn=warn, caption_extension=cfg.caption_extension)
    except DataError as exc:
        raise DataError(f"--class-data: {exc}") from None
    for example in report.examples:
        example.caption = cfg.class_prompt
    return ClassImages(report=report, generated=generated, reused=reused)
