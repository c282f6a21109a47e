"""Prompt editing and alternation: what the encoder reads at each step."""

from __future__ import annotations

import pytest

from sdcli.generation.prompt_editing import every_word, is_edited, iteration_steps, steps_text, text_at


@pytest.mark.parametrize("prompt, expected", [
    ("a [red:blue:2] circle", ["a red circle", "a red circle", "a blue circle", "a blue circle"]),
    ("a [red:blue:0.25] circle", ["a red circle", "a blue circle", "a blue circle", "a blue circle"]),
    ("a [red:blue:0] circle", ["a blue circle"] * 4),  # switched before the first step
    ("a [red:blue:1.0] circle", ["a red circle"] * 4),  # a fraction of 1 is every step
    ("a [red:blue:9] circle", ["a red circle"] * 4),  # past the last step
    ("a [ red: blue : 3 ] circle", ["a  red circle"] * 3 + ["a  blue  circle"]),
    ("a [red:0.5] circle", ["a  circle", "a  circle", "a red circle", "a red circle"]),  # [to:when]
    ("a [red::0.5] circle", ["a red circle", "a red circle", "a  circle", "a  circle"]),  # [from::when]
    ("a [red|blue|green] circle", ["a red circle", "a blue circle", "a green circle", "a red circle"]),
    ("[a [b|c]:d:3]", ["a b", "a c", "a b", "d"]),  # nested
    ("a [(red:1.2):[blue]:1] x", ["a (red:1.2) x", "a [blue] x", "a [blue] x", "a [blue] x"]),  # weights inside
    ("(a [b|c]:1.3)", ["(a b:1.3)", "(a c:1.3)", "(a b:1.3)", "(a c:1.3)"]),  # inside a weight
])
def test_each_step_reads_the_words_of_that_step(prompt, expected):
    assert is_edited(prompt)
    assert steps_text(prompt, 4) == expected
    assert text_at(prompt, 9, 4) == expected[-1]  # past the end: the last step's text


@pytest.mark.parametrize("prompt", [
    "a [small] cat",  # de-emphasis
    "a (red:1.3) circle, ratio 16:9",  # colons outside square brackets
    "[(red:1.3)]",  # a weight's colon inside a square bracket
    "[a:b:c:1]",  # too many parts: text
    "[red:blue:x]",  # no number: text
    "open [red:blue:1",  # never closed
    r"\[red:blue:1\]",  # escaped
    "[a|b",  # never closed
])
def test_everything_else_is_left_to_the_weight_parser_as_written(prompt):
    assert not is_edited(prompt)
    assert steps_text(prompt, 3) == [prompt] * 3


def test_every_word_names_all_branches():
    assert every_word("a [red:blue:2] [star|(circle:1.2)]").split() == ["a", "red", "blue", "star", "(circle:1.2)"]


def test_word_checks_see_every_branch_without_the_syntax():
    from sdcli.generation.prompts import visible_text

    assert visible_text("a [red:(blue:1.2):0.5] [circle|star]", "a1111") == "a red blue circle star"
    assert visible_text("a [red:blue:0.5]", "plain") == "a [red:blue:0.5]"


@pytest.mark.parametrize("sampler, timesteps, order, expected", [
    ("ddim", [999, 666, 333], 1, [1, 2, 3]),
    ("plms", [501, 1, 1], 1, [1, 2, 2]),  # its warm-up evaluates one timestep twice
    ("heun", [999.0, 500.0, 500.0, 1.0, 1.0], 2, [1, 2, 2, 3, 3]),
    ("dpm2", [999.0, 750.0, 500.0, 250.0, 1.0], 2, [1, 1, 2, 2, 3]),  # a midpoint between steps
])
def test_iterations_of_a_sampler_count_as_its_steps(sampler, timesteps, order, expected):
    assert iteration_steps(timesteps, order) == (expected, 3 if sampler != "plms" else 2)


@pytest.mark.parametrize("prompt", ["[red:blue:nan]", "[red:inf]", "[red::-2]", "[red:blue:1e3]",
                                    "[red:blue:" + "9" * 400 + "]", "[" * 3000 + "a" + "]" * 3000])
def test_a_switch_step_no_step_can_be_and_deep_nesting_are_refused(prompt):
    from sdcli.errors import UsageError

    with pytest.raises(UsageError, match="switch step|nested 3000 deep"):
        is_edited(prompt)
