"""Find captioned images in a folder, check them, and turn one into training pixels.

Captions come from a Hugging Face imagefolder metadata file (``metadata.jsonl``
or ``metadata.csv`` with ``file_name`` and a text column, in any folder, names
relative to that folder) or from a sidecar ``name.txt`` beside the image; the
metadata wins where both exist. Every image is opened and fully decoded once
here, so a truncated file is found before training rather than at step 4000.
Text files may start with a UTF-8 byte-order mark (as Excel writes CSV); a NUL
byte in a caption is removed with a warning. A symlink whose target lies outside
the folder is skipped with a warning, as an unreadable image is (and stops the
run with --strict): a symlinked caption could otherwise read any file the user
can, and a dataset from elsewhere can carry such links.

The order and augmentation of each epoch (`epoch_items`) are decided here too,
from the seed and the epoch number alone: every process agrees on them, and a
resumed run replays them exactly without any saved sampler state.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sdcli.errors import DataError
from sdcli.images import check_image, open_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


@dataclass
class Example:
    path: Path
    caption: str | None  # None: no caption, trained as the null prompt
    size: tuple[int, int]  # (width, height) as stored


@dataclass
class DataReport:
    root: Path
    examples: list[Example]
    caption_sources: Counter = field(default_factory=Counter)  # "metadata.jsonl", ".txt", "none"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)
    ignored: Counter = field(default_factory=Counter)  # suffix of files that are not images

    def lines(self, resolution: int | None = None) -> list[str]:
        """What was found, for stderr before training starts."""
        n = len(self.examples)
        folders = len({e.path.parent for e in self.examples})
        out = [f"data: {n} image{'s' * (n != 1)} in {self.root}" + (f" ({folders} folders)" if folders > 1 else "")]
        sources = ", ".join(f"{count} from {src}" for src, count in self.caption_sources.most_common() if src != "none")
        empty = self.caption_sources.get("none", 0)
        out.append(f"  captions: {sources or 'none'}" + (f"; {empty} without, trained as the null prompt" if empty else ""))
        sizes = Counter(f"{w}x{h}" for w, h in (e.size for e in self.examples))
        shown = ", ".join(f"{s} ×{c}" for s, c in sizes.most_common(4))
        more = f" and {len(sizes) - 4} more" if len(sizes) > 4 else ""
        out.append(f"  sizes: {shown}{more}")
        if resolution is not None:
            small = sum(1 for e in self.examples if min(e.size) < resolution)
            if small:
                out.append(f"  {small} smaller than --resolution {resolution} will be upscaled")
        if self.ignored:
            kinds = ", ".join(f"{suffix or '(none)'} ×{c}" for suffix, c in self.ignored.most_common())
            out.append(f"  ignored {sum(self.ignored.values())} files that are not png/jpg/webp: {kinds}")
        for rel, why in self.skipped:
            out.append(f"  skipped {rel}: {why}")
        return out


def discover(
    root: Path,
    caption_column: str = "text",
    strict: bool = False,
    allow_empty_captions: bool = False,
    warn=None,
) -> DataReport:
    """Every usable image under ``root`` with its caption; raises DataError for what cannot train.

    ``warn(message)`` is called for each skipped image as it is found.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"--data folder does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"--data must be a folder of images, not a file: {root}")
    report = DataReport(root=root, examples=[])

    def skip(path: Path, why: str) -> None:
        if strict:
            raise DataError(f"{_rel(path, root)}: {why}")
        report.skipped.append((_rel(path, root), why))
        if warn:
            warn(f"warning: skipping {_rel(path, root)}: {why}")

    # 1. Files, in a stable order so every process and every run agree; links out of the folder skipped.
    files = []
    for p in sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root)):
        escape = _link_outside(p, root)
        if escape:
            skip(p, escape)
        else:
            files.append(p)
    # 2. Captions from metadata files, keyed by the image path they name.
    listed: dict[Path, tuple[str | None, str]] = {}
    for meta in (p for p in files if p.name in METADATA_NAMES):
        for image, caption in _read_metadata(meta, root, caption_column):
            if image in listed:
                raise DataError(f"{_rel(image, root)} is listed twice in metadata ({_rel(meta, root)})")
            listed[image] = (caption, meta.name)
    # 3. Image files.
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES and p.name not in METADATA_NAMES and p.suffix.lower() != ".txt":
            report.ignored[p.suffix.lower()] += 1
    for image in listed:
        if not image.is_file():
            raise DataError(f"metadata names {_rel(image, root)}, which does not exist")
    # 4. Open each image (`sdcli.images.check_image`); skip (or, with --strict, stop at) the ones that cannot be read.
    usable = set(files)
    for path in images:
        size, problem = check_image(path)
        if problem:
            skip(path, problem)
            continue
        caption, source = _caption_for(path, listed, usable)
        if caption is not None and "\0" in caption:
            # A NUL byte is no text a tokenizer should see, and one usually means a binary or mis-encoded file.
            where, nuls = source if source != ".txt" else path.with_suffix(".txt").name, caption.count("\0")
            if warn:
                warn(f"warning: removed {nuls} NUL byte(s) from the caption of {_rel(path, root)} (from {where})")
            caption = caption.replace("\0", "").strip() or None
        if caption is None:
            if not allow_empty_captions:
                raise DataError(
                    f"{_rel(path, root)} has no caption (no {path.stem}.txt beside it and no metadata entry); "
                    "add one, or pass --allow-empty-captions to train it as the null prompt"
                )
            source = "none"
        report.caption_sources[source] += 1
        report.examples.append(Example(path=path, caption=caption, size=size))
    if not report.examples:
        why = f" ({len(report.skipped)} unreadable)" if report.skipped else ""
        raise DataError(f"no usable images (png, jpg, webp) in {root}{why}")
    return report


