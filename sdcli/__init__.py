"""sdcli: a small, scriptable command line for text-to-image diffusion on Hugging Face diffusers.

From Python, load a model once and generate many images (`sdcli.generation.engine`)::

    import sdcli

    engine = sdcli.load("bundled:shapes")   # or a Hub id, a diffusers folder, a .safetensors file
    for made in engine.generate("a red circle", seeds=[1, 2], steps=20):
        made.image.save(f"circle-{made.record['seed']}.png")
"""

from typing import Any

__version__ = "0.1.0"


def load(model: "str | None" = None, **values: Any) -> Any:
    """Load ``model`` once for many requests: an `sdcli.generation.engine.Engine`. ``values`` are the settings
    decided at load (device, dtype, vae, cpu_offload, compile, ...), as `sdcli generate` names them."""
    from sdcli.generation.engine import Engine

    return Engine.load(model=model, **values)
