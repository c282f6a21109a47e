"""Prompts as AUTOMATIC1111 reads them: weights, BREAK, prompts past 75 tokens and clip skip.

`(red)` is red ×1.1, `[red]` ÷1.1, `(red:1.3)` ×1.3; brackets nest and multiply;
`\\(` and `\\[` are literal brackets; `BREAK` starts a new chunk. The text is split
into 75-token chunks, each framed by BOS/EOS to the CLIP's 77 and encoded on its
own; the chunks' embeddings are concatenated, so nothing past token 75 is lost.
Each token's embedding is multiplied by its weight and the chunk rescaled to its
old mean (AUTOMATIC1111's "Original" emphasis) where it has one (`emphasis`).
Prompt editing (`[red:blue:0.5]`, `[red|blue]`) is resolved first, by
`sdcli.generation.prompt_editing`, into one such text per step.

1. Parsing: small pure functions of the text (`parse_weights`, `chunk_tokens`, `frame`).
2. Checks that need no weights (`check_prompt_settings`).
3. `TextConditioning`: given the pipeline and the settings, the pipeline's call
   arguments for a batch of prompts: `prompt_embeds` and the negative ones (and
   SDXL's pooled embeddings), or the plain text under `--prompt-syntax plain`.

Only the standard library is imported at module level, so `--help` stays instant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterable, Iterator, Optional

from sdcli import defaults
from sdcli.errors import UsageError
from sdcli.families.base import TWO_CLIPS
from sdcli.generation.prompt_editing import (
    check_nesting, every_word, excerpt, is_edited, iteration_steps, number_like, parse, steps_text, text_at,
)


class PromptSyntax(str, Enum):
    a1111 = "a1111"  # weights, BREAK, long prompts (this module)
    plain = "plain"  # the text as it is, encoded by diffusers (cut at 77 tokens)


ROUND, SQUARE = 1.1, 1 / 1.1

# One token of the syntax per match; the order matters (escapes before brackets, a weight before ':').
_ATTENTION = re.compile(r"""
    \\[()\[\]\\]                          # \( \) \[ \] \\ : the character itself
  | \\                                    # a lone backslash (dropped)
  | [(\[]                                 # opening bracket
  | :\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)   # ':1.3)': closes a round bracket with that weight
  | [)\]]                                 # closing bracket
  | [^\\()\[\]:]+                         # text
  | :                                     # a colon that is not a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

# A weight past this is no emphasis but a broken prompt (AUTOMATIC1111 takes any number; a weight of 1e300
# overflows the embeddings to inf). Nested brackets multiply, and the product is held to the same bound.
WEIGHT_LIMIT = 100.0

# A parsed prompt: (text, weight) pieces, with None where BREAK starts a new chunk.
Piece = Optional[tuple[str, float]]


@dataclass(frozen=True)
class Parsed:
    pieces: list[Piece]
    unbalanced: bool  # an opening bracket never closed (it lasts to the end) or a stray closing one (kept as text)

    @property
    def text(self) -> str:
        """The words without the syntax (BREAK as a space)."""
        return " ".join(" ".join(p[0] if p else "" for p in self.pieces).split())


# 1. Parsing -------------------------------------------------------------------------------------