def long_captions(report: DataReport, tokenizer: Any) -> str | None:
    """One line saying how many captions the text encoder will cut at its token limit, naming up to
    three of their images; None when none is that long (or the tokenizer has no limit)."""
    limit = getattr(tokenizer, "model_max_length", None)
    captioned = [e for e in report.examples if e.caption]
    if not captioned or not limit or limit > 100_000:  # transformers' "no limit" is a huge number
        return None
    lengths = [len(ids) for ids in tokenizer([e.caption for e in captioned], truncation=False).input_ids]
    over = [e for e, n in zip(captioned, lengths) if n > limit]
    if not over:
        return None
    names = ", ".join(_rel(e.path, report.root) for e in over[:3]) + (", ..." if len(over) > 3 else "")
    return (f"warning: {len(over)} caption{'s' * (len(over) != 1)} longer than the text encoder's {limit} tokens "
            f"(the longest {max(lengths)}) will be cut there: {names}")


def hold_out(report: DataReport, fraction: float, seed: int) -> tuple[DataReport, list[Example]]:
    """(the report with only the images that train, the held-out images) for --validation-split.

    round(fraction × images), at least one, chosen by a shuffle drawn from the seed alone (its own stream,
    so the epochs' order and a resume are untouched). Images are chosen by path, so an image listed more
    than once goes wholly to one side: nothing held out is ever trained on.
    """
    import dataclasses

    import torch

    from sdcli.errors import UsageError

    paths = sorted({e.path for e in report.examples})
    count = max(1, round(fraction * len(paths)))
    if count >= len(paths):
        raise UsageError(f"--validation-split {fraction:g} holds out {count} of {len(paths)} image"
                         f"{'s' * (len(paths) != 1)}, leaving none to train on; use a smaller split or more images")
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(mix_seed(seed, 3))).tolist()
    held = {paths[i] for i in order[:count]}
    first = {}
    for e in report.examples:
        if e.path in held:
            first.setdefault(e.path, e)
    train = [e for e in report.examples if e.path not in held]
    return dataclasses.replace(report, examples=train), sorted(first.values(), key=lambda e: e.path)


def _caption_for(path: Path, listed: dict[Path, tuple[str | None, str]], usable: set[Path]) -> tuple[str | None, str]:
    key = Path(os.path.normpath(path))
    if key in listed and listed[key][0]:
        return listed[key]
    sidecar = path.with_suffix(".txt")
    if sidecar in usable:  # not one skipped as a link out of the folder
        text = sidecar.read_text(encoding="utf-8-sig", errors="replace").strip()
        if text:
            return text, ".txt"
    return None, "none"


