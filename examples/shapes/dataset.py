"""A procedural world of coloured shapes: 64x64 images with plain-English captions.

Every image holds one shape, described by its caption, e.g.
"a large red circle in the top left corner on a black background". The same
seed always gives the same images, so the dataset never needs to be shipped.

    python examples/shapes/dataset.py --out build/shapes/data --n 10000 --seed 0 --caption-noise 0.1

writes 00000.png ... and a metadata.jsonl (file_name, text) that Hugging Face
`imagefolder` and `sdcli finetune` read as image/caption pairs. With
--caption-noise, some captions name a wrong colour, shape, size or position (with
--noisy, the background too), as web captions do; with --partial, captions leave some of them
out, as people's prompts do ("a red circle"). The rows also hold the true attributes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

SIZE = 64
_SUPERSAMPLE = 4  # draw at 4x and downsample: antialiased edges without extra code

# Separable in RGB, but not all far apart: orange sits between red and yellow, pink between red, purple
# and white, so a model that only half-learned a colour word can land on a neighbour.
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 230),
    "purple": (140, 40, 190),
    "pink": (250, 130, 200),
    "white": (245, 245, 245),
}
BACKGROUNDS = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle", "star")
# Side of the box each shape fills, in pixels. Small is 16, not less: a star must keep its points in the
# 4x4 latent pixels it covers, or the autoencoder rounds it into a blob.
SIZES = {"small": 16, "large": 26}
# Anchor (x, y) of each position, a 3x3 grid 15 px apart; the shape's box is centred there (plus jitter).
# A large shape at an edge anchor just fits inside the image.
_GRID = {"top": 17, "left": 17, "bottom": 47, "right": 47}
POSITIONS = {
    "top left": (_GRID["left"], _GRID["top"]),
    "top": (32, _GRID["top"]),
    "top right": (_GRID["right"], _GRID["top"]),
    "left": (_GRID["left"], 32),
    "center": (32, 32),
    "right": (_GRID["right"], 32),
    "bottom left": (_GRID["left"], _GRID["bottom"]),
    "bottom": (32, _GRID["bottom"]),
    "bottom right": (_GRID["right"], _GRID["bottom"]),
}
ATTRIBUTES = ("color", "shape", "size", "position", "background")

# Small variations so images of one caption differ, and a model has variety to learn.
POSITION_JITTER = 3  # pixels
SIZE_JITTER = 0.08  # fraction of the box side
COLOR_JITTER = 12  # per channel, shape and background alike


def where(position: str) -> str:
    """A position's words: "in the top left corner", "at the top", "on the left", "in the center"."""
    if position == "center":
        return "in the center"
    if " " in position:
        return f"in the {position} corner"
    return f"at the {position}" if position in ("top", "bottom") else f"on the {position}"


def caption(attrs: dict[str, str]) -> str:
    """The plain-English caption of an attribute dict; an attribute it lacks is left out.

    The words keep one order whatever is named: "a large red circle in the top left corner on a black
    background", "a red circle", "a circle on a white background".
    """
    words = ["a", attrs.get("size"), attrs.get("color"), attrs["shape"],
             where(attrs["position"]) if "position" in attrs else None,
             f"on a {attrs['background']} background" if "background" in attrs else None]
    return " ".join(w for w in words if w)


def caption_words() -> list[str]:
    """Every word any caption can contain, in a stable order."""
    words: list[str] = []
    # Position words come from where(), so a new phrasing cannot be missing here.
    for text in ("a", *SIZES, *COLORS, *SHAPES, *map(where, POSITIONS), "on background", *BACKGROUNDS):
        for word in text.split():
            if word not in words:
                words.append(word)
    return words


def sample_attributes(rng: random.Random) -> dict[str, str]:
    """Draw one attribute combination; the shape never has the background's colour."""
    background = rng.choice(sorted(BACKGROUNDS))
    color = rng.choice([c for c in COLORS if c != background])
    return {
        "color": color,
        "shape": rng.choice(SHAPES),
        "size": rng.choice(sorted(SIZES)),
        "position": rng.choice(list(POSITIONS)),
        "background": background,
    }


