"""How each image records how it was made.

Two PNG text chunks: ``parameters`` in the format AUTOMATIC1111's web UI
writes (which ComfyUI, InvokeAI, civitai and exif readers understand), and
``sdcli`` holding the full settings as JSON, which `--from-metadata` reads
(`replayed`: the recorded settings, with what was typed taken from the command line).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcli.errors import DataError

if TYPE_CHECKING:  # settings reads records through this module; at run time it is imported where used
    from sdcli.generation.settings import Settings

SETTINGS_KEY = "sdcli"
A1111_KEY = "parameters"


def a1111_parameters(record: dict[str, Any]) -> str:
    """The three-line ``parameters`` text: prompt, negative prompt, comma list of settings.

    Which settings appear, under which keys, comes from their declarations (`a1111_fields`).
    """
    from sdcli.generation.settings import a1111_fields

    lines = [record["prompt"]]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    lines.append(", ".join(f"{k}: {v}" for k, v in a1111_fields(record)))
    return "\n".join(lines)


def pnginfo(record: dict[str, Any]):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(A1111_KEY, a1111_parameters(record))
    info.add_text(SETTINGS_KEY, json.dumps(record, sort_keys=True))
    return info


def read_settings(path: str | Path) -> dict[str, Any]:
    """The JSON settings sdcli stored in an image (or its .json sidecar)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.suffix.lower() == ".json":
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read settings from {path}: {exc}") from None
    try:
        with Image.open(path) as img:
            text = img.info.get(SETTINGS_KEY)
    except FileNotFoundError:
        raise DataError(f"no such image: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"not a readable image: {path} ({exc})") from None
    if text is None:
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            return read_settings(sidecar)
        raise DataError(f"{path} carries no sdcli settings (was it made by sdcli generate?)")
    try:
        return json.loads(text)
    except ValueError:
        raise DataError(f"{path}: the sdcli settings chunk is not valid JSON") from None


# What a record must hold to be remade, and where AUTOMATIC1111's text says it ("Size" holds two).
A1111_FALLBACK = {"steps": "Steps", "seed": "Seed", "guidance": "CFG scale"}


def read_record(path: str | Path) -> dict[str, Any]:
    """The sdcli record of an image, with the steps, seed, guidance or size its JSON lacks taken from its
    ``parameters`` text (what AUTOMATIC1111 and other tools keep): a replay never falls back on defaults.
    Values from the text are read as the command line reads them; the record's own are checked on replay."""
    from sdcli.generation.parsing import parse_float, parse_int

    record = read_settings(path)
    if not isinstance(record, dict):
        raise DataError(f"{path}: the sdcli settings are not a record of settings")
    missing = [k for k in (*A1111_FALLBACK, "width", "height") if k not in record]
    if not missing or Path(path).suffix.lower() == ".json":
        return record
    fields = parse_a1111(_a1111_text(path) or "")
    record = dict(record)
    for key, name in A1111_FALLBACK.items():
        if key in missing and name in fields:
            read = parse_float if key == "guidance" else parse_int
            record[key] = read(fields[name], f"{path}: the parameters text's {name}")
    if ("width" in missing or "height" in missing) and "Size" in fields:
        width, sep, height = fields["Size"].partition("x")
        what = f"{path}: the parameters text's Size {fields['Size']!r}"
        if not sep:
            raise DataError(f"{what} is not WIDTHxHEIGHT")
        record.setdefault("width", parse_int(width, what))
        record.setdefault("height", parse_int(height, what))
    return record


def replayed(image: Path, values: dict[str, Any], typed: set[str]) -> Settings:
    """The settings recorded in ``image``, with runtime settings and what was typed taken from the command line."""
    from sdcli.generation.settings import RUNTIME_FIELDS, Settings, settings_from_record

    replaced = set(RUNTIME_FIELDS) | typed | ({"prompts"} if values.get("prompts") else set())
    settings = settings_from_record(read_record(image), replaced)
    given = Settings(**values)
    for name in replaced:
        setattr(settings, name, getattr(given, name))
    return settings


def _a1111_text(path: str | Path) -> str | None:
    from PIL import Image

    with Image.open(path) as img:
        return img.info.get(A1111_KEY)


def parse_a1111(text: str) -> dict[str, str]:
    """Parse a ``parameters`` text back into prompt, negative prompt and fields (strings)."""
    lines = text.strip().split("\n")
    out: dict[str, str] = {}
    settings_line = lines[-1] if len(lines) > 1 and "Steps:" in lines[-1] else ""
    body = lines[:-1] if settings_line else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out["prompt"] = "\n".join(prompt)
    out["negative_prompt"] = "\n".join(negative)
    for part in _split_fields(settings_line):
        if ": " in part:
            key, value = part.split(": ", 1)
            out[key] = value
    return out


def _split_fields(line: str) -> list[str]:
    """The settings line's "Key: value" parts: split at ", " except inside a double-quoted value
    (AUTOMATIC1111 quotes values that hold commas, like `ControlNet 0: "Module: canny, ..."`)."""
    parts, current, quoted, i = [], [], False, 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and quoted and i + 1 < len(line):
            current.append(line[i:i + 2])
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        if not quoted and line.startswith(", ", i):
            parts.append("".join(current))
            current, i = [], i + 2
            continue
        current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts
