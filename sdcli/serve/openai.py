"""OpenAI's images API, ``/v1``: what an OpenAI SDK, Open WebUI's "openai" engine and LLM front-ends send.

``/v1/images/generations`` takes ``prompt``, ``n``, ``size`` ("WxH"), ``response_format`` (``b64_json``; this
server keeps no files to give URLs of) and ``model`` (one of the server's), plus sdcli's own ``seed``,
``steps``, ``guidance``, ``negative_prompt`` and ``sampler`` as extra fields; ``/v1/images/edits`` the same
as a multipart form with the ``image`` (and a ``mask``, or the image's transparent part, to repaint). On an
editing model (FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit) without a mask the uploads, ``image[]`` in order, are
what the prompt edits, as ``sdcli generate --reference-image`` takes them (gpt-image-1's meaning). Errors
come in OpenAI's shape (`sdcli.serve.security.error_body`), so its clients raise them as they would OpenAI's.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from sdcli.errors import UsageError


class Generation(BaseModel):
    """OpenAI's image request; its other fields (quality, style, user...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    prompt: str
    n: int = 1
    size: Optional[str] = None
    response_format: Optional[str] = "b64_json"
    model: Optional[str] = None
    # sdcli's own settings, as extra fields (OpenAI's SDKs pass them through extra_body).
    seed: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    negative_prompt: str = ""
    sampler: Optional[str] = None
    strength: Optional[float] = None  # edits: how far to move from the image (img2img's strength)


def parse_size(size: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """'512x768' -> (512, 768); None or 'auto' -> the model's size (or the image's, for an edit)."""
    if size is None or size.strip().lower() in ("", "auto"):
        return None, None
    m = re.fullmatch(r"\s*(-?\d+)\s*[xX×]\s*(-?\d+)\s*", size)
    if not m:
        raise UsageError(f"size {size!r}: not WIDTHxHEIGHT (e.g. 512x512) or auto", setting="width")
    return int(m.group(1)), int(m.group(2))


def settings_of(body: Generation, server: Any, notes: list[str], image: Any = None, mask: Any = None,
                references: Optional[list[Any]] = None, model: Optional[str] = None) -> tuple[Any, Optional[str]]:
    """The request as `Settings`, and the model it names (None: the loaded one). An edit brings ``image`` (and
    the ``mask`` to repaint) to rework, or, for an editing model, the ``references`` to edit as the prompt says."""
    from sdcli.generation.settings import Settings
    from sdcli.serve.a1111 import sampler_of
    from sdcli.serve.models import take_loras

    if body.response_format not in (None, "b64_json"):
        raise UsageError(f"response_format {body.response_format!r}: this server answers with b64_json only "
                         "(it keeps no files to give URLs of)")
    width, height = parse_size(body.size)
    steps = body.steps if body.steps is not None else Settings().steps
    server.check_limits(width=width, height=height, steps=steps, images=body.n,
                        names={"size": "size", "steps": "steps", "images": "n"})
    if model is None and body.model:
        model = server.models.lookup(body.model, "model")
    prompt, loras = take_loras(body.prompt, server.models)
    sampler, sigmas = sampler_of(body.sampler, None)
    values: dict[str, Any] = dict(
        prompts=[prompt], negative_prompt=body.negative_prompt, steps=steps, num_images=body.n, batch_size=body.n,
        seeds=None if body.seed is None else [body.seed], width=width, height=height, scheduler=sampler,
        sigmas=sigmas, loras=loras,
    )
    if body.guidance is not None:
        values["guidance"] = [body.guidance]
    if image is not None:
        values["init_image"] = image
        if body.strength is not None:
            values["strength"] = body.strength
        if mask is not None:
            values["mask"] = mask
    if references:
        if body.strength is not None:  # the Edit task would say "without --init-image", which reads wrongly here
            raise UsageError(f"strength: {model} edits its images as the prompt says, from noise; it takes no "
                             "strength (an img2img setting)", setting="strength")
        values["reference_images"] = references
    return Settings(**values), model


def answer(made: Any) -> dict[str, Any]:
    from sdcli.serve.server import png_base64

    return {"created": int(time.time()),
            "data": [{"b64_json": png_base64(m), "revised_prompt": m.record["prompt"]} for m in made.images]}


def edit_inputs(image: Any, mask: Any) -> tuple[Any, Any]:
    """The picture and the mask sdcli repaints (white), from OpenAI's convention: repaint where the mask (or,
    without one, the image itself) is transparent. An opaque image without a mask is an img2img of all of it."""
    from sdcli.serve.server import mask_from

    source = mask if mask is not None else image
    if "A" in source.getbands() or (source.mode == "P" and "transparency" in source.info):
        alpha = source.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return image, alpha.point(lambda a: 255 if a < 128 else 0)
    if mask is not None:
        return image, mask_from(mask)  # an opaque mask: white is what to repaint, as sdcli reads masks
    return image, None


def router(server: Any) -> Any:
    api = APIRouter()

    @api.post("/images/generations")
    async def generations(body: Generation, request: Request) -> Any:
        notes: list[str] = []
        request.state.notes = notes
        s, model = settings_of(body, server, notes)
        return answer(await server.generate(request, model, s, "generations"))

    @api.post("/images/edits")
    async def edits(request: Request) -> Any:
        from pydantic import ValidationError
        from fastapi.exceptions import RequestValidationError

        from sdcli.serve.server import image_from_bytes

        notes: list[str] = []
        request.state.notes = notes
        form = await request.form()
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        try:
            body = Generation.model_validate(fields)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        uploads = [(k, v) for k, v in form.multi_items() if not isinstance(v, str)]
        images = [v for k, v in uploads if k in ("image", "image[]")]  # in the order sent
        if not images:
            raise UsageError("image: an edit needs the image to edit, as a file upload", setting="init_image")
        limit = server.config.max_pixels
        picture = image_from_bytes(await images[0].read(), "image", limit)
        mask = next((v for k, v in uploads if k == "mask"), None)
        picture, repaint = edit_inputs(picture, image_from_bytes(await mask.read(), "mask", limit) if mask else None)
        # An editing model edits its uploads as the prompt says (`--reference-image`), as gpt-image-1 does; with
        # a mask, or a transparent part, it is inpainting (or the model's one-line refusal of it), as on any other.
        name = server.models.running(server.models.lookup(body.model, "model") if body.model else None)
        most = 0 if repaint is not None else (await asyncio.to_thread(server.models.facts, name)).references
        if most:
            if len(images) > most:
                raise UsageError(f"image: {name} edits {'at most ' if most > 1 else ''}{most} image"
                                 f"{'s' if most > 1 else ''} a request, not {len(images)}", setting="reference_images")
            references = [picture] + [image_from_bytes(await f.read(), "image", limit) for f in images[1:]]
            # The model they were read for, even if another is loaded before this request's turn.
            s, model = settings_of(body, server, notes, references=references, model=name)
        else:
            if len(images) > 1:
                notes.append("image: only the first is used")
            s, model = settings_of(body, server, notes, image=picture, mask=repaint)
        return answer(await server.generate(request, model, s, "edits"))

    @api.get("/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "sdcli"}
                                           for name in server.models.names]}

    return api
