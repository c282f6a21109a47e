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

Several folders may be given, each with a repeat count (``--data DIR:N`` counts
each of its images N times an epoch); names in messages are relative to the
folders' common parent.

The order and augmentation of each epoch (`epoch_batches`) are decided here too,
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
from typing import Any, Iterator, Sequence

from sdcli.errors import DataError
from sdcli.images import check_image, open_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


@dataclass
class Example:
    path: Path
    caption: str | None  # None: no caption, trained as the null prompt
    size: tuple[int, int]  # (width, height) as stored
    repeats: int = 1  # times an epoch, from --data DIR:N
    mask: Path | None = None  # its loss mask (--masks, a metadata `mask` column, or with `alpha` the image itself)
    alpha: bool = False  # --alpha-mask: the mask is ``mask``'s alpha channel
    captions: list[str] | None = None  # --captions-from with several for this image: one drawn per step


@dataclass
class Source:
    """One --data folder: where it is, how often each of its images counts in an epoch, how many it gave."""

    root: Path
    repeats: int = 1
    images: int = 0


@dataclass
class DataReport:
    root: Path  # the folder, or the common parent of several; names in messages are relative to it
    examples: list[Example]
    caption_sources: Counter = field(default_factory=Counter)  # "metadata.jsonl", ".txt", "none"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)
    ignored: Counter = field(default_factory=Counter)  # suffix of files that are not images
    sources: list[Source] = field(default_factory=list)
    masks: Counter = field(default_factory=Counter)  # "--masks", "metadata", "alpha", "none": where masks came from
    resized_masks: list[str] = field(default_factory=list)  # masks of another size than their image, resized to it

    def name(self, path: Path) -> str:
        """``path`` as messages name it."""
        return _rel(path, self.root)

    def skip(self, example: Example, why: str) -> None:
        """Drop an example found unusable after discovery (too small for any bucket), recording why."""
        self.examples.remove(example)
        self.skipped.append((self.name(example.path), why))

    def lines(self, resolution: int | None = None) -> list[str]:
        """What was found, for stderr before training starts."""
        n = len(self.examples)
        folders = len({e.path.parent for e in self.examples})
        out = [f"data: {n} image{'s' * (n != 1)} in {self.root}" + (f" ({folders} folders)" if folders > 1 else "")]
        if len(self.sources) > 1 or any(s.repeats != 1 for s in self.sources):
            per_epoch = sum(e.repeats for e in self.examples)
            shown = ", ".join(f"{_rel(s.root, self.root) if s.root != self.root else s.root.name} {s.images}"
                              + (f" ×{s.repeats}" if s.repeats != 1 else "") for s in self.sources)
            out.append(f"  --data: {shown}; {per_epoch} an epoch with repeats")
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
        if self.masks:
            shown = ", ".join(f"{count} from {src}" for src, count in self.masks.most_common() if src != "none")
            unmasked = self.masks.get("none", 0)
            out.append(f"  loss masks: {shown or 'none'}" + (f"; {unmasked} without, trained on every pixel"
                                                           if unmasked else ""))
        if self.resized_masks:
            named = ", ".join(self.resized_masks[:3]) + (", ..." if len(self.resized_masks) > 3 else "")
            out.append(f"  note: {len(self.resized_masks)} mask{'s' * (len(self.resized_masks) != 1)} of another size "
                       f"than their image resized to it: {named}")
        for rel, why in self.skipped:
            out.append(f"  skipped {rel}: {why}")
        return out


