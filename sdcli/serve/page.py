"""The page (``GET /``: one HTML file, `page.html`, with its script and style inline, so it works offline)
and the one endpoint only it needs, ``POST /sdcli/sweep``: the guidance × seed contact sheet that
``sdcli generate -g 1,3,7.5 --seed 1,2`` writes, made by the same code (`contact_sheet`).

Everything else the page does goes through the A1111 API (/sdapi/v1: txt2img, progress, samplers, interrupt),
behind the same credentials: the browser's login prompt (basic auth; with --api-key, the key as the password).
"""

from __future__ import annotations

import base64
import dataclasses
import io
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from sdcli.errors import UsageError
from sdcli.serve.a1111 import Txt2Img, settings_of


class Sweep(Txt2Img):
    """A txt2img request whose guidance and seed are lists: every pair is one cell of the sheet."""

    cfg_scales: list[float] = [1.0, 3.0, 7.5]
    seeds: list[int] = [1, 2]


def router(server: Any) -> Any:
    api = APIRouter()

    @api.get("/", include_in_schema=False)
    async def page() -> Any:
        html = resources.files("sdcli.serve").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    @api.post("/sdcli/sweep")
    async def sweep(body: Sweep, request: Request) -> Any:
        from sdcli.generation.outputs import contact_sheet

        notes: list[str] = []
        request.state.notes = notes
        if not body.cfg_scales or not body.seeds:
            raise UsageError("cfg_scales and seeds: a sweep needs at least one of each")
        server.check_limits(width=body.width, height=body.height, steps=body.steps,
                            images=len(body.cfg_scales) * len(body.seeds),
                            names={"size": "width x height", "steps": "steps", "images": "cfg_scales x seeds"})
        one = body.model_copy(update={"seed": body.seeds[0], "batch_size": 1, "n_iter": 1})
        s, model = settings_of(one, server, notes)
        # One cell a batch, as `sdcli generate` runs a sweep by default: the same images, pixel for pixel.
        s = dataclasses.replace(s, guidance=list(body.cfg_scales), seeds=list(body.seeds))
        made = await server.generate(request, model, s, "sweep")
        cells = [(g.job.values, g.image) for g in made.images]
        if cells and len(cells) < len(made.plan.jobs):  # interrupted: the cells not made stay blank
            from PIL import Image

            blank = Image.new("RGB", made.images[0].image.size, "white")
            done = {g.job.index for g in made.images}
            cells += [(job.values, blank) for job in made.plan.jobs if job.index not in done]
        sheet = contact_sheet(cells, made.plan.swept()) if cells else None
        return {"sheet": sheet and _png64(sheet), "interrupted": made.interrupted,
                "cells": [{"cfg_scale": v["guidance"], "seed": v["seed"]} for v, _ in cells[:len(made.images)]]}

    return api


def _png64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
