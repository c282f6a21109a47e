"""Where generated images go and what else is written beside them.

Numbered files in a folder (never overwriting), one named .png, trajectory
strips and GIFs, and contact sheets, each written atomically; paths (or JSON
records) go to stdout as soon as each file exists.
"""

from __future__ import annotations

import json as jsonlib
import re
import time
from pathlib import Path
from typing import Any, Callable

from sdcli import defaults
from sdcli.errors import UsageError


class OutputNamer:
    """Numbered files in a folder, or the one .png path the user named.

    Numbers continue after the highest already in the folder and follow each
    job's place in the whole run, so processes sharing a folder never clash.
    """

    def __init__(self, out: Path | None, count: int, overwrite: bool, settings: Any):
        from sdcli.images import check_writable

        self.overwrite = overwrite
        self.settings = settings
        out = Path(out) if out is not None else defaults.OUT_DIR
        if out.suffix.lower() == ".png":
            if count > 1:
                raise UsageError(f"--out {out} names one file but {count} images would be made; give a folder")
            if out.exists() and not overwrite:
                raise UsageError(f"{out} exists; pass --overwrite to replace it")
            check_writable(out.parent if str(out.parent) else Path("."))
            self.file, self.folder = out, out.parent
        else:
            if out.exists() and not out.is_dir():
                raise UsageError(f"--out {out} exists and is not a folder")
            check_writable(out)
            self.file, self.folder = None, out
        taken = [int(m.group(1)) for p in self.folder.glob("*.png") if (m := re.match(r"(\d{5,})-", p.name))]
        self.next = max(taken, default=-1) + 1

    def image(self, job: Any) -> Path:
        if self.file is not None:
            return self.file
        parts = [f"{self.next + job.index:05d}", str(job.seed)]
        if len(self.settings.guidance) > 1:
            parts.append(f"g{job.guidance:g}")
        if len(self.settings.guidance_rescale) > 1:
            parts.append(f"r{job.guidance_rescale:g}")
        return self.folder / ("-".join(parts) + ".png")

    def sheet(self, prompt_index: int) -> Path:
        return self.folder / f"{self.next:05d}-sheet{prompt_index}.png"


def emit(path: Path, record: dict[str, Any], json: bool) -> None:
    """A result line on stdout: the path, or the path and record as JSON."""
    if json:
        print(jsonlib.dumps({"path": str(path), **record}), flush=True)
    else:
        print(path, flush=True)


def write_images(
    settings: Any, loaded: Any, jobs: list[Any], namer: OutputNamer, *, json: bool,
    advance: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate ``jobs`` and write each image (and its trajectory) as soon as it exists.

    Returns one entry per image (path, prompt, seed, guidance) for the contact sheets.
    """
    from sdcli.generation import iter_images
    from sdcli.images import save_png
    from sdcli.metadata import pnginfo

    written = []
    for item in iter_images(settings, loaded, jobs, on_step=advance):
        path = save_png(item.image, namer.image(item.job), pnginfo(item.record), namer.overwrite)
        emit(path, item.record, json)
        if item.trajectory:
            write_trajectory(item, path, namer.overwrite, json)
        written.append({"path": str(path), "prompt": item.job.prompt, "seed": item.job.seed,
                        "guidance": item.job.guidance, "guidance_rescale": item.job.guidance_rescale,
                        "done_at": time.perf_counter()})
    return written


def write_trajectory(item: Any, path: Path, overwrite: bool, json: bool) -> None:
    """x̂_0 after every step as a labelled strip and an animated GIF ending on the image."""
    from sdcli.images import labelled_grid, save_gif, save_png

    frames = item.trajectory
    labels = [f"{i + 1}" for i in range(len(frames))]
    strip = labelled_grid([frames], labels, [""], title=f"predicted x0 per step: {item.job.prompt[:60]}")
    strip_path = save_png(strip, path.with_name(path.stem + "-trajectory.png"), overwrite=overwrite)
    gif_path = save_gif(frames + [item.image], path.with_name(path.stem + "-trajectory.gif"), overwrite=overwrite)
    for p in (strip_path, gif_path):
        emit(p, {"kind": "trajectory", "image": str(path)}, json)


def write_contact_sheets(written: list[dict[str, Any]], namer: OutputNamer, settings: Any, json: bool) -> None:
    """Per prompt: guidance settings across, seeds down, the adherence/variety trade-off in one picture."""
    from PIL import Image

    from sdcli.images import labelled_grid, save_png

    rescale = len(settings.guidance_rescale) > 1
    prompts = list(dict.fromkeys(w["prompt"] for w in written))
    for i, prompt in enumerate(prompts):
        mine = [w for w in written if w["prompt"] == prompt]
        keys = list(dict.fromkeys((w["guidance"], w["guidance_rescale"]) for w in mine))
        seeds = list(dict.fromkeys(w["seed"] for w in mine))
        cell = {(w["guidance"], w["guidance_rescale"], w["seed"]): w["path"] for w in mine}
        rows = [[Image.open(cell[(g, r, s)]) for g, r in keys] for s in seeds]
        cols = [f"g={g:g}" + (f" φ={r:g}" if rescale else "") for g, r in keys]
        sheet = labelled_grid(rows, cols, [f"seed {s}" for s in seeds], title=prompt[:80])
        path = save_png(sheet, namer.sheet(i), overwrite=namer.overwrite)
        emit(path, {"kind": "contact_sheet", "prompt": prompt}, json)
