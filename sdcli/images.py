"""Writing images safely, and the pictures that make diffusion visible:
contact sheets (guidance across, seeds down) and trajectory strips/GIFs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

from sdcli.errors import OutputError


def atomic_write(path: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Write through ``write(tmp)`` to a temporary name beside ``path`` and rename it into place.

    An interrupted run therefore never leaves a half-written file, and an
    existing file is only replaced when asked.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite to replace it")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
                raise OutputError(f"{path} exists; pass --overwrite to replace it") from None
            except OSError:  # file systems without hard links
                if path.exists():
                    raise OutputError(f"{path} exists; pass --overwrite to replace it") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_png(image: Any, path: Path, pnginfo: Any = None, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=pnginfo), overwrite)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def labelled_grid(
    images: Sequence[Sequence[Any]],
    col_labels: Sequence[str],
    row_labels: Sequence[str],
    title: str = "",
    min_cell: int = 96,
):
    """A grid of PIL images (rows of columns) with labels above the columns and left of the rows.

    Small images are enlarged (nearest neighbour, so pixels stay honest) to at
    least ``min_cell`` so the labels fit.
    """
    from PIL import Image, ImageDraw

    w, h = images[0][0].size
    zoom = max(1, -(-min_cell // max(w, h)))
    w, h = w * zoom, h * zoom
    font_size = max(10, min(16, max(w, h) // 6))
    font = _font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col_w = max([w] + [int(measure.textlength(c, font=font)) + 6 for c in col_labels])
    left = max([0] + [int(measure.textlength(r, font=font)) + 10 for r in row_labels])
    top = (font_size + 8) * (2 if title else 1)
    pad = 4
    width = max(left + len(col_labels) * (col_w + pad), int(measure.textlength(title, font=font)) + 8)
    sheet = Image.new("RGB", (width, top + len(row_labels) * (h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text((left + c * (col_w + pad), top - font_size - 6), label, fill="black", font=font)
    for r, label in enumerate(row_labels):
        draw.text((4, top + r * (h + pad) + h // 2 - font_size // 2), label, fill="black", font=font)
        for c, img in enumerate(images[r]):
            cell = img.convert("RGB")
            if zoom > 1:
                cell = cell.resize((w, h), Image.NEAREST)
            sheet.paste(cell, (left + c * (col_w + pad), top + r * (h + pad)))
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
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sdcli-write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror or exc}") from None