def _jitter(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in rgb)


def _outline(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape whose box of ``side`` is centred at (cx, cy); None for the circle."""
    r = side / 2
    if shape == "square":
        h = 0.9 * r  # a full-box square looks much larger than the circle in the same box
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":
        # Five points up; the inner radius of 0.45 keeps the points thick enough at 16 px.
        outer, inner = r, 0.45 * r
        cy += r * (1 - math.cos(math.pi / 5)) / 2  # centre the star's box, not its circle
        return [
            (cx + (outer if k % 2 == 0 else inner) * math.sin(k * math.pi / 5),
             cy - (outer if k % 2 == 0 else inner) * math.cos(k * math.pi / 5))
            for k in range(10)
        ]
    return None


def render(attrs: dict[str, str], rng: random.Random | None = None):
    """Draw the image of ``attrs``; ``rng`` adds the small jitters (none without it)."""
    from PIL import Image, ImageDraw

    jitter = rng is not None
    background = _jitter(rng, BACKGROUNDS[attrs["background"]]) if jitter else BACKGROUNDS[attrs["background"]]
    color = _jitter(rng, COLORS[attrs["color"]]) if jitter else COLORS[attrs["color"]]
    cx, cy = POSITIONS[attrs["position"]]
    side = SIZES[attrs["size"]]
    if jitter:
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        side *= 1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)

    s = _SUPERSAMPLE
    image = Image.new("RGB", (SIZE * s, SIZE * s), background)
    draw = ImageDraw.Draw(image)
    outline = _outline(attrs["shape"], cx * s, cy * s, side * s)
    if outline is None:
        r = side * s / 2
        draw.ellipse([cx * s - r, cy * s - r, cx * s + r, cy * s + r], fill=color)
    else:
        draw.polygon(outline, fill=color)
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


def true_caption(row: dict) -> str:
    """The caption of what a metadata.jsonl row's image shows: from its attributes, else its ``text``."""
    return caption(row) if all(attr in row for attr in ATTRIBUTES) else row["text"]


def make_sample(rng: random.Random) -> tuple:
    """One (PIL image, attribute dict) drawn from ``rng``; `_named_samples` decides what its caption names."""
    attrs = sample_attributes(rng)
    return render(attrs, rng), attrs


# What noisy_attributes may name wrong, in the order it draws them; the background only when asked: the shipped
# dataset names it right, and by default the noise stream is the one that built it.
VALUES = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}
NOISY = ("color", "shape", "size", "position")
# What partial_attributes may leave out; the shape is the caption's noun and always named.
OPTIONAL = ("size", "color", "position", "background")


def noisy_attributes(attrs: dict[str, str], rng: random.Random, rate: float,
                     which: tuple[str, ...] = NOISY) -> dict[str, str]:
    """``attrs`` with each attribute in ``which`` (default colour, shape, size and position) replaced by another
    value with probability ``rate``; a caption never names a colour equal to the background it names.

    Web captions are like this: mostly right, sometimes naming the wrong thing. A model that
    learns such data well reproduces the mistakes at guidance 1; guidance is what removes them.
    """
    out = dict(attrs)
    for attr in which:
        if rng.random() < rate:
            clash = {"color": out["background"], "background": out["color"]}.get(attr)
            out[attr] = rng.choice([v for v in VALUES[attr] if v != attrs[attr] and v != clash])
    return out


def partial_attributes(attrs: dict[str, str], rng: random.Random, rate: float) -> dict[str, str]:
    """``attrs`` with each of size, colour, position and background left out with probability ``rate``.

    People type "a red circle", not the full caption. A model that only ever saw full captions has never
    learned what a prompt leaves open; with some captions partial, it learns to fill in a varied value
    for what is not named, and to draw what is.
    """
    return {k: v for k, v in attrs.items() if k not in OPTIONAL or rng.random() >= rate}


