"""Images in and out: the one loader every command reads pictures with, writing them
safely, and the labelled grids that make diffusion visible (contact sheets,
trajectory strips, the forward process of `inspect-schedule`).

An input image is a path or, from Python, a PIL image already in memory (`ImageInput`); the
loader treats both alike, so a picture gives the same pixels whichever way it comes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from sdcli.errors import DataError, OutputError

# Pillow's own decompression-bomb threshold (~89 megapixels, a 9459x9459 image); anything larger
# is refused from its header, before a pixel is decoded. (Pillow only warns up to twice this.)
MAX_IMAGE_PIXELS = 89_478_485

# A path (str or Path) or a PIL.Image.Image given in memory. Typed Any: reading the settings' declarations
# must not import Pillow (`sdcli --help` stays instant).
ImageInput = Any


def in_memory(source: Any) -> bool:
    """Whether ``source`` is a PIL image given in memory rather than a path to one."""
    pil = sys.modules.get("PIL.Image")  # no PIL image exists before Pillow is imported
    return pil is not None and isinstance(source, pil.Image)


def named(source: ImageInput) -> str:
    """How a message names an input image: its path, or what it is when it was given in memory."""
    if in_memory(source):
        return f"(a {source.width}x{source.height} {source.mode} image given in memory)"
    return str(source)


def check_input(source: ImageInput, what: str, setting: str | None = None) -> None:
    """Refuse what is neither a path nor a PIL image (a numpy array, bytes), in one line naming ``what``."""
    from sdcli.errors import UsageError

    if not (in_memory(source) or isinstance(source, (str, os.PathLike))):
        raise UsageError(f"{what} takes a file path or a PIL image, not {type(source).__name__}", setting=setting)


# ---------------------------------------------------------------- reading


class _Unusable(Exception):
    def __init__(self, detail: str, size: tuple[int, int] = (0, 0), refused: bool = False):
        super().__init__(detail)
        self.detail, self.size, self.refused = detail, size, refused


def _header(path: Path):
    """``path`` opened from its header only, its size checked against `MAX_IMAGE_PIXELS`; raises `_Unusable`.

    A small file declaring a huge image therefore costs nothing.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, not warned about
            img = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as exc:  # over twice the limit: Pillow refuses in open()
        raise _Unusable(f"refused as a decompression bomb: {' '.join(str(exc).split())}", refused=True) from None
    except UnidentifiedImageError:
        raise _Unusable("not a format Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _Unusable(" ".join(str(exc).split()) or type(exc).__name__) from None
    try:
        _check_pixels(img.size)
    except _Unusable:
        img.close()
        raise
    return img


def _check_pixels(size: tuple[int, int]) -> None:
    w, h = size
    if w * h > MAX_IMAGE_PIXELS:
        raise _Unusable(f"refused: {w}x{h} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit "
                        "(a decompression bomb?)", (w, h), refused=True)


def _decoded(path: Path):
    """``path`` opened and every pixel decoded, as stored (not rotated); raises `_Unusable`.

    Decoding everything finds a truncated file now rather than mid-run; a pixel format that
    has no honest 8-bit reading (`_mode_problem`) is refused here too.
    """
    img = _header(path)
    try:
        return _loaded(img)
    except _Unusable:
        img.close()
        raise


def _loaded(img):
    """``img`` with every pixel decoded and its mode checked (`_mode_problem`); raises `_Unusable`.
    An image given in memory comes through here too: one opened lazily may still be a truncated file."""
    from PIL import Image

    try:
        img.load()
        problem = _mode_problem(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _Unusable(" ".join(str(exc).split()) or type(exc).__name__, img.size) from None
    if problem:
        raise _Unusable(problem, img.size, refused=True)
    return img


# Integer greyscale modes whose values run 0..65535: 16-bit PNG and TIFF (Pillow >= 10 opens them as I;16*,
# older Pillow as I). A 32-bit integer image has no declared white, so I above 65535 is refused, not guessed.
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S")


def _mode_problem(img) -> str | None:
    """Why ``img``'s pixels have no honest reading as 8-bit RGB, or None. Needs the pixels loaded."""
    if img.mode == "I":
        lo, hi = img.getextrema()
        if lo < 0 or hi > 65535:
            return (f"refused: 32-bit integer pixels ranging {lo}..{hi} have no declared white level "
                    "(16-bit data, 0..65535, is read); save it as 8- or 16-bit")
    elif img.mode == "F":
        import numpy as np

        values = np.asarray(img)
        if not np.isfinite(values).all():
            return "refused: floating-point pixels include NaN or infinity; save it as 8- or 16-bit"
        lo, hi = float(values.min()), float(values.max())
        if lo < 0 or hi > 255:
            return (f"refused: floating-point pixels ranging {lo:g}..{hi:g} are neither 0..1 nor 0..255; "
                    "save it as 8- or 16-bit")
    return None


def _rgb(img):
    """Upright per the EXIF orientation tag, transparency flattened onto white, any mode to 8-bit RGB.

    Pillow's convert() clips wide modes instead of scaling them (16-bit 40000 becomes 255, float 0.5
    becomes 0), so those are scaled here first: 16-bit (I;16*, and I holding 0..65535) by 1/257, and
    float (F) from 0..1 when every value lies there, else from 0..255 (Pillow's own float scale);
    `_mode_problem` refuses the rest. 48-bit RGB PNGs Pillow already opens as 8-bit RGB.
    """
    import numpy as np
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    problem = _mode_problem(img)
    if problem:
        raise _Unusable(problem, img.size, refused=True)
    if img.mode in _SIXTEEN_BIT or img.mode == "I":
        # Rounded, so 16-bit 0..65535 and its 8-bit 0..255 agree at every level (257 = 65535 / 255).
        grey = (np.asarray(img, dtype=np.float64) / 257).round()
        img = Image.fromarray(grey.clip(0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        grey = (values * 255 if values.max() <= 1 else values).round()
        img = Image.fromarray(grey.clip(0, 255).astype(np.uint8), "L")
    try:
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return img.convert("RGB")
    except ValueError as exc:  # a mode Pillow cannot convert ("conversion from La to L not supported")
        raise _Unusable(f"refused: pixel mode {img.mode} cannot be made RGB ({exc})", img.size, refused=True) from None


def open_image(source: ImageInput, *, what: str = "--init-image", setting: str | None = None):
    """The image at ``source`` (a path, or a PIL image given in memory) as an upright RGB PIL image; a
    DataError naming ``what`` (and, as its ``setting``, the field) and the file otherwise.

    Every command reads pictures through here: EXIF rotation applied, transparency
    flattened onto white, palette/greyscale/CMYK/16-bit made RGB, and anything over
    `MAX_IMAGE_PIXELS` refused from its header before a pixel is decoded. An image in memory
    gets the same, and is left as it was given (the result is a new image).
    """
    check_input(source, what, setting)
    try:
        if in_memory(source):
            _check_pixels(source.size)
            return _rgb(_loaded(source))
        path = _existing(source, what, setting)
        with _decoded(path) as img:
            return _rgb(img)
    except _Unusable as exc:
        raise DataError(_unusable_message(what, source, exc), setting=setting) from None


def _existing(path: Path | str, what: str, setting: str | None = None) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{what} {path}: no such file", setting=setting)
    if path.is_dir():
        raise DataError(f"{what} {path} is a folder, not an image", setting=setting)
    return path


def _unusable_message(what: str, source: Any, exc: _Unusable) -> str:
    where = named(source) if in_memory(source) else Path(source).expanduser()
    return f"{what} {where}: {exc.detail if exc.refused else f'not a readable image ({exc.detail})'}"


def image_size(source: ImageInput, *, what: str = "--init-image", setting: str | None = None) -> tuple[int, int]:
    """The (width, height) ``source`` declares in its header, as stored (EXIF rotation not applied); an image
    in memory, its size.

    For planning before any pixel is decoded (`sdcli.memory`): the same DataError as `open_image`
    for a missing, unreadable or oversized file, so it is refused before a model loads.
    """
    check_input(source, what, setting)
    try:
        if in_memory(source):
            _check_pixels(source.size)
            return source.size
        path = _existing(source, what, setting)
        with _header(path) as img:
            return img.size
    except _Unusable as exc:
        raise DataError(_unusable_message(what, source, exc), setting=setting) from None


def pixels_sha256(image: Any) -> str:
    """The sha256 of an RGB image as `open_image` returns it: its size, then its pixels row by row. What a
    record holds for an image given in memory, which has no file to hash."""
    return hashlib.sha256(f"{image.width}x{image.height}\n".encode() + image.convert("RGB").tobytes()).hexdigest()


def check_image(path: Path) -> tuple[tuple[int, int], str | None]:
    """For scanning a folder: (size as stored, None) if ``path`` decodes completely, else (size or (0, 0), why not)."""
    try:
        with _decoded(Path(path)) as img:
            return img.size, None
    except _Unusable as exc:
        return exc.size, exc.detail if exc.refused else f"unreadable ({exc.detail})"


# ---------------------------------------------------------------- writing


def check_new_file(path: Path | str, overwrite: bool, flag: str | None = None) -> Path:
    """Refuse, before any work, a folder where a file should go, an existing file without --overwrite, or
    a name longer than the file system takes."""
    path = Path(path)
    check_name_length(path, flag)
    if path.is_dir():
        raise OutputError(f"{flag + ' ' if flag else ''}{path} is a folder; give a file name")
    if not overwrite and path.exists():
        raise OutputError(_exists(path))
    return path


def check_name_length(path: Path, flag: str | None = None) -> None:
    """Refuse a path with a name (the file's or a folder's on the way) longer than its file system takes,
    in one line naming it, rather than an OSError when it is written."""
    limit = _name_max(path)
    for part in Path(path).parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise OutputError(f"{flag + ' ' if flag else ''}{path}: the name {_short(part)} is {size} bytes, "
                              f"longer than the {limit} this file system takes")


def _name_max(path: Path) -> int:
    folder = Path(path).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or it does not say
        return 255


def _short(name: str) -> str:
    return repr(name if len(name) <= 40 else name[:20] + "..." + name[-12:])


def _exists(path: Path) -> str:
    return f"{path} exists; pass --overwrite to replace it"


def atomic_write(path: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Write through ``write(tmp)`` to a temporary name beside ``path`` and rename it into place.

    An interrupted run therefore never leaves a half-written file, and an
    existing file is only replaced when asked.
    """
    path = check_new_file(path, overwrite)
    # A short prefix: a name near the file system's limit (255 bytes) must not overflow it in the temporary one.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:24]}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(Path(tmp))
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() refuses an existing target, so a file that appeared meanwhile survives.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputError(_exists(path)) from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise OutputError(_exists(path)) from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_png(image: Any, path: Path, pnginfo: Any = None, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=pnginfo), overwrite)


# ---------------------------------------------------------------- drawing


@functools.lru_cache(maxsize=8)
def font(size: int):
    """DejaVu Sans at ``size`` (it draws ᾱ, √, φ and −), else Pillow's default font."""
    from PIL import ImageFont

    try:
        # matplotlib (a dependency) ships the file; imported here, not at module level, so --help stays instant.
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), size)
    except Exception:  # noqa: BLE001 - any font beats no picture
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
            return ImageFont.load_default()


def labelled_grid(
    images: Sequence[Sequence[Any]],
    col_labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
    title: str = "",
    captions: Sequence[Sequence[str]] | None = None,
    min_cell: int = 96,
):
    """A grid of PIL images (rows of columns): a title, labels above the columns and left of the rows,
    and an optional caption (one or more lines) under each cell.

    Small images are enlarged (nearest neighbour, so pixels stay honest) to at
    least ``min_cell`` so the labels fit; a column is as wide as its widest text.
    """
    from PIL import Image, ImageDraw

    # 1. Sizes: cells, text, margins
    w, h = images[0][0].size
    zoom = max(1, -(-min_cell // max(w, h)))
    w, h = w * zoom, h * zoom
    fs = max(11, min(16, max(w, h) // 8))
    f = font(fs)
    pad, line = 6, fs + 4
    texts = list(col_labels) + [t for row in captions or [] for c in row for t in c.splitlines()]
    col_w = max([w] + [int(f.getlength(t)) for t in texts])
    row_labels = [r for r in row_labels] if any(row_labels) else []
    left = pad + (max(int(f.getlength(r)) for r in row_labels) + pad if row_labels else 0)
    top = pad + (line if title else 0) + (line if col_labels else 0)
    cap_h = max([c.count("\n") + 1 for row in captions or [] for c in row], default=0) * line
    row_h = h + cap_h + pad
    ncol = max(len(row) for row in images)
    width = max(left + ncol * (col_w + pad), int(f.getlength(title)) + 2 * pad)
    # 2. Draw
    sheet = Image.new("RGB", (width, top + len(images) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill="black", font=f)
    for c, label in enumerate(col_labels):
        draw.text((left + c * (col_w + pad), top - line), label, fill="black", font=f)
    for r, row in enumerate(images):
        y = top + r * row_h
        if row_labels:
            draw.text((pad, y + h // 2 - fs // 2), row_labels[r], fill="black", font=f)
        for c, img in enumerate(row):
            x = left + c * (col_w + pad)
            cell = img.convert("RGB")
            sheet.paste(cell.resize((w, h), Image.NEAREST) if zoom > 1 else cell, (x, y))
            if captions:
                draw.multiline_text((x, y + h + 2), captions[r][c], fill="black", font=f, spacing=4)
    return sheet


def save_gif(frames: Sequence[Any], path: Path, overwrite: bool = False, ms_per_frame: int = 120) -> Path:
    """An animated GIF that holds the last frame a little longer."""
    frames = [f.convert("RGB") for f in frames]
    durations = [ms_per_frame] * (len(frames) - 1) + [ms_per_frame * 8]

    def write(tmp: Path) -> None:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)

    return atomic_write(path, write, overwrite)


def check_writable(folder: Path) -> None:
    """Create ``folder`` if missing and prove we can write there, before any work starts."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():  # mkdir's "File exists" would not say which one
        raise OutputError(f"cannot write to {folder}: {blocker} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sdcli-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror or exc}") from None
