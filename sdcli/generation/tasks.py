"""Generation tasks as data: each owns its input check, its pipeline, its call arguments and its record fields.

diffusers has one pipeline class per task and `from_pipe` to move between them
without loading weights twice; a task here names which one it needs. Its record
fields are the settings declared with ``task=<name>`` (`sdcli.generation.settings`).
Guidance, the NaN guard, trajectories and LoRAs live in `sdcli.generation.run`
and apply to every task alike. A new task (ControlNet, ...) is a new class here,
added to TASKS, plus its declared options; inpainting's mask arithmetic is in
`sdcli.generation.masks`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from sdcli.errors import DataError, UsageError

# The tasks that start from --init-image (and record it and --strength).
IMAGE_TASKS = ("img2img", "inpaint", "outpaint")
# ControlNets steer any of them ("img2img+controlnet"); the settings declared with this task record them.
CONTROL_TASK = "controlnet"
# Editing models (FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit) made from reference images; the settings declared with it
# record them.
EDIT_TASK = "edit"
MAX_SIDE = 4096  # pixels; past this a hires pass is a typo, not a picture


class Upscaler(str, Enum):
    """How hires fix enlarges the first pass: its decoded pixels, or its latents (AUTOMATIC1111's "Latent")."""

    lanczos = "lanczos"
    latent = "latent"


@dataclass
class Prepared:
    """What a task hands the denoising loop: its pipeline, size and the arguments every batch shares.

    ``width`` and ``height`` are what the image records and a replay asks for again (--width,
    --height): the first pass of a hires fix, the init image inside an outpainted canvas.
    ``keep`` is what the task's own denoise or finish needs beyond the call.
    """

    pipe: Any
    width: int
    height: int
    call: dict[str, Any] = field(default_factory=dict)
    keep: dict[str, Any] = field(default_factory=dict)


def size_multiple(pipe: Any) -> int:
    """What the sizes the pipeline renders at must be multiples of (the VAE factor times the family's patch): a
    packed model's pipeline would round another size down, and make an image of another size than the one asked
    for and recorded (or than the picture an inpainting is laid over)."""
    from sdcli.families import facts_of

    return facts_of(pipe).size_multiple


def default_size(pipe: Any) -> tuple[int, int]:
    """The model's own image size (width, height), as its family says."""
    from sdcli.families import pipe_family

    return pipe_family(pipe).default_size(pipe)


class Task:
    name = ""

    def applies(self, s: Any) -> bool:
        """Whether these settings ask for this task (the first task in TASKS that applies runs)."""
        raise NotImplementedError

    def check(self, s: Any) -> None:
        """Cheap checks of this task's inputs, before any weights load."""

    def calls(self, s: Any) -> list[tuple[int, float | None]]:
        """Each pass through the pipeline (hires fix makes two): its num_inference_steps and its strength (None for
        a pass from pure noise)."""
        return [(s.steps, None)]

    def passes(self, s: Any) -> list[int]:
        """The steps asked of each pass: all of a pass from noise, int(steps × strength) of an img2img one."""
        return [steps if strength is None else max(1, int(steps * strength)) for steps, strength in self.calls(s)]

    def denoising_steps(self, s: Any, scheduler: Any = None) -> int:
        """The denoiser steps the request's passes run on ``scheduler`` (`loop_steps`); without one, those asked."""
        if scheduler is None:
            return sum(self.passes(s))
        return sum(loop_steps(scheduler, steps, strength) for steps, strength in self.calls(s))

    def prepare(self, s: Any, pipe: Any) -> Prepared:
        raise NotImplementedError

    def denoise(self, prepared: Prepared, kwargs: dict[str, Any]) -> Any:
        """One batch through the task's pipeline: float images (B, H, W, 3) in [0, 1]. A task with
        two passes (hires fix) overrides this."""
        return prepared.pipe(**kwargs).images

    def finish(self, prepared: Prepared, images: list[Any]) -> list[Any]:
        """The batch's PIL images after denoising; a task that composites (inpainting) overrides this."""
        return images

    def frame_size(self, prepared: Prepared, pipe: Any) -> tuple[int, int]:
        """The size (width, height) ``pipe`` renders at, which unpacks a trajectory frame's packed latents: the
        call's (an outpainted canvas, not the init image inside it)."""
        return prepared.call.get("width", prepared.width), prepared.call.get("height", prepared.height)


def loop_steps(scheduler: Any, steps: int, strength: float | None = None) -> int:
    """How many steps diffusers' denoising loop runs for ``steps`` on ``scheduler``: the timesteps set_timesteps gives
    it (PNDM's PLMS warm-up adds one; Heun's and DPM2's second-order steps make 2·steps − 1), less the first ones an
    img2img pass of ``strength`` skips, as diffusers' get_timesteps skips them (t_start × the scheduler's order)."""
    import copy

    asked = steps if strength is None else max(1, int(steps * strength))
    probe = copy.deepcopy(scheduler)  # the request's own is set by its pipeline; this one only counts
    try:
        # A resolution-dependent shift moves the timesteps, not their number: any μ counts them.
        probe.set_timesteps(steps, **({"mu": 0.0} if probe.config.get("use_dynamic_shifting") else {}))
        count = len(probe.timesteps)
    except Exception:  # noqa: BLE001 - a scheduler set only the pipeline's way: the steps asked
        return asked
    if strength is not None:
        count -= max(steps - min(int(steps * strength), steps), 0) * getattr(probe, "order", 1)
    return max(1, count)


def task_pipeline(auto: Any, pipe: Any, **components: Any) -> Any:
    """``pipe``'s weights in the diffusers pipeline class ``auto`` picks for this task (no copy is made),
    with any further ``components`` (a ControlNet)."""
    import diffusers

    from sdcli.families import pipe_family
    from sdcli.generation.guidance import use_formula_guidance

    # A family whose task pipeline AutoPipeline's tables lack names it (Chroma's img2img).
    task = {"AutoPipelineForImage2Image": "img2img", "AutoPipelineForInpainting": "inpaint"}.get(auto.__name__)
    own = pipe_family(pipe).task_classes.get(task)
    task_pipe = (getattr(diffusers, own) if own else auto).from_pipe(pipe, **components)
    task_pipe.set_progress_bar_config(disable=True)
    use_formula_guidance(task_pipe)
    return task_pipe


def refuse_past_positions(facts: Any, w: int, h: int, what: str, setting: str, hint: str = "") -> None:
    """A ``w``x``h`` image past the positions the model's denoiser has (``facts.largest``), refused naming ``what``
    asked for it; it would fail inside the transformer (`sdcli.generation.settings.check_positions`)."""
    if facts.largest is None:
        return
    widest, tallest = facts.largest
    if w > widest or h > tallest:
        raise UsageError(f"{what}: {facts.class_name} takes images up to {widest}x{tallest} pixels (its transformer "
                         f"has positions for no more){hint}", setting=setting)


def refuse_without_init_image(s: Any) -> None:
    for value, flag, setting in ((s.mask, "--mask", "mask"), (s.outpaint, "--outpaint", "outpaint")):
        if value is not None:
            raise UsageError(f"{flag} needs --init-image (the picture to paint into)", setting=setting)


def refuse_hires(s: Any) -> None:
    if s.hires_scale is not None:
        raise UsageError("--hires-scale is a second pass after text-to-image; it does not combine with --init-image",
                         setting="hires_scale")


def check_image_input(source: Any, flag: str, setting: str) -> None:
    """An input image is a file that exists, or a PIL image given in memory; checked before any weights load."""
    from sdcli.images import check_input, in_memory

    check_input(source, flag, setting)
    if not in_memory(source) and not Path(source).expanduser().is_file():
        raise DataError(f"{flag}: no such file: {source}", setting=setting)


class TextToImage(Task):
    name = "txt2img"

    def applies(self, s: Any) -> bool:
        return True

    def check(self, s: Any) -> None:
        refuse_without_init_image(s)

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
        refuse_hires(s)  # --strength's range is declared with it (sdcli.generation.settings)
        if s.steps is not None and int(s.steps * s.strength) < 1:  # None: checked again once the model's is known
            # diffusers runs int(steps × strength) steps; zero would denoise nothing at all.
            raise UsageError(f"--strength {s.strength:g} with --steps {s.steps} leaves no denoising step "
                             f"(int({s.steps} × {s.strength:g}) = 0); use --strength {1 / s.steps:.3g} or more, "
                             "or more --steps", setting="strength")
        check_image_input(s.init_image, "--init-image", "init_image")

    def calls(self, s: Any) -> list[tuple[int, float | None]]:
        return [(s.steps, s.strength)]

    def prepare(self, s: Any, pipe: Any) -> Prepared:
        from diffusers import AutoPipelineForImage2Image

        image = load_init_image(s.init_image, s.width, s.height, size_multiple(pipe))
        task_pipe = task_pipeline(AutoPipelineForImage2Image, pipe)
        call = {"image": image, "strength": s.strength}
        if "width" in inspect.signature(type(task_pipe).__call__).parameters:
            # Flux's img2img would resize the image to the model's default size instead of keeping its own.
            call.update(width=image.width, height=image.height)
        return Prepared(task_pipe, image.width, image.height, call)


class Inpaint(ImageToImage):
    """Repaint where the mask is white, then lay the original back over everything else.

    diffusers' inpainting pipeline does the denoising: a 9-channel inpainting UNet sees the
    mask and the masked image at every step; an ordinary 4-channel one is held to the image
    outside the mask by putting the original's latents back there, noised to the current
    level, after every step. Then `finish` composites over the original, so the pixels the
    mask leaves alone are the original's exactly, not their VAE round trip.
    """

    name = "inpaint"

    def applies(self, s: Any) -> bool:
        return s.init_image is not None and s.mask is not None

    def check(self, s: Any) -> None:
        super().check(s)
        if s.mask is not None and s.outpaint is not None:
            raise UsageError("give --mask or --outpaint, not both", setting="mask")
        if s.mask is not None:  # its aspect ratio and whether it marks anything, before the weights load
            from sdcli.generation.masks import read_mask
            from sdcli.images import open_image

            read_mask(s.mask, open_image(s.init_image, what="--init-image", setting="init_image").size)

    def canvas(self, s: Any, factor: int) -> tuple[Any, Any, Any]:
        """(picture to paint into, mask of what to repaint, the init image as resized)."""
        from sdcli.generation.masks import read_mask
        from sdcli.images import open_image

        stored = open_image(s.init_image, what="--init-image", setting="init_image").size
        image = load_init_image(s.init_image, s.width, s.height, factor)
        return image, read_mask(s.mask, stored), image

    def prepare(self, s: Any, pipe: Any) -> Prepared:
        from diffusers import AutoPipelineForInpainting

        from sdcli.generation.masks import feather

        picture, mask, init = self.canvas(s, size_multiple(pipe))
        # diffusers gets the feathered mask too (it thresholds it at 0.5), as AUTOMATIC1111's sampler does.
        feathered = feather(mask, picture.size, s.mask_blur)
        task_pipe = task_pipeline(AutoPipelineForInpainting, pipe)
        call = {"image": picture, "mask_image": feathered, "strength": s.strength, "width": picture.width,
                "height": picture.height}
        return Prepared(task_pipe, init.width, init.height, call, keep={"original": picture, "mask": feathered})

    def denoise(self, prepared: Prepared, kwargs: dict[str, Any]) -> Any:
        # One copy of the picture per image: diffusers encodes a single picture with the first image's
        # generator alone, so the second image of a batch would differ from the same image made alone.
        n = len(kwargs["generator"])
        copies = {"image": [kwargs["image"]] * n, "mask_image": [kwargs["mask_image"]] * n}
        return prepared.pipe(**{**kwargs, **copies}).images

    def finish(self, prepared: Prepared, images: list[Any]) -> list[Any]:
        from sdcli.generation.masks import composite

        return [composite(image, prepared.keep["original"], prepared.keep["mask"]) for image in images]


class Outpaint(Inpaint):
    """Inpainting on a larger canvas: the border --outpaint adds is the mask."""

    name = "outpaint"

    def applies(self, s: Any) -> bool:
        return s.init_image is not None and s.outpaint is not None

    def canvas(self, s: Any, factor: int) -> tuple[Any, Any, Any]:
        from sdcli.generation.masks import pad_canvas

        image = load_init_image(s.init_image, s.width, s.height, factor)
        picture, mask = pad_canvas(image, *s.outpaint)
        return picture, mask, image


class HiresFix(Task):
    """AUTOMATIC1111's hires fix: make the image at the asked size, enlarge it by --hires-scale, and
    run img2img over the enlargement. The first pass settles the composition at a size the model
    knows; the second adds detail at one it would compose badly from noise."""

    name = "hires"

    def applies(self, s: Any) -> bool:
        return s.hires_scale is not None

    def check(self, s: Any) -> None:
        refuse_without_init_image(s)  # the ranges of --hires-scale, -strength and -steps are declared with them
        steps = s.hires_steps or s.steps
        if steps is not None and int(steps * s.hires_strength) < 1:  # None: checked once the model's is known
            raise UsageError(f"--hires-strength {s.hires_strength:g} with {steps} hires steps leaves no denoising step "
                             f"(int({steps} × {s.hires_strength:g}) = 0); raise either", setting="hires_strength")
        for size, flag in ((s.width, "--width"), (s.height, "--height")):
            if size:
                self.upscaled(size, s.hires_scale, 8, flag)

    def upscaled(self, size: int, scale: float, factor: int, flag: str) -> int:
        """``size`` × ``scale``, cut down to a multiple of ``factor``; refused past MAX_SIDE."""
        big = int(size * scale) // factor * factor
        if big > MAX_SIDE:
            raise UsageError(f"--hires-scale {scale:g} takes the {flag.lstrip('-')} {size} to {big} pixels, past "
                             f"the {MAX_SIDE}-pixel limit", setting="hires_scale")
        return big

    def calls(self, s: Any) -> list[tuple[int, float | None]]:
        return [(s.steps, None), (s.hires_steps or s.steps, s.hires_strength)]

    def prepare(self, s: Any, pipe: Any) -> Prepared:
        from diffusers import AutoPipelineForImage2Image

        from sdcli.families import facts_of

        dw, dh = default_size(pipe)
        width, height = s.width or dw, s.height or dh
        factor = size_multiple(pipe)
        size = (self.upscaled(width, s.hires_scale, factor, "--width"),
                self.upscaled(height, s.hires_scale, factor, "--height"))
        # Without -W/-H the first pass's size is the model's own, known only now.
        refuse_past_positions(facts_of(pipe), *size, f"--hires-scale {s.hires_scale:g} makes {size[0]}x{size[1]}",
                              "hires_scale")
        keep = {"second": task_pipeline(AutoPipelineForImage2Image, pipe), "size": size, "upscaler": s.hires_upscaler,
                "strength": s.hires_strength, "steps": s.hires_steps or s.steps}
        return Prepared(pipe, width, height, {"width": width, "height": height}, keep=keep)

    def denoise(self, prepared: Prepared, kwargs: dict[str, Any]) -> Any:
        import torch
        from PIL import Image

        # 1. The first pass, kept as latents or as pixels.
        keep, pipe = prepared.keep, prepared.pipe
        latent = keep["upscaler"] == Upscaler.latent.value
        first = pipe(**{**kwargs, "output_type": "latent" if latent else "np"}).images
        # 2. Enlarged: latents bilinearly, as AUTOMATIC1111's "Latent" does; pixels with Lanczos.
        width, height = keep["size"]
        if latent:
            f = pipe.vae_scale_factor
            image: Any = torch.nn.functional.interpolate(first, size=(height // f, width // f), mode="bilinear")
        else:
            image = [picture.resize((width, height), Image.LANCZOS) for picture in pipe.numpy_to_pil(first)]
        # 3. The second pass draws its noise afresh from the same seeds, as AUTOMATIC1111's does.
        # diffusers' img2img has no guidance rescale: φ shapes the first pass only (as the record says).
        second = {k: v for k, v in kwargs.items() if k not in ("width", "height", "guidance_rescale")}
        if "width" in inspect.signature(type(keep["second"]).__call__).parameters:
            second.update(width=width, height=height)  # Flux's img2img would take its default size otherwise
        second.update(image=image, strength=keep["strength"], num_inference_steps=keep["steps"],
                      generator=[torch.Generator(g.device).manual_seed(g.initial_seed()) for g in kwargs["generator"]])
        return keep["second"](**second).images

    def frame_size(self, prepared: Prepared, pipe: Any) -> tuple[int, int]:
        # The second pass renders the enlargement.
        return prepared.keep["size"] if pipe is prepared.keep["second"] else super().frame_size(prepared, pipe)


class Edit(TextToImage):
    """An editing model's text-to-image with reference images (--reference-image) to edit or follow: its
    pipeline's ``image`` input, one image or a list as the family's ``references`` allows. Without -W/-H the size
    is the family's ``edit_size`` (Qwen-Image-Edit: the last image's aspect ratio at the model's default area), or
    the first reference's, shrunk to the model's default area where larger (as FLUX.2's pipeline caps its
    references) and cut to the model's multiple."""

    name = EDIT_TASK

    def applies(self, s: Any) -> bool:
        return bool(s.reference_images)

    def check(self, s: Any) -> None:
        for value, flag, setting in ((s.init_image, "--init-image", "init_image"),
                                     (s.hires_scale, "--hires-scale", "hires_scale")):
            if value is not None:
                raise UsageError(f"{flag} does not combine with --reference-image: sdcli either edits after the "
                                 "reference images (give the image to edit as one) or reworks --init-image (img2img, "
                                 "inpainting), not both in one image", setting=setting)
        refuse_without_init_image(s)
        for source in s.reference_images:
            check_image_input(source, "--reference-image", "reference_images")

    def prepare(self, s: Any, pipe: Any) -> Prepared:
        from sdcli.families import facts_of
        from sdcli.images import open_image

        facts = facts_of(pipe)
        images = [open_image(source, what="--reference-image", setting="reference_images").convert("RGB")
                  for source in s.reference_images]
        width, height = self.size(s, pipe, images)
        image = images if facts.references > 1 else images[0]
        return Prepared(pipe, width, height, {"image": image, "width": width, "height": height})

    @staticmethod
    def size(s: Any, pipe: Any, images: list[Any]) -> tuple[int, int]:
        """The size an edit renders at (of its reference ``images``, read as RGB; a server's preview needs it)."""
        from sdcli.families import facts_of

        facts = facts_of(pipe)
        width, height = s.width, s.height
        if not (width and height) and facts.family.edit_size is not None:  # as the family's own pipeline sizes it
            width, height = facts.family.edit_size(pipe, images, width, height)
        elif not (width and height):
            w, h = images[0].size
            dw, dh = default_size(pipe)
            shrink = min(1.0, (dw * dh / (w * h)) ** 0.5)
            m = facts.size_multiple
            width = width or max(m, int(w * shrink) // m * m)
            height = height or max(m, int(h * shrink) // m * m)
        return width, height


def load_init_image(source: Any, width: int | None, height: int | None, factor: int):
    """The init image (a path or a PIL image) upright and in RGB, resized to the asked size or cut down to a
    multiple of ``factor``."""
    from PIL import Image

    from sdcli.images import named, open_image

    image = open_image(source, what="--init-image", setting="init_image")
    w = width or image.width - image.width % factor
    h = height or image.height - image.height % factor
    if w < factor or h < factor:
        raise DataError(f"--init-image: {named(source)} is too small ({image.width}x{image.height})",
                        setting="init_image")
    return image.resize((w, h), Image.LANCZOS) if (w, h) != image.size else image


class WithControlNet(Task):
    """A task steered by ControlNets: the ControlNet twin of its diffusers pipeline (``from_pipe``, so the
    model's weights are shared), with the control maps as one more input at every step.

    txt2img, img2img, inpainting and outpainting each have one in diffusers; hires fix is refused, since
    its second pass would need the control maps again at the enlarged size. Without -W/-H, a text-to-image
    takes its size from the first control image, as diffusers does (img2img keeps its init image's).
    Loading, checks and maps are in `sdcli.generation.control`.
    """

    AUTO = {"txt2img": "AutoPipelineForText2Image", "img2img": "AutoPipelineForImage2Image",
            "inpaint": "AutoPipelineForInpainting", "outpaint": "AutoPipelineForInpainting"}

    def __init__(self, inner: Task):
        self.inner = inner
        self.name = f"{inner.name}+{CONTROL_TASK}"  # records the inner task's settings and the ControlNet's

    def applies(self, s: Any) -> bool:
        return bool(s.controlnets)

    def check(self, s: Any) -> None:
        from sdcli.generation.control import check_control, check_family

        check_control(s)  # refuses a control setting without --controlnet
        if s.hires_scale is not None:
            raise UsageError("--hires-scale does not combine with --controlnet (its second pass would need the control "
                             "map again at the enlarged size); use --controlnet at the size you want",
                             setting="hires_scale")
        self.inner.check(s)
        check_family(s)

    def calls(self, s: Any) -> list[tuple[int, float | None]]:
        return self.inner.calls(s)

    def prepare(self, s: Any, pipe: Any) -> Prepared:
        import dataclasses

        import diffusers

        from sdcli.generation.control import control_maps, first_image_size, load_controlnets

        controlnet = load_controlnets(s, pipe)
        if self.inner.name == "txt2img":
            width, height = first_image_size(s, size_multiple(pipe))
            s = dataclasses.replace(s, width=width, height=height)
        prepared = self.inner.prepare(s, pipe)
        task_pipe = task_pipeline(getattr(diffusers, self.AUTO[self.inner.name]), prepared.pipe, controlnet=controlnet)
        if getattr(pipe, "_offload_device", None) is not None:  # the ControlNet joins the offloaded models
            task_pipe.enable_model_cpu_offload(device=pipe._offload_device)
        # The size the pipeline renders at: an outpainted canvas, not the init image inside it.
        size = (prepared.call.get("width", prepared.width), prepared.call.get("height", prepared.height))
        maps = control_maps(s, size)
        many = len(maps) > 1
        scales = [scale for _source, scale in s.controlnets]
        control = {"image" if self.inner.name == "txt2img" else "control_image": maps if many else maps[0],
                   "controlnet_conditioning_scale": scales if many else scales[0],
                   "control_guidance_start": s.control_start, "control_guidance_end": s.control_end,
                   "width": size[0], "height": size[1]}
        return dataclasses.replace(prepared, pipe=task_pipe, call={**prepared.call, **control})

    def denoise(self, prepared: Prepared, kwargs: dict[str, Any]) -> Any:
        return self.inner.denoise(prepared, kwargs)

    def finish(self, prepared: Prepared, images: list[Any]) -> list[Any]:
        return self.inner.finish(prepared, images)

    def frame_size(self, prepared: Prepared, pipe: Any) -> tuple[int, int]:
        return self.inner.frame_size(prepared, pipe)


# Most specific first: the first that applies runs.
TASKS: tuple[Task, ...] = (Edit(), Inpaint(), Outpaint(), ImageToImage(), HiresFix(), TextToImage())


def task_for(s: Any) -> Task:
    """The task these settings ask for; wrapped in WithControlNet where any ControlNet setting is given (its
    check refuses control settings without --controlnet)."""
    task = next(t for t in TASKS if t.applies(s))
    control = (s.controlnets, s.control_images, s.control_preprocess, (s.control_start, s.control_end) != (0, 1))
    return WithControlNet(task) if any(control) else task
