"""Command-line text to numbers, as typed on a keyboard: whole numbers, finite decimals, and PATH:SCALE.

The settings (`sdcli.generation.settings`), ControlNet's specs (`sdcli.generation.control`) and the record
reader (`sdcli.generation.metadata`) all read numbers this way; it imports nothing of theirs.
"""

from __future__ import annotations

import math
import re
from typing import Any

from sdcli.errors import UsageError

# Digits as typed on a keyboard: Python's int() and float() also take '١٢' (Arabic-Indic), '1_0',
# 'nan' and 'infinity', and str.isdigit() takes '²', which int() then refuses.
_WHOLE = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_int(text: Any, what: str) -> int:
    """A whole number in ASCII digits; UsageError naming ``what`` (the option) otherwise."""
    part = str(text).strip()
    if not _WHOLE.fullmatch(part):
        raise UsageError(f"{what}: {part!r} is not a whole number")
    return int(part)


def parse_float(text: Any, what: str) -> float:
    """A finite number in ASCII digits (1, 0.5, 1e-3); UsageError naming ``what`` otherwise."""
    part = str(text).strip()
    if not _DECIMAL.fullmatch(part):
        raise UsageError(f"{what}: {part!r} is not a number")
    value = float(part)
    if not math.isfinite(value):
        raise UsageError(f"{what}: {part!r} is not a finite number")
    return value


def split_scale(spec: str, flag: str = "--lora") -> tuple[str, float]:
    """'path/or/hub-id:0.8' -> ('path/or/hub-id', 0.8); without a scale (or with a drive's colon), 1.0.

    A tail Python would read as a number ('nan', 'inf', '1_0', '١') is a scale that is refused, not a path.
    """
    head, sep, tail = spec.rpartition(":")
    if sep and head and not tail.startswith(("/", "\\")):
        try:
            float(tail)
        except ValueError:
            return spec, 1.0
        return head, parse_float(tail, f"{flag} {spec}: the scale")
    return spec, 1.0
