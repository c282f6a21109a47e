"""sdcli from Python: load a model once, generate many images (`sdcli.generation.engine`).

    from sdcli.api import load

    engine = load("bundled:shapes")   # or a Hub id, a diffusers folder, a .safetensors file
    for made in engine.generate("a red circle", seeds=[1, 2], steps=20):
        made.image.save(f"circle-{made.record['seed']}.png")   # made.record: what the PNG metadata holds

Each request's keywords are `sdcli generate`'s settings by their field names (`Settings`); what is decided at
load (model, device, dtype, vae, cpu_offload, compile, threads) goes to `load`. `on_step` receives a `Step`
per denoising step; a set ``cancel`` (`threading.Event`) stops the request between two steps. Errors are
`SdcliError`s with the one-line message the CLI prints.
"""

from __future__ import annotations

from typing import Any

from sdcli.errors import SdcliError
from sdcli.generation.denoise import Cancelled, Step
from sdcli.generation.engine import Engine
from sdcli.generation.run import Generated
from sdcli.generation.settings import Settings

__all__ = ["Cancelled", "Engine", "Generated", "SdcliError", "Settings", "Step", "load"]


def load(model: str | None = None, **values: Any) -> Engine:
    """Load ``model`` once for many requests; ``values`` are the settings decided at load (device, dtype, vae,
    cpu_offload, compile, ...), as `sdcli generate` names them."""
    return Engine.load(model=model, **values)
