"""AUTOMATIC1111's prompt editing and alternation: a prompt whose words change while it is denoised.

    [from:to:when]   `from` for the first `when` steps, then `to`
    [to:when]        nothing, then `to` after step `when`
    [from::when]     `from`, dropped after step `when`
    [a|b|c]          a at step 1, b at step 2, c at step 3, a at step 4, ...

`when` is a step number (`10`) or, written with a decimal point, a fraction of the pass's steps (`0.5` of 30
steps is step 15; `1.0` is all of them). Parts nest and hold the weight syntax (`[(red:1.2):blue:0.4]`); any
other square bracket is `[de-emphasis]`, left to `sdcli.generation.prompts.parse_weights`. A switch is useful
because the noisy steps settle composition and colour and the late ones detail (the design notes' reverse
process): `a [dog:cat:0.3]` composes a dog and finishes a cat.

`steps_text(prompt, steps)` resolves a prompt at each step to plain weight syntax, which is all the encoder
sees; `sdcli.generation.prompts.TextConditioning` encodes each text once and swaps the embeddings between steps.
Only the standard library is imported; `sdcli.generation.prompts` takes the bracket helpers both syntaxes
share (nesting, numbers, excerpts) from here, so the arrow runs one way.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Union

from sdcli.errors import UsageError

_NUMBER = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*")
# Brackets nested deeper than this are refused: no prompt needs them, and the editing parser recurses.
MAX_NESTING = 100


def check_nesting(text: str) -> None:
    """Refuse brackets nested deeper than `MAX_NESTING` (escaped ones are text), scanning without recursion."""
    depth = deepest = 0
    escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]" and depth:
            depth -= 1
    if deepest > MAX_NESTING:
        raise UsageError(f"brackets nested {deepest} deep; sdcli reads at most {MAX_NESTING}")


def number_like(text: str) -> bool:
    """Whether Python reads ``text`` as a number: 'nan', 'inf', '1e300' and '-2' as much as '1.3'."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def excerpt(piece: str, limit: int = 60) -> str:
    """A piece of a prompt, quoted, cut to fit one line."""
    return repr(piece if len(piece) <= limit else piece[: limit - 3] + "...")


@dataclass(frozen=True)
class Edit:
    before: tuple["Node", ...]
    after: tuple["Node", ...]
    when: str  # as written: "10" is a step, "0.5" a fraction of the steps

    def last_step_before(self, steps: int) -> int:
        """The last step (1-based) that shows ``before``: 0 shows ``after`` from the first step."""
        value = float(self.when)
        return min(steps, int(value * steps) if "." in self.when else int(value))


@dataclass(frozen=True)
class Alternate:
    options: tuple[tuple["Node", ...], ...]


@dataclass(frozen=True)
class Raw:
    """A square bracket that is neither: emphasis (`[small]`), or one left open; kept as written."""
    parts: tuple[tuple["Node", ...], ...]
    separators: tuple[str, ...]
    closed: bool


Node = Union[str, Edit, Alternate, Raw]


def _group(parts: list[tuple[Node, ...]], separators: list[str], closed: bool, written: str) -> Node:
    """What a square bracket's top-level parts make: an alternation, an edit, or a bracket kept as text.

    ``written`` is the bracket as typed, for the message that refuses a switch step no step can be
    ('nan', 'inf', '1e400', '-1'): read as text it would pass silently as a de-emphasised word."""
    if closed and separators and set(separators) == {"|"}:
        return Alternate(tuple(parts))
    if closed and set(separators) == {":"} and len(parts) in (2, 3):
        *texts, when = parts
        if len(when) == 1 and isinstance(when[0], str) and number_like(when[0]):
            if not (_NUMBER.fullmatch(when[0]) and math.isfinite(float(when[0]))):
                raise UsageError(f"the switch step in {excerpt(written)} must be a step number (10) or a fraction "
                                 "of the steps (0.5)")
            before, after = ((), texts[0]) if len(texts) == 1 else texts
            return Edit(before, after, when[0].strip())
    return Raw(tuple(parts), tuple(separators), closed)


