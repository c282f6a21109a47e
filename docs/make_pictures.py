"""Remake the README's pictures of the bundled model, with the commands the README shows.

    python docs/make_pictures.py [--out DIR]   # writes DIR/{guidance-sheet,inpaint,hires}.png (default docs/images)

Each picture is made by running `sdcli generate` as a user would (a subprocess, default model: the bundled
one), then laid out with sdcli's own labelled grid. Run it after the bundled model changes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from sdcli.images import labelled_grid

IMAGES = Path(__file__).resolve().parent / "images"
FULL = "a large red circle in the top left corner on a black background"


def sdcli(*args: str) -> list[Path]:
    """Run `sdcli generate ARGS` and return the image paths it printed."""
    out = subprocess.run([sys.executable, "-m", "sdcli", "generate", *args, "-q"], check=True,
                         capture_output=True, text=True).stdout
    return [Path(line) for line in out.splitlines() if line.endswith(".png")]


def contact_sheet(work: Path, out: Path) -> None:
    """A guidance x seed sweep's own contact sheet."""
    sdcli(FULL, "--guidance", "1,3,7.5,12", "--seed", "1,2,3,4,5,6", "--out", str(work / "sheet"))
    (sheet,) = (work / "sheet").glob("*-sheet0.png")
    shutil.copyfile(sheet, out / "guidance-sheet.png")


def masks(work: Path) -> tuple[Path, Path]:
    corner = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(corner).rectangle([32, 32, 63, 63], fill=255)  # the bottom-right quarter
    disc = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(disc).ellipse([0, 0, 40, 40], fill=255)  # over the circle in the top left
    corner.save(work / "corner.png")
    disc.save(work / "disc.png")
    return work / "corner.png", work / "disc.png"


def inpaint(work: Path, out: Path) -> None:
    (circle,) = sdcli(FULL, "--seed", "1", "-o", str(work / "circle.png"))
    corner, disc = masks(work)
    rows, labels = [], []
    for label, mask, prompt in (
        ("blue square", corner, "a small blue square in the bottom right corner on a black background"),
        ("yellow star", disc, "a large yellow star in the top left corner on a black background"),
    ):
        paths = sdcli(prompt, "--init-image", str(circle), "--mask", str(mask), "--strength", "1",
                      "--seed", "1,2,3", "--out", str(work / label.replace(" ", "-")))
        rows.append([Image.open(circle).convert("RGB"), Image.open(mask).convert("RGB"),
                     *(Image.open(p).convert("RGB") for p in paths)])
        labels.append(label)
    labelled_grid(rows, ["--init-image", "--mask", "seed 1", "seed 2", "seed 3"], labels).save(out / "inpaint.png")


def hires(work: Path, out: Path) -> None:
    cells = []
    for args in ((), ("--width", "128", "--height", "128"), ("--hires-scale", "2"),
                 ("--hires-scale", "2", "--hires-upscaler", "latent")):
        (path,) = sdcli(FULL, "--seed", "1", *args, "--out", str(work / f"hires-{len(cells)}"))
        cells.append(Image.open(path).convert("RGB"))
    size = max(im.size for im in cells)
    cells = [im.resize(size, Image.Resampling.NEAREST) for im in cells]  # 64x64 shown at the same scale, pixels kept
    labelled_grid([cells], ["64x64", "128x128 directly", "hires fix, lanczos", "hires fix, latent"]).save(out / "hires.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=IMAGES, help="folder for the pictures (default docs/images)")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        contact_sheet(work, out)
        inpaint(work, out)
        hires(work, out)
    for name in ("guidance-sheet", "inpaint", "hires"):
        print(out / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
