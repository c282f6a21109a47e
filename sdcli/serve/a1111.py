"""AUTOMATIC1111's web UI API, ``/sdapi/v1``: what `webuiapi`, Open WebUI, SillyTavern and bots send.

A request's fields become sdcli `Settings` (`settings_of`): ``cfg_scale`` is --guidance, ``sampler_name`` and
``scheduler`` A1111's names for sdcli's samplers and σ spacings (`sampler_of`), ``<lora:NAME:W>`` a LoRA of
the server's --lora-dir, ``batch_size × n_iter`` the images; Forge's ``distilled_cfg_scale`` is
--distilled-guidance. Fields A1111 has and sdcli does not are ignored,
as A1111 ignores fields it does not know; the ones a client might expect to matter are named in the log line.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from sdcli.errors import UsageError


class Txt2Img(BaseModel):
    """The fields of A1111's txt2img request that sdcli reads (the rest are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    steps: int = 20
    cfg_scale: float = 7.0
    # Forge's field for a guidance-distilled model's guidance input (Flux.1-dev, Kontext, FLUX.2-dev), which
    # cfg_scale is not: absent, the model card's (as `sdcli generate`; Forge's form shows 3.5 for every model).
    distilled_cfg_scale: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    sampler_name: Optional[str] = None
    sampler_index: Optional[str] = None  # A1111's older name for sampler_name
    scheduler: Optional[str] = None
    batch_size: int = 1
    n_iter: int = 1
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    denoising_strength: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    # A1111 puts back the options override_settings changed (the model too) once the request is done, unless false.
    override_settings_restore_afterwards: bool = True
    send_images: bool = True
    save_images: bool = False


class Img2Img(Txt2Img):
    init_images: list[Any] = []
    mask: Optional[str] = None
    mask_blur: int = 4
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpainting_mask_invert: int = 0
    resize_mode: int = 0


def sampler_of(sampler_name: Optional[str], scheduler: Optional[str]) -> tuple[Optional[str], str]:
    """(sdcli sampler, σ spacing) for A1111's ``sampler_name`` and ``scheduler``, read with the one table of names
    `sdcli generate -s` reads (`sdcli.schedule.samplers`): A1111's names ("Euler a", "DPM++ 2M"; the older
    "DPM++ 2M Karras" carries its schedule), ComfyUI's or sdcli's own; none keeps the model's own sampler.
    """
    from sdcli.schedule.samplers import resolve, sigmas_of

    sigmas = sigmas_of(scheduler or "automatic", "scheduler")
    name = (sampler_name or "").strip()
    if not name or name.lower() == "automatic":
        return None, sigmas
    try:
        spec, sigmas = resolve(name, sigmas)
    except UsageError:
        raise UsageError(f"sampler_name {name!r}: not a sampler this server has; choose from: "
                         f"{', '.join(a1111_samplers())}", setting="scheduler") from None
    return spec.name, sigmas


def a1111_samplers() -> list[str]:
    from sdcli.schedule.samplers import SCHEDULERS

    return list(dict.fromkeys(spec.a1111 for spec in SCHEDULERS.values()))


