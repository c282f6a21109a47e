"""Measure generated shape images against their prompts, with classical image analysis.

For each image: the background is the median of its border, the shape is the
largest blob that differs from it, and from that blob we read the colour
(nearest named colour of its most saturated half), the position (nearest
anchor to its box centre), the size (nearest box side) and the shape (a tiny
linear classifier on the blob's 16x16 coverage map, trained on the generator's
own images, crisp and blurred: see shape_classifier.py). The attributes expected
come from the prompt's words, so prompts that leave one out are not scored on it.
Diversity is the mean pairwise pixel distance between images of one prompt.

    python examples/shapes/evaluate.py outputs/            # sdcli PNGs: prompt from the 'parameters' chunk
    python examples/shapes/evaluate.py build/shapes/data --json # a dataset folder: prompt from metadata.jsonl

prints one row per guidance scale found (a markdown table), or JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

try:  # imported as examples.shapes.evaluate or run as a script
    from . import dataset, shape_classifier
except ImportError:
    import dataset  # type: ignore[no-redef]
    import shape_classifier  # type: ignore[no-redef]

SCORED = ("color", "shape", "position", "size", "background")
# Area of each shape as a fraction of the square box dataset.py draws it in (see dataset._outline): a
# disc pi/4, a square 0.9^2, a triangle half, a star with inner radius 0.45 about a third.
BOX_FILL = {"circle": np.pi / 4, "square": 0.81, "triangle": 0.5, "star": 0.33}
# Below this RGB distance from the background nothing counts as shape: a blank image has no shape.
MIN_CONTRAST = 40.0


# -- prompts -------------------------------------------------------------------------------------------------

def parse_prompt(text: str) -> dict[str, str | None]:
    """The attributes a prompt asks for; None for those it does not mention.

    "a large red circle in the top left corner on a black background" ->
    {color: red, shape: circle, size: large, position: top left, background: black}
    """
    text = " ".join(re.findall(r"[a-z]+", text.lower()))
    found: dict[str, str | None] = dict.fromkeys(SCORED)
    m = re.search(rf"\b({'|'.join(dataset.BACKGROUNDS)}) background\b", text)
    if m:
        found["background"] = m.group(1)
        text = text[: m.start()] + text[m.end():]  # so the background's colour is not read as the shape's
    for attr, names in (("color", dataset.COLORS), ("shape", dataset.SHAPES), ("size", dataset.SIZES)):
        m = re.search(rf"\b({'|'.join(names)})\b", text)
        found[attr] = m.group(1) if m else None
    corner = re.search(r"\b(top|bottom)\s+(left|right)\b", text)
    edge = re.search(r"\b(top|bottom|left|right)\b", text)
    if corner:
        found["position"] = f"{corner.group(1)} {corner.group(2)}"
    elif edge:
        found["position"] = edge.group(1)
    elif re.search(r"\b(center|centre|middle)\b", text):
        found["position"] = "center"
    return found


def read_parameters(path: str | Path) -> dict | None:
    """Prompt, seed and guidance from a PNG's AUTOMATIC1111 'parameters' text chunk, or None.

    sdcli writes the prompt first and "Steps: 25, Sampler: ..., CFG scale: 7.5, Seed: 3, ..." last.
    """
    from PIL import Image

    from sdcli.generation.metadata import A1111_KEY, parse_a1111

    with Image.open(path) as image:
        text = image.info.get(A1111_KEY)
    if not text:
        return None
    fields = parse_a1111(text)
    out = {"prompt": fields["prompt"], "seed": None, "guidance": None, "fields": fields}
    if re.fullmatch(r"-?\d+", fields.get("Seed", "")):
        out["seed"] = int(fields["Seed"])
    try:
        out["guidance"] = float(fields["CFG scale"])
    except (KeyError, ValueError):
        pass
    return out


# -- image analysis ------------------------------------------------------------------------------------------

def _pixels(image) -> np.ndarray:
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (dataset.SIZE, dataset.SIZE):
        image = image.resize((dataset.SIZE, dataset.SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _shifts(a: np.ndarray, fill) -> list[np.ndarray]:
    """The 8 neighbours of every pixel, as shifted copies of ``a`` padded with ``fill``."""
    p = np.pad(a, 1, constant_values=fill)
    h, w = a.shape
    return [p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected blob of ``mask``, with its holes filled."""
    # Label propagation: each pixel takes the largest label among its neighbours until nothing changes.
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        grown = np.maximum(labels, np.max(_shifts(labels, 0), axis=0)) * mask
        if np.array_equal(grown, labels):
            break
        labels = grown
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    blob = labels == ids[np.argmax(counts)]
    # Holes: background not reachable from the border.
    outside = np.zeros_like(blob)
    outside[[0, -1], :] = ~blob[[0, -1], :]
    outside[:, [0, -1]] |= ~blob[:, [0, -1]]
    while True:
        grown = (outside | np.any(_shifts(outside, False)[1::2], axis=0)) & ~blob  # 4-connected
        if np.array_equal(grown, outside):
            break
        outside = grown
    return ~outside


