"""What both APIs share: the running server (config, models, worker), a generation as a worker job,
and images in and out of base64."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from sdcli.errors import DataError, UsageError


class ClientGone(Exception):
    """The client disconnected while its request waited or ran (its job is dropped)."""


@dataclass
class Made:
    """A finished generation: its images (`Generated`, in job order), plan and the model that made them."""

    images: list[Any]
    plan: Any
    model: str
    interrupted: bool = False


@dataclass
class Server:
    config: Any  # sdcli.serve.config.ServeConfig
    models: Any  # sdcli.serve.models.Models
    worker: Any  # sdcli.serve.worker.Worker
    say: Callable[[str], None] = field(default=lambda text: None)

    def check_limits(self, *, width: Optional[int], height: Optional[int], steps: Optional[int], images: int,
                     names: dict[str, str]) -> None:
        """The server's own bounds (--max-pixels, --max-steps, --max-batch), each naming the request's field."""
        c = self.config
        if width and height and width > 0 and height > 0 and width * height > c.max_pixels:
            raise UsageError(f"{names['size']} {width}x{height}: over this server's limit of {c.max_pixels} pixels "
                             "(--max-pixels)")
        if steps is not None and steps > c.max_steps:  # None: the model card's, settled when planned
            raise UsageError(f"{names['steps']} {steps}: over this server's limit of {c.max_steps} (--max-steps)")
        if images > c.max_batch:
            raise UsageError(f"{names['images']} {images}: over this server's limit of {c.max_batch} images a "
                             "request (--max-batch)")

    async def check(self, model: Optional[str], s: Any) -> None:
        """Plan a copy of ``s`` against the loaded engine off the event loop, so a bad request is refused
        before it waits in the queue (the worker plans it again, on the model it runs on)."""
        import copy

        engine = self.models.engine
        if engine is None or (model is not None and model != self.models.current):
            return  # loading or switching: the worker's plan says what is wrong
        await asyncio.to_thread(engine.plan, copy.deepcopy(s))

    async def generate(self, request: Any, model: Optional[str], s: Any, label: str, restore: bool = False) -> Made:
        """Run request ``s`` on model ``model`` (None: the loaded one) in the worker; the images when done. With
        ``restore`` the model loaded before it is loaded again afterwards (A1111's override_settings).

        A client that disconnects while its job waits or runs loses that job (it is dropped, or stopped at its
        next step) and nothing else."""
        await self.check(model, s)
        job = self.worker.submit(lambda job: self._run(job, model, s, restore), label)
        waiting = asyncio.wrap_future(job.future)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.25)
            if done:
                return waiting.result()
            if await request.is_disconnected():
                job.stop.set()
                job.skip.set()
                job.future.cancel()
                raise ClientGone("the client disconnected")

    def _run(self, job: Any, model: Optional[str], s: Any, restore: bool = False) -> Made:
        """In the worker: the request's jobs batch by batch, so /skip can end one batch and the next still runs;
        with ``restore``, the model loaded before it loaded again before the answer goes (and before the next job)."""
        before = self.models.current
        try:
            # No reference to the engine outlives the images: the one restored never shares the memory with it.
            return self._images(job, self.models.use(model), s)
        finally:
            if restore and before is not None and self.models.current != before:
                try:
                    self.models.use(before)
                except Exception as exc:  # noqa: BLE001 - the images are made; the server keeps serving this model
                    self.say(f"could not load {before} again after the request ({exc}); {self.models.current} "
                             "stays loaded")

    def _images(self, job: Any, engine: Any, s: Any) -> Made:
        from sdcli.generation.tasks import Edit, default_size
        from sdcli.images import open_image

        p = engine.plan(s)
        s = p.settings
        chunks = [p.jobs[i:i + s.batch_size] for i in range(0, len(p.jobs), s.batch_size)]
        per_batch = engine.denoising_steps(s)
        job.total = per_batch * len(chunks)
        init = s.init_image
        if s.reference_images:  # an edit's size follows its images (the previews decode at it)
            size = Edit.size(s, engine.pipe, [open_image(image) for image in s.reference_images])
        else:
            dw, dh = init.size if hasattr(init, "size") else default_size(engine.pipe)
            size = (s.width or dw, s.height or dh)
        images: list[Any] = []
        for k, chunk in enumerate(chunks):
            if job.stop.is_set():
                break
            job.skip.clear()
            images += engine.images(s, chunk, cancel=job.skip, x0=True,
                                    on_step=lambda step, k=k: self.worker.on_step(job, step, k * per_batch, size))
        return Made(images, p, self.models.current, interrupted=job.stop.is_set())


def png_base64(made: Any) -> str:
    """A `Generated` image as a base64 PNG carrying the metadata `sdcli generate` writes."""
    from sdcli.generation.metadata import pnginfo

    buffer = io.BytesIO()
    made.image.save(buffer, format="PNG", pnginfo=pnginfo(made.record))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def image_from_bytes(data: bytes, field_name: str, max_pixels: int) -> Any:
    """An uploaded image as an upright RGB(A-flattened) PIL image; a DataError naming ``field_name`` if it is
    not an image, or holds more than ``max_pixels`` (refused from its header, before its pixels decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise DataError(f"{field_name}: a {img.width}x{img.height} image is over this server's limit of "
                            f"{max_pixels} pixels (--max-pixels)")
        img.load()
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        what = "not an image" if isinstance(exc, UnidentifiedImageError) else f"not a readable image ({exc})"
        raise DataError(" ".join(f"{field_name}: {what}".split())[:300]) from None
    return img


def image_from_base64(text: Any, field_name: str, max_pixels: int) -> Any:
    """A base64 image, as A1111 clients send them (a ``data:image/png;base64,`` prefix allowed)."""
    if not isinstance(text, str):
        raise DataError(f"{field_name}: expected a base64 image, got {type(text).__name__}")
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{field_name}: not base64 (send the image's bytes base64-encoded)") from None
    return image_from_bytes(data, field_name, max_pixels)


def mask_from(image: Any, invert: bool = False) -> Any:
    """A mask as sdcli reads it (white: repaint), from a picture sent as one."""
    from PIL import ImageOps

    grey = image.convert("L")
    return ImageOps.invert(grey) if invert else grey