def settings_of(body: Txt2Img, server: Any, notes: list[str]) -> tuple[Any, Optional[str]]:
    """The `Settings` of an A1111 request, and the server model it names (None: the loaded one)."""
    from sdcli.generation.settings import Settings
    from sdcli.serve.models import take_loras
    from sdcli.serve.server import image_from_base64, mask_from

    images = body.batch_size * body.n_iter
    server.check_limits(width=body.width, height=body.height, steps=body.steps, images=images,
                        names={"size": "width x height", "steps": "steps", "images": "batch_size x n_iter"})
    prompt, loras = take_loras(body.prompt, server.models)
    negative, negative_loras = take_loras(body.negative_prompt, server.models)
    override = dict(body.override_settings or {})
    model = None
    if override.get("sd_model_checkpoint"):
        model = server.models.lookup(override.pop("sd_model_checkpoint"), "override_settings.sd_model_checkpoint")
    clip_skip = override.pop("CLIP_stop_at_last_layers", 1)
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
        raise UsageError(f"override_settings.CLIP_stop_at_last_layers {clip_skip!r}: not a whole number")
    if override:
        notes.append(f"override_settings ignored: {', '.join(sorted(override))}")
    sampler, sigmas = sampler_of(body.sampler_name or body.sampler_index, body.scheduler)
    if body.subseed != -1 and body.subseed_strength:
        notes.append("subseed ignored (sdcli has no variation seeds)")
    if body.save_images:
        notes.append("save_images ignored (the server writes no files; the images come back in the answer)")
    name = server.models.running(model)
    facts = server.models.facts(name)  # the model it runs on, read without loading it
    values: dict[str, Any] = dict(
        prompts=[prompt], negative_prompt=negative, steps=body.steps, guidance=[body.cfg_scale],
        seeds=None if body.seed == -1 else [body.seed], num_images=images, batch_size=body.batch_size,
        width=body.width, height=body.height, scheduler=sampler, sigmas=sigmas, loras=loras + negative_loras,
        clip_skip=clip_skip,
    )
    if facts.guidance == "none":
        # A1111 clients send a cfg_scale with every request (webuiapi 7): a model without a guidance input (FLUX.2
        # Klein distilled, Flux-schnell) ignores it, as Forge does, rather than refusing every request.
        del values["guidance"]
        if body.cfg_scale != 1:
            notes.append(f"cfg_scale ignored: {name} has no guidance input")
    if facts.guidance == "distilled":
        # Checked here, not by the engine: its refusal names CLI flags (--true-cfg, --distilled-guidance) that an
        # A1111 client cannot send. Forge users set CFG 1 on Flux and its guidance with distilled_cfg_scale.
        if body.cfg_scale != 1:
            raise UsageError(f"cfg_scale {body.cfg_scale:g}: {name}'s guidance is distilled; send cfg_scale 1 and "
                             "set its guidance with distilled_cfg_scale (Forge's field)", setting="guidance")
        values["distilled_guidance"] = body.distilled_cfg_scale
    elif body.distilled_cfg_scale is not None:
        # Forge's clients may send it to any model; one without the input ignores it, as Forge does.
        notes.append(f"distilled_cfg_scale ignored: {name}'s guidance is not distilled")
    if isinstance(body, Img2Img):
        if not body.init_images:
            raise UsageError("init_images: img2img needs one image (base64)", setting="init_image")
        max_pixels = server.config.max_pixels
        # An editing model edits its init images as the prompt says (`--reference-image`), as Forge runs FLUX.1
        # Kontext from img2img; with a mask it is inpainting (or the model's one-line refusal), as on any other.
        most = 0 if body.mask else facts.references
        if most:
            values["reference_images"] = edited_images(body, name, most, max_pixels, notes)
            return Settings(**values), name  # the model they were read for, even if another loads meanwhile
        if len(body.init_images) > 1:
            notes.append("init_images: only the first is used")
        values["init_image"] = image_from_base64(body.init_images[0], "init_images[0]", max_pixels)
        values["strength"] = 0.75 if body.denoising_strength is None else body.denoising_strength
        if body.mask:
            mask = image_from_base64(body.mask, "mask", max_pixels)
            values["mask"] = mask_from(mask, invert=bool(body.inpainting_mask_invert))
            values["mask_blur"] = body.mask_blur
            if body.inpainting_fill != 1 or body.inpaint_full_res:
                notes.append("inpainting_fill and inpaint_full_res ignored (sdcli repaints the masked part of the "
                              "whole picture, starting from its original content)")
    elif body.enable_hr:
        if body.hr_resize_x or body.hr_resize_y:
            notes.append("hr_resize_x/y ignored: hr_scale sets the hires size")
        values.update(hires_scale=body.hr_scale, hires_steps=body.hr_second_pass_steps or None,
                      hires_upscaler="latent" if (body.hr_upscaler or "").lower().startswith("latent") else "lanczos",
                      hires_strength=0.7 if body.denoising_strength is None else body.denoising_strength)
    return Settings(**values), model