def discover(
    root: Path | Sequence[tuple[Path, int]],
    caption_column: str = "text",
    strict: bool = False,
    allow_empty_captions: bool = False,
    warn=None,
    caption_extension: str = ".txt",
    masks: Path | None = None,
    alpha_mask: bool = False,
    captions_from: Path | None = None,
) -> DataReport:
    """Every usable image under ``root`` with its caption; raises DataError for what cannot train.

    ``root`` is a folder, or several as (folder, repeats) pairs. ``warn(message)`` is called for
    each skipped image as it is found. Loss masks (`find_mask`) are looked for when ``masks`` (a folder
    mirroring the data's), ``alpha_mask`` or a metadata ``mask`` column asks for them.
    """
    sources = [Source(Path(r).expanduser(), n) for r, n in ([(root, 1)] if isinstance(root, (str, Path)) else root)]
    for source in sources:
        if not source.root.exists():
            raise DataError(f"--data folder does not exist: {source.root}")
        if not source.root.is_dir():
            raise DataError(f"--data must be a folder of images, not a file: {source.root}")
    if len(sources) > 1:  # named relative to their common parent, which needs one kind of path
        for source in sources:
            source.root = source.root.absolute()
    common = sources[0].root if len(sources) == 1 else Path(os.path.commonpath([s.root for s in sources]))
    report = DataReport(root=common, examples=[], sources=sources)
    several = read_captions_from(captions_from) if captions_from is not None else {}
    for source in sources:
        before, skipped = len(report.examples), len(report.skipped)
        _discover_one(report, source, caption_column, strict, allow_empty_captions, warn, caption_extension,
                      masks, alpha_mask, several)
        source.images = len(report.examples) - before
        if not source.images:
            unreadable = len(report.skipped) - skipped
            why = f" ({unreadable} unreadable)" if unreadable else ""
            raise DataError(f"no usable images (png, jpg, webp) in {source.root}{why}")
    found = {Path(os.path.normpath(e.path.absolute())) for e in report.examples}
    for image in several:
        if image not in found:
            raise DataError(f"--captions-from {captions_from} names {image}, which is no image in --data")
    return report


def _discover_one(report: DataReport, source: Source, caption_column: str, strict: bool, allow_empty_captions: bool,
                  warn, caption_extension: str, masks: Path | None = None, alpha_mask: bool = False,
                  several: dict[Path, list[str]] | None = None) -> None:
    root = source.root

    def skip(path: Path, why: str) -> None:
        if strict:
            raise DataError(f"{report.name(path)}: {why}")
        report.skipped.append((report.name(path), why))
        if warn:
            warn(f"warning: skipping {report.name(path)}: {why}")

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
    mask_column: dict[Path, Path] = {}
    for meta in (p for p in files if p.name in METADATA_NAMES):
        for image, caption, mask in _read_metadata(meta, root, caption_column):
            if image in listed:
                raise DataError(f"{report.name(image)} is listed twice in metadata ({report.name(meta)})")
            listed[image] = (caption, meta.name)
            if mask is not None:
                mask_column[image] = mask
    # 3. Image files (not the loss masks the metadata names: a mask kept beside its image is no training image).
    named_masks = set(mask_column.values())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES and Path(os.path.normpath(p)) not in named_masks]
    for p in files:
        if (p.suffix.lower() not in IMAGE_SUFFIXES and p.name not in METADATA_NAMES
                and not p.name.endswith(caption_extension)):
            report.ignored[p.suffix.lower()] += 1
    for image in listed:
        if not image.is_file():
            raise DataError(f"metadata names {report.name(image)}, which does not exist")
    # 4. Open each image (`sdcli.images.check_image`); skip (or, with --strict, stop at) the ones that cannot be read.
    usable = set(files)
    for path in images:
        size, problem = check_image(path)
        if problem:
            skip(path, problem)
            continue
        caption, origin = _caption_for(path, listed, usable, caption_extension, root)
        options = (several or {}).get(Path(os.path.normpath(path.absolute())))
        if options:  # --captions-from wins: its first caption stands for the image in reports
            caption, origin = options[0], "--captions-from"
        if caption is not None and "\0" in caption:
            # A NUL byte is no text a tokenizer should see, and one usually means a binary or mis-encoded file.
            sidecar = _sidecar(path, caption_extension).name
            where, nuls = origin if origin != caption_extension else sidecar, caption.count("\0")
            if warn:
                warn(f"warning: removed {nuls} NUL byte(s) from the caption of {report.name(path)} (from {where})")
            caption = caption.replace("\0", "").strip() or None
        if caption is None:
            if not allow_empty_captions:
                raise DataError(
                    f"{report.name(path)} has no caption (no {_sidecar(path, caption_extension).name} beside it and "
                    "no metadata entry); add one, or pass --allow-empty-captions to train it as the null prompt"
                )
            origin = "none"
        report.caption_sources[origin] += 1
        example = Example(path=path, caption=caption, size=size, repeats=source.repeats,
                          captions=list(options) if options and len(options) > 1 else None)
        if masks is not None or alpha_mask or mask_column:
            find_mask(report, example, source.root, masks, alpha_mask, mask_column)
        report.examples.append(example)