def _nearest(value, table: dict) -> str:
    value = np.asarray(value, dtype=np.float64)
    return min(table, key=lambda name: float(np.sum((value - np.asarray(table[name], dtype=np.float64)) ** 2)))


def segment(image) -> dict:
    """The background colour and, when a shape stands out, its colour, blob (mask) and coverage (0..1 per pixel)."""
    px = _pixels(image)
    border = np.concatenate([px[:2].reshape(-1, 3), px[-2:].reshape(-1, 3), px[:, :2].reshape(-1, 3), px[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    out = {"background": background}

    # 1. Foreground: pixels at least half as far from the background as the shape's core is.
    distance = np.linalg.norm(px - background, axis=2)
    peak = float(np.percentile(distance, 99.7))  # the top dozen pixels: inside even a small star
    if peak < MIN_CONTRAST:
        return out
    blob = _largest_component(distance > max(MIN_CONTRAST, peak / 2))
    if blob.sum() < 4:
        return out

    # 2. Colour from the most saturated half of the blob: antialiased edges are half background.
    inside = distance[blob]
    color = np.median(px[blob][inside >= np.median(inside)], axis=0)

    # 3. Coverage: an edge pixel is a mix of shape and background, so its distance from the background over
    # the shape's is the fraction it covers; blur spreads coverage but keeps its sum.
    contrast = max(float(np.linalg.norm(color - background)), MIN_CONTRAST)
    near = np.max([blob, *_shifts(blob, False)], axis=0)  # the blob and the pixels touching it
    coverage = np.clip(distance / contrast, 0.0, 1.0) * near
    return {**out, "color": color, "blob": blob, "coverage": coverage}


def analyse(image) -> dict:
    """What an image shows: the five attributes (None where no shape is found) and the evidence behind them."""
    seg = segment(image)
    out: dict = dict.fromkeys(SCORED)
    out["background"] = _nearest(seg["background"], dataset.BACKGROUNDS)
    if "blob" not in seg:
        return out
    out["color"] = _nearest(seg["color"], dataset.COLORS)
    out["shape"], confidence = shape_classifier.predict(shape_classifier.template(seg["coverage"], seg["blob"]))
    # Position from the centre of the half-contrast blob's box, which blur barely moves.
    ys, xs = np.nonzero(seg["blob"])
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    out["position"] = _nearest(((x0 + x1) / 2, (y0 + y1) / 2), dataset.POSITIONS)
    # Size from the covered area, which blur keeps while it eats a star's points and shrinks its box.
    side = float(np.sqrt(seg["coverage"].sum() / BOX_FILL[out["shape"]]))
    out["size"] = _nearest(side, dataset.SIZES)
    out["evidence"] = {"rgb": [round(float(c)) for c in seg["color"]], "box": [int(x0), int(y0), int(x1), int(y1)],
                       "side": round(side, 1), "shape_probability": round(confidence, 3)}
    return out


# -- scores --------------------------------------------------------------------------------------------------

def diversity(images) -> float | None:
    """Mean pairwise pixel distance (mean |a - b| on a 0..1 scale) between images; None for fewer than two."""
    arrays = [_pixels(im) / 255.0 for im in images]
    if len(arrays) < 2:
        return None
    return float(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(arrays, 2)]))


def score(samples) -> dict:
    """Accuracy per attribute and diversity for (image, prompt) or (image, prompt, group) samples.

    An attribute is scored only on prompts that name it. Diversity is measured
    within each group (default: the prompt; give (prompt, guidance) to keep
    guidance scales apart) and averaged over groups of at least two images.
    """
    right: dict[str, int] = defaultdict(int)
    asked: dict[str, int] = defaultdict(int)
    by_group = defaultdict(list)
    prompts = set()
    n = 0
    for image, prompt, *group in samples:
        n += 1
        prompts.add(prompt)
        want, got = parse_prompt(prompt), analyse(image)
        for attr in SCORED:
            if want[attr] is not None:
                asked[attr] += 1
                right[attr] += got[attr] == want[attr]
        by_group[group[0] if group else prompt].append(image)
    spreads = [d for d in (diversity(ims) for ims in by_group.values()) if d is not None]
    return {
        "n": n,
        "accuracy": {a: right[a] / asked[a] for a in SCORED if asked[a]},
        "diversity": float(np.mean(spreads)) if spreads else None,
        "prompts": len(prompts),
    }


def folder_samples(folder: str | Path) -> list[dict]:
    """(path, prompt, seed, guidance) of every PNG in ``folder``: from its 'parameters' chunk, else metadata.jsonl."""
    folder = Path(folder)
    captions = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for line in meta.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                # Score against what is drawn: a training caption may be deliberately wrong (--caption-noise).
                captions[row["file_name"]] = dataset.true_caption(row)
    samples = []
    for path in sorted(folder.rglob("*.png")):
        params = read_parameters(path)
        if params:
            samples.append({"path": path, "prompt": params["prompt"], "seed": params["seed"], "guidance": params["guidance"]})
        elif path.relative_to(folder).as_posix() in captions:
            samples.append({"path": path, "prompt": captions[path.relative_to(folder).as_posix()], "seed": None, "guidance": None})
    return samples


def evaluate_folder(folder: str | Path) -> dict:
    """Score every captioned PNG under ``folder``, overall and per guidance scale ("CFG scale")."""
    from PIL import Image

    samples = folder_samples(folder)
    if not samples:
        raise ValueError(f"no PNG with a prompt in {folder}: expected sdcli's 'parameters' chunk or a metadata.jsonl")

    def run(rows):
        return score((Image.open(r["path"]), r["prompt"], (r["prompt"], r["guidance"])) for r in rows)

    groups = defaultdict(list)
    for row in samples:
        groups[row["guidance"]].append(row)
    report = run(samples)
    report["folder"] = str(folder)
    report["by_guidance"] = {
        ("none" if g is None else f"{g:g}"): run(rows)
        for g, rows in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
    }
    return report


def markdown_table(report: dict) -> str:
    """One row per guidance scale: n, accuracies in percent, diversity."""
    head = "| guidance | images | prompts | colour | shape | position | size | background | diversity |"
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for g, r in report["by_guidance"].items():
        acc = [f"{100 * r['accuracy'][a]:.1f} %" if a in r["accuracy"] else "–" for a in SCORED]
        div = f"{r['diversity']:.3f}" if r["diversity"] is not None else "–"
        lines.append(f"| {g} | {r['n']} | {r['prompts']} | " + " | ".join(acc) + f" | {div} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="folder of PNGs: sdcli outputs (prompt in the 'parameters' chunk) or a dataset folder")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON instead of a table")
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        print(f"error: no such folder: {args.folder}", file=sys.stderr)
        return 1
    try:
        report = evaluate_folder(args.folder)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else markdown_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