def edited_images(body: Img2Img, name: str, most: int, max_pixels: int, notes: list[str]) -> list[Any]:
    """An editing model's init images, in order, as the reference images it edits (at most ``most``)."""
    from sdcli.serve.server import image_from_base64

    count = len(body.init_images)
    if count > most:
        raise UsageError(f"init_images: {name} edits {'at most ' if most > 1 else ''}{most} image"
                         f"{'s' if most > 1 else ''} a request, not {count}", setting="reference_images")
    # Ignored, not refused: webuiapi, Krita's plugin and A1111's own UI send a denoising_strength with every
    # img2img (0.75 by default), so refusing it would refuse every request. The edit starts from noise and keeps
    # the picture through its reference, as Forge's Kontext does at denoising strength 1 (what Forge guides set).
    if body.denoising_strength is not None and body.denoising_strength != 1:
        notes.append(f"denoising_strength ignored: {name} edits init_images as the prompt says, from noise "
                     "(as at denoising strength 1)")
    return [image_from_base64(image, f"init_images[{i}]", max_pixels) for i, image in enumerate(body.init_images)]


def answer(body: Txt2Img, made: Any, notes: list[str] = ()) -> dict[str, Any]:
    """A1111's answer: base64 PNGs (with sdcli's metadata), the request's parameters, and ``info``."""
    from sdcli import __version__
    from sdcli.generation.metadata import a1111_parameters
    from sdcli.serve.server import png_base64

    records = [m.record for m in made.images]
    s = made.plan.settings
    first = records[0] if records else {}
    info = {
        "prompt": s.prompts[0], "all_prompts": [r["prompt"] for r in records],
        "negative_prompt": s.negative_prompt, "all_negative_prompts": [r.get("negative_prompt", "") for r in records],
        "seed": made.plan.seeds[0], "all_seeds": [r["seed"] for r in records] or made.plan.seeds,
        "subseed": -1, "all_subseeds": [-1 for _ in records], "subseed_strength": 0,
        "width": first.get("width", s.width), "height": first.get("height", s.height),
        "sampler_name": first.get("sampler"), "scheduler": first.get("schedule_type"), "cfg_scale": body.cfg_scale,
        "distilled_cfg_scale": s.distilled_guidance,  # as the model got it (its card's default when not sent)
        "steps": s.steps, "batch_size": s.batch_size, "clip_skip": s.clip_skip, "sd_model_name": made.model,
        "denoising_strength": None if s.reference_images else body.denoising_strength,  # an edit takes none
        "infotexts": [a1111_parameters(r) for r in records],
        "interrupted": made.interrupted, "version": f"sdcli {__version__}",
        # What of the request was ignored, and why (the log line's notes), one a line as A1111's comments.
        "comments": "".join(f"{note}\n" for note in notes),
    }
    parameters = body.model_dump(exclude={"init_images", "mask"})
    return {"images": [png_base64(m) for m in made.images] if body.send_images else [],
            "parameters": parameters, "info": json.dumps(info)}


