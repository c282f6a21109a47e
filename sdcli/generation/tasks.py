"""Generation tasks as data: each owns its input check, its pipeline, its call arguments and its record fields.

diffusers has one pipeline class per task and `from_pipe` to move between them
without loading weights twice; a task here names which one it needs. Its record
fields are the settings declared with ``task=<name>`` (`sdcli.generation.settings`).
Guidance, the NaN guard, trajectories and LoRAs live in `sdcli.generation.run`
and apply to every task alike. A new task (inpaint, hires fix, ControlNet) is a
new class here, added to TASKS, plus its declared options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcli.errors import DataError, UsageError


@dataclass
class Prepared:
    """What a task hands the denoising loop: its pipeline, size and the arguments every batch shares."""

    pipe: Any
    width: int
    height: int
    call: dict[str, Any] = field(default_factory=dict)


def default_size(pipe: Any) -> tuple[int, int]:
    sample = getattr(pipe, "default_sample_size", None) or pipe.unet.config.sample_size
    sample = sample if isinstance(sample, int) else sample[0]
    return sample * pipe.vae_scale_factor, sample * pipe.vae_scale_factor


class Task:
    name = ""

    def applies(self, s: Any) -> bool:
        """Whether these settings ask for this task (the first task in TASKS that applies runs)."""
        raise NotImplementedError

    def check(self, s: Any) -> None:
        """Cheap checks of this task's inputs, before any weights load."""

    def denoising_steps(self, s: Any) -> int:
        return s.steps

    def prepare(self, s: Any, pipe: Any) -> Prepared:
        raise NotImplementedError

    def denoise(self, prepared: Prepared, kwargs: dict[str, Any]) -> Any:
        """One batch through the task's pipeline: float images (B, H, W, 3) in [0, 1]. A task with
        two passes (hires fix) overrides this."""
        return prepared.pipe(**kwargs).images

    def finish(self, prepared: Prepared, images: list[Any]) -> list[Any]:
        """The batch's PIL images after denoising; a task that composites (inpainting) overrides this."""
        return images


class TextToImage(Task):
    name = "txt2img"

    def applies(self, s: Any) -> bool:
        return True

    def prepare(self, s: Any, pipe: Any) -> Prepared:
        dw, dh = default_size(pipe)
        width, height = s.width or dw, s.height or dh
        return Prepared(pipe, width, height, {"width": width, "height": height})


class ImageToImage(Task):
    """The forward process plus the reverse one: noise the image to t ≈ strength·T in one jump, denoise from there."""

    name = "img2img"

    def applies(self, s: Any) -> bool:
        return s.init_image is not None

    def check(self, s: Any) -> None:
        if not 0 < s.strength <= 1:
            raise UsageError(f"--strength must be in (0, 1], got {s.strength:g}")
        if int(s.steps * s.strength) < 1:
            # diffusers runs int(steps × strength) steps; zero would denoise nothing at all.
            raise UsageError(f"--strength {s.strength:g} with --steps {s.steps} leaves no denoising step "
                             f"(int({s.steps} × {s.strength:g}) = 0); use --strength {1 / s.steps:.3g} or more, "
                             "or more --steps")
        if not Path(s.init_image).is_file():
            raise DataError(f"--init-image: no such file: {s.init_image}")

    def denoising_steps(self, s: Any) -> int:
        return max(1, int(s.steps * s.strength))

    def prepare(self, s: Any, pipe: Any) -> Prepared:
        from diffusers import AutoPipelineForImage2Image

        from sdcli.generation.guidance import use_formula_guidance

        image = load_init_image(s.init_image, s.width, s.height, max(8, pipe.vae_scale_factor))
        task_pipe = AutoPipelineForImage2Image.from_pipe(pipe)
        task_pipe.set_progress_bar_config(disable=True)
        use_formula_guidance(task_pipe)
        return Prepared(task_pipe, image.width, image.height, {"image": image, "strength": s.strength})


def load_init_image(path: str, width: int | None, height: int | None, factor: int):
    """The init image upright and in RGB, resized to the asked size or cut down to a multiple of ``factor``."""
    from PIL import Image

    from sdcli.images import open_image

    image = open_image(path, what="--init-image")
    w = width or image.width - image.width % factor
    h = height or image.height - image.height % factor
    if w < factor or h < factor:
        raise DataError(f"--init-image: {path} is too small ({image.width}x{image.height})")
    return image.resize((w, h), Image.LANCZOS) if (w, h) != image.size else image


# Most specific first: the first that applies runs.
TASKS: tuple[Task, ...] = (ImageToImage(), TextToImage())


def task_for(s: Any) -> Task:
    return next(t for t in TASKS if t.applies(s))