def _read_metadata(meta: Path, root: Path, column: str) -> Iterator[tuple[Path, str | None]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        text = meta.read_text(encoding="utf-8-sig")  # Excel starts its UTF-8 CSV with a byte-order mark
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {_rel(meta, root)}: {exc}") from None
    if meta.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    raise DataError(f"{_rel(meta, root)} line {number} is not valid JSON") from None
                if not isinstance(row, dict):
                    raise DataError(f"{_rel(meta, root)} line {number} is not a JSON object")
                rows.append((number, row))
    else:
        reader = csv.DictReader(text.splitlines())
        rows = [(number, row) for number, row in enumerate(reader, 2)]
    columns = sorted({key for _, row in rows for key in row})
    if rows and "file_name" not in columns:
        raise DataError(f"{_rel(meta, root)} has no file_name column (columns: {', '.join(columns)})")
    if rows and column not in columns:
        raise DataError(
            f"{_rel(meta, root)} has no caption column {column!r} (columns: {', '.join(columns)}); "
            "pick one with --caption-column"
        )
    base = meta.parent
    for number, row in rows:
        name = str(row.get("file_name") or "").strip()
        if not name:
            raise DataError(f"{_rel(meta, root)} line {number}: empty file_name")
        # Lexical check, so symlinks inside the folder still work but "../" and absolute paths do not.
        target = Path(os.path.normpath(base / name))
        if os.path.isabs(name) or not _inside(target, root):
            raise DataError(f"{_rel(meta, root)} line {number}: file_name {name!r} points outside --data {root}")
        caption = row.get(column)
        caption = str(caption).strip() if caption is not None else ""
        yield target, (caption or None)


def _inside(path: Path, root: Path) -> bool:
    root = Path(os.path.normpath(root.absolute()))
    path = Path(os.path.normpath(path.absolute()))
    return path == root or root in path.parents


def _link_outside(path: Path, root: Path) -> str | None:
    """Why ``path`` (a symlink, or inside a symlinked folder) leaves ``root``, or None when it stays inside."""
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return None
    return f"a symlink to {target}, outside --data"


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(os.path.normpath(path)).relative_to(Path(os.path.normpath(root))))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------
# Pixels


def load_rgb(path: Path):
    """The image as training sees it: `sdcli.images.open_image` (upright, RGB, transparency on white)."""
    return open_image(path, what="--data image")


def crop_box(size: tuple[int, int], resolution: int, center: bool, frac: tuple[float, float] = (0.5, 0.5)):
    """Resize target and crop offset for a square crop of ``resolution``: ((w, h), (top, left)).

    The shorter side is resized to ``resolution``; the crop is centred, or
    placed at ``frac`` (two numbers in [0, 1)) of the free space for a random crop.
    """
    w, h = size
    scale = resolution / min(w, h)
    rw, rh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    fy, fx = (0.5, 0.5) if center else frac
    top = int(round((rh - resolution) * fy)) if center else int(fy * (rh - resolution + 1))
    left = int(round((rw - resolution) * fx)) if center else int(fx * (rw - resolution + 1))
    return (rw, rh), (min(top, rh - resolution), min(left, rw - resolution))


def to_pixels(image, resolution: int, center: bool = True, flip: bool = False, frac: tuple[float, float] = (0.5, 0.5)):
    """A square float tensor (3, res, res) in [-1, 1], plus (top, left) of the crop for SDXL.

    With ``flip`` the crop is mirrored after cropping, so its SDXL crop
    coordinate is measured from the mirrored side.
    """
    import numpy as np
    import torch
    from PIL import Image

    (rw, rh), (top, left) = crop_box(image.size, resolution, center, frac)
    img = image.resize((rw, rh), Image.BICUBIC).crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        left = rw - left - resolution
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


# ---------------------------------------------------------------------------
# Epochs: order and augmentation


@dataclass(frozen=True)
class Item:
    """One sample in one step: which example, mirrored or not, caption dropped or not."""

    index: int
    flip: bool = False
    drop: bool = False
    crop: tuple[float, float] = (0.5, 0.5)  # where a random crop sits, as fractions


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, so (seed, epoch) and (seed, rank, step) streams never overlap."""
    import hashlib

    digest = hashlib.sha256("/".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_items(n: int, epoch: int, seed: int, flip: bool, uncond_prob: float) -> list[Item]:
    """A shuffled epoch of ``n`` examples, each with its flip, caption dropout and crop drawn.

    Drawn from (seed, epoch) alone: identical on every process and after a resume.
    """
    import torch

    gen = torch.Generator().manual_seed(mix_seed(seed, 1, epoch))
    order = torch.randperm(n, generator=gen).tolist()
    flips = (torch.rand(n, generator=gen) < 0.5).tolist() if flip else [False] * n
    drops = (torch.rand(n, generator=gen) < uncond_prob).tolist()
    crops = torch.rand(n, 2, generator=gen).tolist()
    return [Item(i, bool(f), bool(d), (c[0], c[1])) for i, f, d, c in zip(order, flips, drops, crops)]


def batches_per_epoch(n: int, batch_size: int, world_size: int) -> int:
    """Micro-batches each process runs per epoch; a short last batch is filled from the epoch's start."""
    return -(-n // (batch_size * world_size))


def rank_batch(items: list[Item], k: int, batch_size: int, rank: int, world_size: int) -> list[Item]:
    """The ``k``-th micro-batch of this epoch for process ``rank``; all ranks together cover the epoch."""
    start = (k * world_size + rank) * batch_size
    return [items[(start + j) % len(items)] for j in range(batch_size)]