def parse_weights(text: str) -> Parsed:
    """AUTOMATIC1111's attention syntax: (text) ×1.1, [text] ÷1.1, (text:w), nesting, escapes and BREAK.

    Brackets left open are closed at the end of the prompt and a closing bracket with
    nothing to close is text, as AUTOMATIC1111 does; `unbalanced` says either happened.
    Neighbouring pieces of equal weight are merged, so `a (red:1) b` tokenizes as `a red b`.
    """
    pieces: list[list[Any] | None] = []
    round_open: list[tuple[int, int]] = []  # (first piece, where in the text) of each bracket still open
    square_open: list[int] = []
    stray = False
    check_nesting(text)

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece is not None:
                piece[1] *= factor

    def close_round(factor: float, end: int) -> None:
        start, at = round_open.pop()
        if not -WEIGHT_LIMIT <= factor <= WEIGHT_LIMIT:
            raise UsageError(f"the weight in {excerpt(text[at:end])} is outside -{WEIGHT_LIMIT:g} to "
                             f"{WEIGHT_LIMIT:g}")
        multiply(start, factor)

    tokens = list(_ATTENTION.finditer(text))
    for i, m in enumerate(tokens):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])  # a lone backslash vanishes, as in AUTOMATIC1111
        elif token == "(":
            round_open.append((len(pieces), m.start()))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            close_round(float(weight), m.end())
        elif token == ")" and round_open:
            multiply(round_open.pop()[0], ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            if (token == ":" and round_open and i + 2 < len(tokens) and tokens[i + 2].group(0) == ")"
                    and number_like(tokens[i + 1].group(0))):  # '(red:nan)', '(red:1e9)': a weight mistyped
                raise UsageError(f"the weight in {excerpt(text[round_open[-1][1]:tokens[i + 2].end()])} must be "
                                 f"a plain number from -{WEIGHT_LIMIT:g} to {WEIGHT_LIMIT:g}, such as 1.3")
            stray = stray or token in (")", "]") or weight is not None
            for j, part in enumerate(_BREAK.split(token)):
                if j:
                    pieces.append(None)
                pieces.append([part, 1.0])
    for start, _at in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    for piece in pieces:
        if piece is not None and piece[0].strip() and not abs(piece[1]) <= WEIGHT_LIMIT:
            raise UsageError(f"the brackets around {excerpt(piece[0])} multiply its weight to {piece[1]:.4g}, "
                             f"outside -{WEIGHT_LIMIT:g} to {WEIGHT_LIMIT:g}")
    merged: list[Piece] = []
    for piece in pieces or [["", 1.0]]:
        last = merged[-1] if merged else None
        if piece is not None and last is not None and last[1] == piece[1]:
            merged[-1] = (last[0] + piece[0], last[1])
        else:
            merged.append(None if piece is None else (piece[0], piece[1]))
    return Parsed(merged, unbalanced=bool(round_open or square_open or stray))


def chunk_tokens(pieces: Iterable[tuple[list[list[int]], float] | None], size: int = 75,
                 ) -> list[tuple[list[int], list[float]]]:
    """Token ids and weights in chunks of at most ``size``.

    Each piece is a list of units (one token, or all the vectors of one embedding, which
    never straddle two chunks) and its weight; None closes the chunk (BREAK). A prompt
    gives at least one chunk, possibly empty.
    """
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    for piece in pieces:
        if piece is None:
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        units, weight = piece
        for unit in units:
            if ids and len(ids) + len(unit) > size:
                chunks.append((ids, weights))
                ids, weights = [], []
            ids += unit
            weights += [weight] * len(unit)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def frame(ids: list[int], weights: list[float], bos: int, eos: int, pad: int, size: int = 75,
          ) -> tuple[list[int], list[float]]:
    """One chunk as the text encoder reads it: BOS, the ids, EOS, padding to ``size`` + 2 (what the
    tokenizer gives diffusers for the same text); the special tokens weigh 1."""
    rest = size - len(ids)
    return [bos, *ids, eos] + [pad] * rest, [1.0, *weights, 1.0] + [1.0] * rest


def split_runs(items: list[Any], key: Callable[[Any], Any]) -> list[list[Any]]:
    """Consecutive items with the same key, in order."""
    runs: list[list[Any]] = []
    for item in items:
        if runs and key(runs[-1][0]) == key(item):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


# 2. Checks that need no weights ------------------------------------------------------------------


def check_prompt_settings(s: Any) -> None:
    """--clip-skip, --prompt-syntax and --embedding, before anything loads."""
    from sdcli.generation.embeddings import check_embeddings

    if s.clip_skip < 1:
        raise UsageError(f"--clip-skip must be at least 1 (1 is the last layer), got {s.clip_skip}", setting="clip_skip")
    if s.clip_skip != 1 and s.prompt_syntax == PromptSyntax.plain.value:
        raise UsageError("--clip-skip needs --prompt-syntax a1111 (diffusers' own clip_skip does not work "
                         "with this transformers version)", setting="clip_skip")
    check_embeddings(s.embeddings, s.allow_pickle)
    if s.prompt_syntax == PromptSyntax.a1111.value:
        for prompt in s.prompts:
            check_prompt_numbers(prompt, "the prompt", "prompts")
        check_prompt_numbers(s.negative_prompt or "", "--negative-prompt", "negative_prompt")


def check_prompt_numbers(prompt: str, what: str, setting: str | None = None) -> None:
    """Nesting, weights and switch steps a prompt can be read with, before anything loads: a weight of nan, inf or
    1e300 would reach the model as NaN, and 3000 nested brackets would exhaust the parser's recursion."""
    try:
        check_nesting(prompt)
        parse(prompt)
        parse_weights(prompt)
        parse_weights(every_word(prompt))  # weights as the edited texts show them (an edit's brackets gone)
    except UsageError as exc:
        raise UsageError(f"{what}: {exc}", setting=setting) from None


def prompt_warnings(prompt: str, syntax: str) -> list[str]:
    if syntax == PromptSyntax.a1111.value and parse_weights(prompt).unbalanced:
        return [f"warning: unbalanced brackets in {prompt!r}: read as AUTOMATIC1111 does (an open bracket lasts "
                "to the end, a stray closing one is text); escape literal ones as \\( \\) \\[ \\]"]
    return []


def check_prompt_editing(prompts: list[str], syntax: str, class_name: Optional[str]) -> None:
    """Refuse prompt editing on a pipeline whose prompts diffusers encodes (its family has no ``a1111`` encoder:
    SD3, Flux), before it loads."""
    from sdcli.families import claimed_by

    if not (syntax == PromptSyntax.a1111.value and class_name and any(map(is_edited, prompts))):
        return
    family = claimed_by(class_name)
    if family is None or family.a1111 is None:
        refuse_prompt_editing(class_name)


def refuse_prompt_editing(class_name: str) -> None:
    raise UsageError(f"prompt editing ([from:to:when], [a|b]) needs a Stable Diffusion 1.x, 2.x or XL model, whose "
                     f"prompts sdcli encodes itself; {class_name} reads the text as it is (use --prompt-syntax plain "
                     "to pass the brackets as text)", setting="prompts")


def visible_text(prompt: str, syntax: str) -> str:
    """The prompt's words without the syntax (every word it shows at any step), for checks that look at words."""
    return parse_weights(every_word(prompt)).text if syntax == PromptSyntax.a1111.value else prompt


# 3. Encoding ------------------------------------------------------------------------------------


def reads_whole(pipe: Any, syntax: str) -> bool:
    """Whether prompts reach this pipeline in chunks (nothing cut), as opposed to diffusers' own encoding."""
    return syntax == PromptSyntax.a1111.value and _layout(pipe) is not None


def prepare_text_encoders(pipe: Any, s: Any) -> None:
    """What the text encoders need before the first prompt: the embeddings loaded, clip skip checked."""
    from sdcli.generation.embeddings import load_embeddings

    if s.embeddings:
        load_embeddings(pipe, s.embeddings, s.allow_pickle)
    check_clip_skip(pipe, s.clip_skip)


def check_clip_skip(pipe: Any, clip_skip: int) -> None:
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    layers = [e.config.num_hidden_layers for e in encoders if e is not None and hasattr(e.config, "num_hidden_layers")]
    if layers and clip_skip > min(layers):
        raise UsageError(f"--clip-skip {clip_skip}: this model's text encoder has only {min(layers)} layers")


def _layout(pipe: Any) -> str | None:
    """Which of this module's encoders reads the pipeline's prompts (its family's ``a1111``: ONE_CLIP or
    TWO_CLIPS); None where diffusers encodes them (SD3, Flux)."""
    from sdcli.families import pipe_family

    a1111 = pipe_family(pipe).a1111
    return a1111(pipe) if a1111 else None


class _Encoder:
    """One tokenizer and CLIP text encoder: a prompt's chunks, and their hidden states at the chosen layer."""

    def __init__(self, tokenizer: Any, model: Any, layer: Callable[[Any], Any], pooled: bool):
        self.tokenizer, self.model, self.layer, self.pooled = tokenizer, model, layer, pooled
        limit = min(tokenizer.model_max_length or 77, model.config.max_position_embeddings)
        self.size = limit - 2
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        # Multi-vector embeddings are the tokens T, T_1, T_2, ... (diffusers' naming): T stands for all.
        added = tokenizer.get_added_vocab()
        self.expand: dict[int, list[int]] = {}
        for name, first in added.items():
            rest, i = [], 1
            while f"{name}_{i}" in added:
                rest.append(added[f"{name}_{i}"])
                i += 1
            if rest:
                self.expand[first] = [first, *rest]

    def chunks(self, parsed: Parsed) -> list[tuple[list[int], list[float]]]:
        texts = [p[0] for p in parsed.pieces if p is not None]
        ids = iter(self.tokenizer(texts, add_special_tokens=False, truncation=False).input_ids if texts else [])
        pieces = [None if p is None else ([self.expand.get(t, [t]) for t in next(ids)], p[1]) for p in parsed.pieces]
        return [frame(i, w, self.bos, self.eos, self.pad, self.size) for i, w in chunk_tokens(pieces, self.size)]

    def encode(self, chunks: list[tuple[list[int], list[float]]], device: Any):
        """(n chunks, tokens, width) hidden states, weighted; and the pooled embedding of the first chunk (SDXL)."""
        import torch

        ids = torch.tensor([c[0] for c in chunks], device=device)
        out = self.model(ids, output_hidden_states=True)
        z = self.layer(out)
        pooled = None
        if self.pooled:
            # The EOS's final state, projected (CLIPTextModelWithProjection's text_embeds). Found by id rather than
            # by the largest id, which an embedding's added token would be.
            eos_at = (ids[:1] == self.eos).int().argmax(dim=-1)
            pooled = self.model.text_projection(out.last_hidden_state[:1][torch.arange(1), eos_at])
        weights = torch.tensor([c[1] for c in chunks], device=z.device)
        if bool((weights != 1).any()):
            z = emphasis(z, weights)
        return z, pooled


# A chunk's mean is a level worth restoring only when it stands out of rounding noise: at least this share of
# the values' mean magnitude (a LayerNorm with zero bias gives means of 1e-8 of it in float32, 3e-5 in bfloat16).
MEAN_FLOOR = 1e-3


def emphasis(z: Any, weights: Any) -> Any:
    """Multiply each token's embedding by its weight, then rescale each chunk to its old mean
    (AUTOMATIC1111's "Original" emphasis), where that rescale is defined.

    The rescale divides by the weighted chunk's mean, which is ~0 on a text encoder whose final
    LayerNorm has zero bias (the bundled model): there the ratio of two rounding errors would be
    NaN, huge or negative (a negated conditioning). So a chunk is rescaled only when both means
    exceed `MEAN_FLOOR` of the values' mean magnitude and have the same sign, and by no more than
    its strongest weight changes a level (×1/W to ×W, W = the largest of |w| and 1/|w|): when the
    tokens share a mean, the ratio lies inside that range and AUTOMATIC1111's result is kept
    exactly. Otherwise the weighted embeddings stand as they are.
    """
    import torch

    dims = (1, 2)
    z32, w = z.float(), weights.float()
    weighted = z32 * w[:, :, None]
    before, after = z32.mean(dim=dims, keepdim=True), weighted.mean(dim=dims, keepdim=True)
    level = torch.minimum(before.abs() / z32.abs().mean(dim=dims, keepdim=True),
                          after.abs() / weighted.abs().mean(dim=dims, keepdim=True))
    ratio = before / after
    usable = (level >= MEAN_FLOOR) & (ratio > 0) & torch.isfinite(ratio)
    size = w.abs().masked_fill(w == 0, 1)
    bound = torch.maximum(size, 1 / size).amax(dim=1)[:, None, None]
    ratio = torch.where(usable, ratio, torch.ones_like(ratio)).clamp(min=1 / bound, max=bound)
    return (weighted * ratio).to(z.dtype)


def _final_norm(model: Any) -> Any:
    return getattr(model, "text_model", model).final_layer_norm


def _layer_picker(layout: str, model: Any, clip_skip: int) -> Callable[[Any], Any]:
    """Which hidden state the UNet sees, with clip skip in AUTOMATIC1111's numbering (1 = last layer).

    SD 1.x/2.x: the last layer after the final layer norm; clip skip N takes the N-th from the end
    and applies the same norm (as AUTOMATIC1111 and diffusers' clip_skip do). SDXL always reads the
    penultimate layer, un-normed; clip skip N goes N − 1 further back (diffusers' clip_skip for SDXL).
    """
    if layout == TWO_CLIPS:
        return lambda out: out.hidden_states[-(clip_skip + 1)]
    if clip_skip == 1:
        return lambda out: out.last_hidden_state
    norm = _final_norm(model)
    return lambda out: norm(out.hidden_states[-clip_skip])


@dataclass
class Encoded:
    embeds: Any  # (1, chunks × 77, width of all encoders)
    pooled: Any  # (1, projection) for SDXL, else None
    chunks: int


class TextConditioning:
    """What a batch of prompts gives the pipeline: prompt_embeds and negative ones (a1111), or the text (plain).

    Under a1111 syntax a prompt may change between steps (`sdcli.generation.prompt_editing`): the batch starts with its
    first step's embeddings and `step_outputs`, called after each step, hands the pipeline the next one's.
    ``passes`` are the steps of each denoising pass (hires fix has two); a pass's fractions count its own steps.
    """

    def __init__(self, s: Any, pipe: Any, passes: Optional[list[int]] = None):
        self.pipe, self.negative = pipe, s.negative_prompt
        self.a1111 = s.prompt_syntax == PromptSyntax.a1111.value
        self.layout = _layout(pipe) if self.a1111 else None
        self.passes = passes or [s.steps or defaults.STEPS]  # unplanned settings: sdcli's default steps
        self._cache: dict[str, Encoded] = {}
        if self.layout is None:
            return
        pairs = [(pipe.tokenizer, pipe.text_encoder, False)]
        if self.layout == TWO_CLIPS:
            pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None), False),
                     (pipe.tokenizer_2, pipe.text_encoder_2, True)]
        pairs = [p for p in pairs if p[1] is not None]
        check_clip_skip(pipe, s.clip_skip)
        self.encoders = [_Encoder(tok, model, _layer_picker(self.layout, model, s.clip_skip), pooled)
                         for tok, model, pooled in pairs]
        # SDXL leaves the unconditional branch at zero for an empty negative prompt (force_zeros_for_empty_prompt).
        self.zero_negative = (self.layout == TWO_CLIPS and not s.negative_prompt
                              and bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)))

    # Batches ---------------------------------------------------------------------------------

    def length(self, prompt: str, guidance: float) -> int:
        """Chunks a prompt's conditioning takes alone: its own, or the negative prompt's if longer (at whichever
        step is longest, so that the embeddings keep one shape while the words change)."""
        n = max(self.encode(v).chunks for v in self.variants(prompt))
        if guidance != 1 and not self.zero_negative:
            n = max(n, *(self.encode(v).chunks for v in self.variants(self.negative)))
        return n

    # Prompts that change between steps -------------------------------------------------------

    def edited(self, prompts: list[str]) -> bool:
        """Whether any of the batch's texts (or the negative prompt) changes between steps."""
        return self.a1111 and any(is_edited(p) for p in [*prompts, self.negative])

    def variants(self, prompt: str) -> set[str]:
        """Every text ``prompt`` shows at some step of some pass."""
        if not (self.a1111 and is_edited(prompt)):
            return {prompt}
        return {text for steps in self.passes for text in steps_text(prompt, steps)}

    def step_outputs(self, pipe: Any, prompts: list[str], guidance: float, i: int) -> dict[str, Any]:
        """After loop iteration ``i`` of ``pipe``, the embeddings of the next iteration's step, as the tensors the
        pipeline holds (negative and positive stacked when it guides)."""
        import torch

        timesteps = pipe.scheduler.timesteps[-pipe.num_timesteps:].tolist()  # img2img runs the schedule's end
        numbers, steps = iteration_steps(timesteps, getattr(pipe.scheduler, "order", 1))
        if i + 1 >= len(numbers):
            return {}
        kwargs = self.call_kwargs(prompts, guidance, step=numbers[i + 1], steps=steps)
        guided = pipe.do_classifier_free_guidance
        stack = (lambda neg, pos: torch.cat([neg, pos])) if guided else (lambda neg, pos: pos)
        out = {"prompt_embeds": stack(kwargs.get("negative_prompt_embeds"), kwargs["prompt_embeds"])}
        if self.layout == TWO_CLIPS:
            out["add_text_embeds"] = stack(kwargs.get("negative_pooled_prompt_embeds"), kwargs["pooled_prompt_embeds"])
        return out

    def regroup(self, batches: Iterable[list[Any]]) -> Iterator[list[Any]]:
        """Split batches whose prompts take different numbers of chunks: padding one prompt to another's
        length would change its image, and an image must not depend on the company it was made in."""
        for batch in batches:
            if self.layout is None:
                yield batch
            else:
                yield from split_runs(batch, lambda job: self.length(job.prompt, job.values["guidance"]))

    def call_kwargs(self, prompts: list[str], guidance: float, step: int = 1, steps: Optional[int] = None,
                    ) -> dict[str, Any]:
        """The pipeline's text arguments for one batch, at ``step`` (1-based) of ``steps`` (the first pass's)."""
        if self.layout is None:
            if self.edited(prompts):
                refuse_prompt_editing(type(self.pipe).__name__)
            return {"prompt": prompts, "negative_prompt": [self.negative] * len(prompts) if self.negative else None}
        import torch

        steps = steps or self.passes[0]
        chunks = max(self.length(p, guidance) for p in prompts)
        conds = [self.encode(text_at(p, step, steps)) for p in prompts]
        kwargs: dict[str, Any] = {"prompt_embeds": torch.cat([self.padded(c, chunks) for c in conds])}
        if self.layout == TWO_CLIPS:
            kwargs["pooled_prompt_embeds"] = torch.cat([c.pooled for c in conds])
        if guidance != 1:  # the unconditional branch runs (sdcli.generation.guidance): it needs its embeddings
            if self.zero_negative:
                kwargs["negative_prompt_embeds"] = torch.zeros_like(kwargs["prompt_embeds"])
                kwargs["negative_pooled_prompt_embeds"] = torch.zeros_like(kwargs["pooled_prompt_embeds"])
            else:
                neg = self.encode(text_at(self.negative, step, steps))
                kwargs["negative_prompt_embeds"] = self.padded(neg, chunks).repeat(len(prompts), 1, 1)
                if self.layout == TWO_CLIPS:
                    kwargs["negative_pooled_prompt_embeds"] = neg.pooled.repeat(len(prompts), 1)
        return kwargs

    # Encoding --------------------------------------------------------------------------------

    def encode(self, prompt: str) -> Encoded:
        """One prompt's embeddings (all chunks, every encoder side by side), cached: a run repeats its prompts."""
        if prompt not in self._cache:
            self._cache[prompt] = self._encode(parse_weights(prompt))
        return self._cache[prompt]

    def _encode(self, parsed: Parsed) -> Encoded:
        import torch

        per_encoder = [e.chunks(parsed) for e in self.encoders]
        n = max(len(c) for c in per_encoder)
        device = self.pipe._execution_device
        parts, pooled = [], None
        with torch.no_grad():
            for encoder, chunks in zip(self.encoders, per_encoder):
                # Both of SDXL's tokenizers split alike; should they not, the shorter gets empty chunks.
                chunks = chunks + [encoder.chunks(parse_weights(""))[0]] * (n - len(chunks))
                z, p = encoder.encode(chunks, device)
                parts.append(z.reshape(1, -1, z.shape[-1]))
                pooled = p if p is not None else pooled
        return Encoded(torch.cat(parts, dim=-1), pooled, n)

    def padded(self, encoded: Encoded, chunks: int) -> Any:
        """Embeddings padded to ``chunks`` chunks with the empty prompt's (as AUTOMATIC1111 pads a shorter
        prompt or negative prompt)."""
        import torch

        missing = chunks - encoded.chunks
        if missing <= 0:
            return encoded.embeds
        empty = self.encode("").embeds
        return torch.cat([encoded.embeds, *[empty] * missing], dim=1)
