"""The server's own models and LoRAs, by name: a request picks among them and never names a path.

`Models` keeps at most one engine loaded: switching drops the old pipeline before the new one loads, so
two never share the memory. It is used only from the worker thread (`sdcli.serve.worker`), which runs
one job at a time, so a switch never overlaps a generation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional

from sdcli.errors import SdcliError, UsageError


class Unknown(SdcliError):
    """A request named a model or LoRA the server does not have (a 404 for the model, else a 400)."""


def model_name(ref: Optional[str]) -> str:
    """How the APIs call a model: a folder or file by its name, a Hub id as it is, the bundled one 'shapes'."""
    from sdcli import defaults
    from sdcli.pipeline import resolve_model

    resolved = resolve_model(ref)
    path = Path(resolved).expanduser()
    if path.exists():
        if path.resolve() == defaults.BUNDLED_MODEL.resolve():
            return "shapes"
        return path.stem if path.is_file() else path.name
    return resolved


class Models:
    """The models the server was started with (the first loaded), and the engine of the one loaded now."""

    def __init__(self, refs: list[Optional[str]], at_load: dict[str, Any], lora_dir: Optional[Path] = None,
                 say: Callable[[str], None] = lambda text: None):
        from sdcli.pipeline import resolve_model

        self.refs: dict[str, str] = {}
        for ref in refs or [None]:
            name = model_name(ref)
            if name in self.refs:  # two folders of one name: the second by its number
                name = f"{name}-{len(self.refs) + 1}"
            self.refs[name] = resolve_model(ref)
        self.at_load = at_load  # device, dtype, threads: every model loads with them
        self.lora_dir = Path(lora_dir).expanduser() if lora_dir else None
        self.say = say
        self.engine: Any = None
        self.current: Optional[str] = None
        self._facts: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return list(self.refs)

    def running(self, name: Optional[str] = None) -> str:
        """The model a request for ``name`` runs on (None: the one loaded, else the first), as `use` picks it."""
        return name or self.current or self.names[0]

    def facts(self, name: str) -> Any:
        """`sdcli.families.ModelFacts` of model ``name``: the loaded engine's own, else read from its configs
        (no weights; kept, since a server's models do not change), so a request is shaped for the model it runs
        on before it is queued, without loading that model."""
        from sdcli.families import model_facts

        engine, current = self.engine, self.current  # the worker may switch them meanwhile: one reading of both
        if engine is not None and current == name:
            return engine.facts
        if name not in self._facts:
            self._facts[name] = model_facts(self.refs[name])
        return self._facts[name]

    def lookup(self, asked: str, field: str) -> str:
        """The server's model called ``asked`` (A1111 titles may carry a " [hash]" tail); ``field`` names the
        request's field in the error."""
        text = str(asked).strip()
        for candidate in (text, re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", text)):
            for name in self.refs:
                if candidate == name or candidate.lower() == name.lower():
                    return name
        raise Unknown(f"{field} {asked!r} is not one of this server's models: {', '.join(self.refs)}",
                      setting="model")

    def use(self, name: Optional[str] = None) -> Any:
        """The engine of model ``name`` (default: the loaded one, else the first), loading it if need be.

        The old engine goes first (and its memory with it): a server never holds two pipelines. If the new
        one fails to load, the old one is loaded again, so the server keeps serving what it served.
        """
        name = self.running(name)
        if name == self.current and self.engine is not None:
            return self.engine
        previous = self.current
        self._drop()
        try:
            self._load(name)
        except Exception:
            if previous is not None:
                self._load(previous)
            raise
        return self.engine

    def _load(self, name: str) -> None:
        import time

        from sdcli.generation.engine import Engine
        from sdcli.generation.settings import Settings

        t0 = time.perf_counter()
        # LoRAs may come with any request: keep the attention projections unfused (--compile) so they fit.
        self.engine = Engine.load(Settings(model=self.refs[name], **self.at_load), fuse_qkv=False)
        self.current = name
        self.say(f"loaded {self.engine.describe()} in {time.perf_counter() - t0:.1f}s")

    def _drop(self) -> None:
        if self.engine is None:
            return
        import gc

        self.engine, self.current = None, None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # torch is a dependency; without it nothing was loaded either
            pass

    # LoRAs ---------------------------------------------------------------------------------------------

    def loras(self) -> dict[str, Path]:
        """The LoRAs in --lora-dir by name: each .safetensors file by its stem, each folder holding weights by
        its name (read afresh, so a file added while serving is there for the next request)."""
        from sdcli.generation.settings import lora_files

        if self.lora_dir is None or not self.lora_dir.is_dir():
            return {}
        found = {}
        for path in sorted(self.lora_dir.iterdir()):
            if path.is_file() and path.suffix.lower() == ".safetensors":
                found.setdefault(path.stem, path)
            elif path.is_dir() and lora_files(path):
                found.setdefault(path.name, path)
        return found

    def lora(self, name: str) -> Path:
        found = self.loras()
        if name in found:
            return found[name]
        where = "this server has no --lora-dir" if self.lora_dir is None else (
            f"this server's LoRAs are: {', '.join(found)}" if found else "this server's --lora-dir holds none")
        raise Unknown(f"<lora:{name}>: no LoRA of that name ({where})", setting="loras")


# A1111's prompt syntax for LoRAs: <lora:NAME:WEIGHT> (the weight optional, 1 by default).
LORA_TAG = re.compile(r"<lora:([^:>]*)(?::([^:>]*))?(?::[^>]*)?>")


def take_loras(prompt: str, models: Models) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its <lora:NAME:WEIGHT> tags, and those LoRAs as (path, weight) from --lora-dir."""
    import math

    loras = []
    for m in LORA_TAG.finditer(prompt):
        name, weight = m.group(1).strip(), (m.group(2) or "1").strip()
        try:
            scale = float(weight)
        except ValueError:
            raise UsageError(f"{m.group(0)}: the weight {weight!r} is not a number", setting="loras") from None
        if not math.isfinite(scale):
            raise UsageError(f"{m.group(0)}: the weight must be a finite number", setting="loras")
        loras.append((str(models.lora(name)), scale))
    return LORA_TAG.sub("", prompt).strip(), loras
