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