def read_captions_from(path: Path) -> dict[Path, list[str]]:
    """--captions-from FILE.jsonl: each line {"file_name": ..., "captions": [...]} (or "text", a string or a
    list), ``file_name`` relative to the file as metadata's is; several captions per image, one drawn each
    step (`epoch_batches`). A line that is no such object is a DataError naming the file and line."""
    path = Path(path)
    where = f"--captions-from {path}"
    out: dict[Path, list[str]] = {}
    for number, line in enumerate(read_text(path, path.parent).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        captions = row.get("captions", row.get("text")) if isinstance(row, dict) else None
        captions = [captions] if isinstance(captions, str) else captions
        name = row.get("file_name") if isinstance(row, dict) else None
        if (not isinstance(name, str) or not name or not isinstance(captions, list) or not captions
                or not all(isinstance(c, str) and c.strip() for c in captions)):
            raise DataError(f"{where} line {number}: expected {{\"file_name\": ..., \"captions\": [\"...\", ...]}} "
                            "with at least one non-empty caption")
        image = Path(os.path.normpath(path.absolute().parent / name))
        if image in out:
            raise DataError(f"{where} line {number}: {name} is listed twice")
        out[image] = [c.strip() for c in captions]
    return out


MASK_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")  # png first: a lossless mask where several exist


def find_mask(report: DataReport, example: Example, root: Path, masks: Path | None, alpha_mask: bool,
              listed: dict[Path, Path]) -> None:
    """Give ``example`` its loss mask: the metadata's ``mask`` column first, then --masks DIR (the image's
    path under its --data folder, with any image suffix), then --alpha-mask (the image's own alpha). An
    image with none trains on every pixel. A mask that cannot be read is a DataError naming it (training on
    a mask that is not there would weigh the loss wrongly, silently); one of another size than its image is
    resized to it, and named in a note (`DataReport.lines`)."""
    key = Path(os.path.normpath(example.path))
    path, origin = listed.get(key), "metadata"
    if path is None and masks is not None:
        rel = example.path.relative_to(root).with_suffix("")
        candidates = [masks / rel.with_name(rel.name + suffix) for suffix in MASK_SUFFIXES]
        path, origin = next((c for c in candidates if c.is_file()), None), "--masks"
    if path is None and alpha_mask:
        example.mask, example.alpha = example.path, True
        report.masks["alpha"] += 1
        return
    if path is None:
        report.masks["none"] += 1
        return
    size, problem = check_image(path) if path.is_file() else ((0, 0), "no such file")
    if problem:
        raise DataError(f"the loss mask {report.name(path)} of {report.name(example.path)} cannot be used: {problem}")
    if size != example.size:
        report.resized_masks.append(f"{path.name} ({size[0]}x{size[1]} for {example.size[0]}x{example.size[1]})")
    example.mask = path
    report.masks[origin] += 1


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
    names = ", ".join(report.name(e.path) for e in over[:3]) + (", ..." if len(over) > 3 else "")
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


def _sidecar(image: Path, extension: str) -> Path:
    return image.with_name(image.stem + extension)


def _caption_for(path: Path, listed: dict[Path, tuple[str | None, str]], usable: set[Path],
                 extension: str = ".txt", root: Path | None = None) -> tuple[str | None, str]:
    key = Path(os.path.normpath(path))
    if key in listed and listed[key][0]:
        return listed[key]
    sidecar = _sidecar(path, extension)
    if sidecar in usable:  # not one skipped as a link out of the folder
        text = read_text(sidecar, root or sidecar.parent).strip()
        if text:
            return text, extension
    return None, "none"


def read_text(path: Path, root: Path) -> str:
    """A caption or metadata file's text: UTF-8 (Excel and Notepad start it with a byte-order mark) or UTF-16/32
    with its byte-order mark; anything else is refused naming the file and the first byte that is not UTF-8,
    where decoding it leniently would train on U+FFFD in place of what the caption said."""
    import codecs

    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {_rel(path, root)}: {exc.strerror or exc}") from None
    # UTF-32's marks first: UTF-32-LE's starts with UTF-16-LE's.
    boms = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
            (codecs.BOM_UTF16_BE, "utf-16"))
    encoding = next((name for bom, name in boms if raw.startswith(bom)), "utf-8-sig")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        what = "UTF-8" if encoding == "utf-8-sig" else encoding.upper() + " (from its byte-order mark)"
        raise DataError(f"{_rel(path, root)} is not {what} text: byte {exc.start} (0x{raw[exc.start]:02x}) "
                        "cannot be decoded; save it as UTF-8") from None