def _sequence(text: str, i: int, in_square: bool) -> tuple[list[tuple[Node, ...]], list[str], int, bool]:
    """Nodes from ``text[i:]`` up to the closing `]` (inside a square bracket, split at its top-level `:` and
    `|`; a colon inside round brackets is a weight's) or the end: (parts, separators, next index, closed)."""
    parts: list[list[Node]] = [[]]
    separators: list[str] = []
    buffer: list[str] = []
    depth = 0

    def flush() -> None:
        if buffer:
            parts[-1].append("".join(buffer))
            buffer.clear()

    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            buffer.append(text[i : i + 2])  # an escape stays as written: the weight parser reads it
            i += 2
            continue
        if c == "[":
            flush()
            start = i
            inner, seps, i, closed = _sequence(text, i + 1, in_square=True)
            parts[-1].append(_group(inner, seps, closed, text[start:i]))
            continue
        if in_square and c == "]":
            flush()
            return [tuple(p) for p in parts], separators, i + 1, True
        if in_square and depth == 0 and c in ":|":
            flush()
            separators.append(c)
            parts.append([])
            i += 1
            continue
        depth += {"(": 1, ")": -1 if depth else 0}.get(c, 0)
        buffer.append(c)
        i += 1
    flush()
    return [tuple(p) for p in parts], separators, i, False


@lru_cache(maxsize=256)
def parse(prompt: str) -> tuple[Node, ...]:
    check_nesting(prompt)  # the parser recurses once per square bracket
    parts, _, _, _ = _sequence(prompt, 0, in_square=False)
    return parts[0]


def _render(nodes: tuple[Node, ...], step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Edit):
            out.append(_render(node.before if step <= node.last_step_before(steps) else node.after, step, steps))
        elif isinstance(node, Alternate):
            out.append(_render(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            inner = [_render(p, step, steps) for p in node.parts]
            text = inner[0] + "".join(sep + part for sep, part in zip(node.separators, inner[1:]))
            out.append("[" + text + ("]" if node.closed else ""))
    return "".join(out)


def _changes(nodes: tuple[Node, ...]) -> bool:
    return any(isinstance(n, (Edit, Alternate)) or (isinstance(n, Raw) and any(map(_changes, n.parts)))
               for n in nodes)


def is_edited(prompt: str) -> bool:
    """Whether the prompt's text changes between steps."""
    return _changes(parse(prompt))


def steps_text(prompt: str, steps: int) -> list[str]:
    """The prompt as the encoder reads it at each of ``steps`` steps (weight syntax only)."""
    return [text_at(prompt, step, steps) for step in range(1, steps + 1)]


def text_at(prompt: str, step: int, steps: int) -> str:
    """The prompt at ``step`` (1-based) of ``steps``; past the last step it stays at the last step's text."""
    return _render(parse(prompt), min(step, steps), steps)


def iteration_steps(timesteps: list[float], order: int = 1) -> tuple[list[int], int]:
    """The step (1-based) of each iteration of a sampler's loop over ``timesteps``, and the number of steps.

    A loop can run more iterations than steps: Heun evaluates every timestep but the first twice, PLMS one of
    them twice, DPM2 adds a midpoint per step (order 2). Where the distinct timesteps are the steps, they
    number the iterations; otherwise (DPM2) the iterations map onto the steps in proportion.
    """
    n = len(timesteps)
    new = [True] + [a != b for a, b in zip(timesteps[1:], timesteps[:-1])]
    distinct = sum(new)
    steps = min(distinct, -(-n // order))
    if distinct == steps:
        return list(accumulate(map(int, new))), steps
    return [j * steps // n + 1 for j in range(n)], steps


def every_word(prompt: str) -> str:
    """All the words the prompt can show at any step, for checks that look at words (unknown ones)."""
    def words(nodes: tuple[Node, ...]) -> str:
        out = []
        for n in nodes:
            if isinstance(n, str):
                out.append(n)
            elif isinstance(n, Edit):
                out += [words(n.before), words(n.after)]
            elif isinstance(n, Alternate):
                out += [words(o) for o in n.options]
            else:
                out += [words(p) for p in n.parts]
        return " ".join(out)
    return words(parse(prompt))