def make_dataset(n: int, seed: int = 0, caption_noise: float = 0.0, partial: float = 0.0,
                 noisy: tuple[str, ...] = NOISY) -> list[tuple]:
    """``n`` samples, the same for the same seed on any machine.

    With ``caption_noise`` some captions name a wrong attribute (see noisy_attributes), with ``partial``
    some leave attributes out (see partial_attributes); the images, and the attribute dicts (the truth),
    are the same as without either.
    """
    return list(iter_dataset(n, seed, caption_noise, partial, noisy))


def iter_dataset(n: int, seed: int = 0, caption_noise: float = 0.0, partial: float = 0.0, noisy: tuple[str, ...] = NOISY):
    """make_dataset's samples one at a time, so writing a large dataset never holds it all."""
    for image, named, attrs in _named_samples(n, seed, caption_noise, partial, noisy):
        yield image, caption(named), attrs


def _named_samples(n: int, seed: int, caption_noise: float, partial: float, noisy: tuple[str, ...]):
    """(image, what its caption names, what is drawn) for each sample."""
    # random.Random is specified to give the same stream everywhere; numpy's legacy global state is not ours.
    # Noise and omissions get streams of their own, so neither changes the images or the other's draws.
    rng, noise_rng, partial_rng = random.Random(seed), random.Random(f"captions-{seed}"), random.Random(f"partial-{seed}")
    for _ in range(n):
        image, attrs = make_sample(rng)
        named = noisy_attributes(attrs, noise_rng, caption_noise, noisy) if caption_noise else attrs
        if partial:
            named = partial_attributes(named, partial_rng, partial)
        yield image, named, attrs


def write_dataset(out: str | Path, n: int, seed: int = 0, caption_noise: float = 0.0, partial: float = 0.0,
                  noisy: tuple[str, ...] = NOISY) -> Path:
    """Write ``n`` PNGs and metadata.jsonl (imagefolder layout) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(n - 1)))
    wrong = full = 0
    with open(out / "metadata.jsonl", "w") as meta:
        for i, (image, named, attrs) in enumerate(_named_samples(n, seed, caption_noise, partial, noisy)):
            name = f"{i:0{width}d}.png"
            image.save(out / name)
            wrong += any(named[k] != attrs[k] for k in named)
            full += len(named) == len(ATTRIBUTES)
            # The attributes are what is drawn (the truth, whatever the caption says); imagefolder ignores them,
            # the evaluator scores against them.
            meta.write(json.dumps({"file_name": name, "text": caption(named), **attrs}) + "\n")
    # How it was made, next to what was made.
    record = {"generator": "examples/shapes/dataset.py", "n": n, "seed": seed, "caption_noise": caption_noise,
              "noisy_attributes": list(noisy), "partial": partial, "captions_with_a_wrong_word": wrong,
              "full_captions": full}
    (out / "dataset.json").write_text(json.dumps(record) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to write the PNGs and metadata.jsonl into")
    parser.add_argument("--n", type=int, default=5000, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same dataset")
    parser.add_argument("--caption-noise", type=float, default=0.0,
                        help="chance that each attribute of --noisy is named wrong in a caption")
    parser.add_argument("--noisy", default=",".join(NOISY),
                        help=f"comma-separated attributes --caption-noise may name wrong (default {','.join(NOISY)}; "
                             f"of {','.join(VALUES)})")
    parser.add_argument("--partial", type=float, default=0.0,
                        help="chance that each of size, colour, position and background is left out of a caption")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    for flag, value in (("--caption-noise", args.caption_noise), ("--partial", args.partial)):
        if not 0 <= value < 1:
            parser.error(f"{flag} must be in [0, 1), got {value}")
    noisy = tuple(a.strip() for a in args.noisy.split(",") if a.strip())
    if not noisy or set(noisy) - set(VALUES):
        parser.error(f"--noisy takes attributes of {','.join(VALUES)}, got {args.noisy!r}")
    # Drawn in the grammar's order, whatever order they were given in, so a set of attributes is one stream.
    noisy = tuple(a for a in VALUES if a in noisy)
    out = write_dataset(args.out, args.n, args.seed, args.caption_noise, args.partial, noisy)
    print(f"wrote {args.n} images to {out}", file=sys.stderr)
    print(out / "metadata.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