def _read_metadata(meta: Path, root: Path, column: str) -> Iterator[tuple[Path, str | None, Path | None]]:
    """(image, caption, loss mask) for each row; a ``mask`` column names the mask relative to the file, as
    ``file_name`` names the image (empty: none)."""
    rows: list[tuple[int, dict[str, Any]]] = []
    text = read_text(meta, root)
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
        mask = str(row.get("mask") or "").strip()
        yield target, (caption or None), (Path(os.path.normpath(base / mask)) if mask else None)


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


def _wh(target: int | tuple[int, int]) -> tuple[int, int]:
    return (target, target) if isinstance(target, int) else (int(target[0]), int(target[1]))


def crop_box(size: tuple[int, int], target: int | tuple[int, int], center: bool,
             frac: tuple[float, float] = (0.5, 0.5)):
    """Resize target and crop offset for a crop of ``target`` ((w, h), or one side of a square):
    ((resized w, h), (top, left)).

    The image is resized, keeping its aspect ratio, just enough to cover the target; the crop is
    centred, or placed at ``frac`` (two numbers in [0, 1)) of the free space for a random crop.
    """
    w, h = size
    tw, th = _wh(target)
    scale = max(tw / w, th / h)
    rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
    fy, fx = (0.5, 0.5) if center else frac
    top = int(round((rh - th) * fy)) if center else int(fy * (rh - th + 1))
    left = int(round((rw - tw) * fx)) if center else int(fx * (rw - tw + 1))
    return (rw, rh), (min(top, rh - th), min(left, rw - tw))


def to_pixels(image, target: int | tuple[int, int], center: bool = True, flip: bool = False,
              frac: tuple[float, float] = (0.5, 0.5)):
    """A float tensor (3, h, w) in [-1, 1] of the ``target`` (w, h) crop (an int: a square), plus (top, left)
    of the crop for SDXL.

    With ``flip`` the crop is mirrored after cropping, so its SDXL crop
    coordinate is measured from the mirrored side.
    """
    import numpy as np
    import torch
    from PIL import Image

    tw, th = _wh(target)
    (rw, rh), (top, left) = crop_box(image.size, (tw, th), center, frac)
    img = image.resize((rw, rh), Image.BICUBIC).crop((left, top, left + tw, top + th))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        left = rw - left - tw
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