def router(server: Any) -> Any:
    api = APIRouter()

    async def generate(body: Txt2Img, request: Request, label: str) -> dict[str, Any]:
        notes: list[str] = []
        request.state.notes = notes
        # Off the event loop: it reads the model's configs (on first use) and decodes an img2img's images.
        s, model = await asyncio.to_thread(settings_of, body, server, notes)
        asked = body.override_settings and body.override_settings.get("sd_model_checkpoint")
        made = await server.generate(request, model, s, label,
                                     restore=bool(asked) and body.override_settings_restore_afterwards)
        return answer(body, made, notes)

    @api.post("/txt2img")
    async def txt2img(body: Txt2Img, request: Request) -> Any:
        return await generate(body, request, "txt2img")

    @api.post("/img2img")
    async def img2img(body: Img2Img, request: Request) -> Any:
        return await generate(body, request, "img2img")

    @api.get("/progress")
    async def progress(skip_current_image: bool = False) -> Any:
        worker = server.worker
        p = worker.progress()
        if not skip_current_image and p["job"]:
            worker.want_preview.set()
        running = 1 if p["job"] else 0
        return {
            "progress": p["progress"], "eta_relative": p["eta_relative"],
            "state": {"skipped": p["skipped"], "interrupted": p["interrupted"], "stopping_generation": False,
                      "job": p["job"] or "", "job_count": worker.waiting + running, "job_timestamp": p["timestamp"],
                      "job_no": worker.finished, "sampling_step": p["step"], "sampling_steps": p["steps"]},
            # textinfo says what the preview shows ("x̂0 at step 3/20, σ 4.07"): sdcli's page captions it so.
            "current_image": None if skip_current_image else p["preview"],
            "textinfo": None if skip_current_image else p["preview_at"],
        }

    @api.post("/interrupt")
    async def interrupt() -> Any:
        server.worker.interrupt()
        return {}

    @api.post("/skip")
    async def skip() -> Any:
        server.worker.interrupt(skip=True)
        return {}

    @api.get("/sd-models")
    async def sd_models() -> Any:
        # Names only: a client never learns (or sends) a path on the server.
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}
                for name in server.models.names]

    @api.get("/options")
    async def get_options() -> Any:
        return {"sd_model_checkpoint": server.models.current, "CLIP_stop_at_last_layers": 1,
                "samples_format": "png", "sd_checkpoint_hash": None}

    @api.post("/options")
    async def set_options(request: Request) -> Any:
        options = await json_object(request)
        notes = request.state.notes = []
        asked = options.pop("sd_model_checkpoint", None)
        if asked is not None:
            name = server.models.lookup(asked, "sd_model_checkpoint")
            job = server.worker.submit(lambda job: server.models.use(name), f"load {name}")
            await asyncio.wrap_future(job.future)
        if options:
            notes.append(f"options ignored: {', '.join(sorted(map(str, options)))}")
        return None

    @api.get("/samplers")
    async def samplers() -> Any:
        from sdcli.schedule.samplers import SCHEDULERS

        return [{"name": name, "aliases": [s.name for s in SCHEDULERS.values() if s.a1111 == name], "options": {}}
                for name in a1111_samplers()]

    @api.get("/schedulers")
    async def schedulers() -> Any:
        from sdcli.schedule.samplers import SIGMA_NAMES

        return [{"name": a1111.lower().replace(" ", "_"), "label": a1111, "aliases": [key], "default_rho": -1,
                 "need_inner_model": False} for key, a1111 in SIGMA_NAMES.items()]

    @api.get("/loras")
    async def loras() -> Any:
        return [{"name": name, "alias": name, "path": name, "metadata": {}} for name in server.models.loras()]

    @api.get("/upscalers")
    async def upscalers() -> Any:
        # hires fix's pixel upscaler; A1111 lists its latent modes apart (/latent-upscale-modes).
        return [{"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]

    @api.get("/latent-upscale-modes")
    async def latent_modes() -> Any:
        return [{"name": "Latent"}]

    @api.get("/scripts")
    async def scripts() -> Any:
        return {"txt2img": [], "img2img": []}

    @api.post("/png-info")
    async def png_info(request: Request) -> Any:
        from sdcli.generation.metadata import A1111_KEY, parse_a1111
        from sdcli.serve.server import image_from_base64

        body = await json_object(request)
        image = image_from_base64(body.get("image"), "image", server.config.max_pixels)
        text = image.info.get(A1111_KEY, "")
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != A1111_KEY}
        return {"info": text, "items": items, "parameters": parse_a1111(text) if text else {}}

    return api


async def json_object(request: Any) -> dict[str, Any]:
    """The body as a JSON object; a one-line 422 otherwise (as FastAPI answers a malformed model)."""
    from fastapi import HTTPException

    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise HTTPException(422, f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise HTTPException(422, f"the body must be a JSON object, not {type(body).__name__}")
    return body
