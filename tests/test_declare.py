"""The declared `Range` of a setting: what it accepts and how it names a refusal."""

from __future__ import annotations

import pytest

from sdcli.declare import Range, numbers_in
from sdcli.errors import UsageError


@pytest.mark.parametrize("value", [0, 2**63 - 1])
def test_a_bound_holds_exactly_for_whole_numbers_past_what_a_float_holds(value):
    Range(0, 2**63 - 1).check("--seed", value)  # as floats, 2^63 - 1 and 2^63 are one number
    with pytest.raises(UsageError, match="got 9223372036854775808"):
        Range(0, 2**63 - 1).check("--seed", 2**63)


def test_every_number_a_setting_holds_is_found_and_named_as_typed():
    assert numbers_in("--guidance", [1.0, 3.0]) == [("--guidance", 1.0), ("--guidance", 3.0)]
    assert numbers_in("--lora", [("a.safetensors", 0.5)]) == [("--lora a.safetensors:SCALE", 0.5)]
    assert numbers_in("--width", None) == [] and numbers_in("--steps", 2) == [("--steps", 2)]


def _out_of_range(t):
    """A value of declared type ``t`` holding a number no range takes (inf), or None where ``t`` holds none."""
    import math
    import typing

    args = [a for a in typing.get_args(t) if a is not type(None)]
    t = args[0] if typing.get_origin(t) is typing.Union and len(args) == 1 else t
    if typing.get_origin(t) is list:
        (inner,) = typing.get_args(t)
        if typing.get_origin(inner) is tuple:
            return [("x", math.inf)] if typing.get_args(inner)[1] is float else None
        item = _out_of_range(inner)
        return None if item is None else [item]
    return math.inf if t in (int, float) else None


def _numeric_settings():
    from sdcli.declare import declared
    from sdcli.generation.settings import Settings

    return [d.name for d in declared(Settings) if _out_of_range(d.type) is not None]


@pytest.mark.parametrize("name", _numeric_settings())
def test_every_numeric_setting_names_itself_when_out_of_range(name):
    from sdcli.declare import check_ranges, declared
    from sdcli.declare import worded
    from sdcli.generation.settings import Settings

    d = next(d for d in declared(Settings) if d.name == name)
    with pytest.raises(UsageError) as err:
        check_ranges(Settings(prompts=["x"], **{name: _out_of_range(d.type)}))
    assert err.value.setting == name
    assert str(err.value).startswith(f"{d.flag} ")  # the command line's wording, as before
    assert worded(err.value, {name: "api_name"}, Settings).startswith("api_name ")


def test_the_numeric_settings_are_all_there():
    from sdcli.declare import declared
    from sdcli.generation.settings import Settings

    ranged = {d.name for d in declared(Settings) if d.opt.range is not None}
    assert ranged <= set(_numeric_settings()) and {"guidance", "seeds", "loras", "outpaint"} <= ranged