def load_mask(path: Path, alpha: bool = False):
    """A loss mask as a greyscale PIL image (white: the loss counts, black: it does not): the file's
    luminance, or with ``alpha`` its alpha channel (an image without one: all white). Upright by EXIF."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if alpha:
            has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
            return img.convert("RGBA").getchannel("A") if has_alpha else Image.new("L", img.size, 255)
        return img.convert("L")


def to_mask(mask, image_size: tuple[int, int], target: tuple[int, int], center: bool = True, flip: bool = False,
            frac: tuple[float, float] = (0.5, 0.5)):
    """A float tensor (1, h, w) in [0, 1]: ``mask`` resized to its image's size (where it differs), then
    resized, cropped and mirrored exactly as `to_pixels` does the image, so it covers the same pixels."""
    import numpy as np
    import torch
    from PIL import Image

    if mask.size != tuple(image_size):
        mask = mask.resize(tuple(image_size), Image.BILINEAR)
    tw, th = _wh(target)
    (rw, rh), (top, left) = crop_box(mask.size, (tw, th), center, frac)
    img = mask.resize((rw, rh), Image.BILINEAR).crop((left, top, left + tw, top + th))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None].contiguous()


def latent_weights(masks, latent_hw: tuple[int, int], unmasked_weight: float):
    """Per-latent-pixel loss weights (B, 1, h, w) from pixel masks (B, 1, H, W): each mask averaged over the
    pixels a latent pixel covers (area interpolation: the VAE's factor divides H and W), then
    w = m + W·(1 − m), so a masked-out pixel keeps ``unmasked_weight`` W."""
    import torch.nn.functional as F

    m = F.interpolate(masks.float(), size=tuple(latent_hw), mode="area")
    return m + unmasked_weight * (1 - m)


# ---------------------------------------------------------------------------
# Epochs: order and augmentation


@dataclass(frozen=True)
class Item:
    """One sample in one step: which example, mirrored or not, caption dropped or not."""

    index: int
    flip: bool = False
    drop: bool = False
    crop: tuple[float, float] = (0.5, 0.5)  # where a random crop sits, as fractions
    tags: int | None = None  # with --shuffle-captions: the seed of this sample's tag order
    pick: int | None = None  # with --captions-from: the seed of which of the image's captions this sample trains


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, so (seed, epoch) and (seed, rank, step) streams never overlap."""
    import hashlib

    digest = hashlib.sha256("/".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_batches(groups: Sequence[Sequence[int]], epoch: int, seed: int, flip: bool, uncond_prob: float,
                  batch: int, shuffle_tags: bool = False, several_captions: bool = False) -> list[list[Item]]:
    """The global batches of one epoch: each group (the example indices of one bucket, an example
    repeated as often as it counts) shuffled and cut into batches of ``batch``, every sample with its flip,
    caption dropout, crop and tag order drawn, and the batches of all groups in a shuffled order.

    Every batch holds one group, so its samples share one size; a group's short last batch is filled
    from the group's own start. Drawn from (seed, epoch) alone: identical on every process and after
    a resume.
    """
    import torch

    gen = torch.Generator().manual_seed(mix_seed(seed, 1, epoch))
    # Which caption each sample trains: a stream of its own, so runs without --captions-from draw as before.
    picks = torch.Generator().manual_seed(mix_seed(seed, 6, epoch)) if several_captions else None
    batches: list[list[Item]] = []
    for members in groups:
        n = len(members)
        order = torch.randperm(n, generator=gen).tolist()
        flips = (torch.rand(n, generator=gen) < 0.5).tolist() if flip else [False] * n
        drops = (torch.rand(n, generator=gen) < uncond_prob).tolist()
        crops = torch.rand(n, 2, generator=gen).tolist()
        tags = torch.randint(0, 2**31 - 1, (n,), generator=gen).tolist() if shuffle_tags else [None] * n
        chosen = torch.randint(0, 2**31 - 1, (n,), generator=picks).tolist() if picks is not None else [None] * n
        items = [Item(members[i], bool(f), bool(d), (c[0], c[1]), t, k)
                 for i, f, d, c, t, k in zip(order, flips, drops, crops, tags, chosen)]
        batches += [[items[(start + j) % n] for j in range(batch)] for start in range(0, n, batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def batches_per_epoch(groups: Sequence[Sequence[int]], batch: int) -> int:
    """Global batches in an epoch (the same every epoch): each group's count rounded up to whole batches."""
    return sum(-(-len(members) // batch) for members in groups)


def rank_share(batch: list[Item], batch_size: int, rank: int) -> list[Item]:
    """Process ``rank``'s ``batch_size`` samples of a global batch; all ranks together cover it."""
    return batch[rank * batch_size:(rank + 1) * batch_size]


def shuffle_tags(caption: str, keep: int, seed: int) -> str:
    """``caption``'s comma-separated tags in the order ``seed`` draws, the first ``keep`` left in place."""
    import random

    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep], tags[keep:]
    random.Random(seed).shuffle(tail)
    return ", ".join(head + tail)
