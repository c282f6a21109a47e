"""Where generated images go and what else is written beside them.

Numbered files in a folder (never overwriting), one named .png, trajectory
strips and GIFs, and contact sheets, each written atomically; each file is
announced to the front-end as soon as it exists (`generate` prints its path, or JSON, on stdout).
"""

from __future__ import annotations

import json as jsonlib
import re
import sys
from pathlib import Path
from typing import Any, Callable

from sdcli import defaults
from sdcli.errors import UsageError

# An --out with one of these would otherwise become a folder of that name.
OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif", ".heic")
COUNTER = ".sdcli-next"  # the next free file number of a folder (`reserve_numbers`)


class ImageWriter:
    """Writes what `sdcli.generation.generate` yields: numbered PNGs in a folder, or the one .png path named.

    Numbers continue after the highest already in the folder and follow each
    job's place in the whole run, so processes sharing a folder never clash.
    Everything is checked here, before the model loads.
    """

    def __init__(self, out: Path | None, plan: Any, *, overwrite: bool = False,
                 name: Callable[[Any], str] | None = None, announce: Callable[[Path, dict[str, Any]], None] | None = None):
        from sdcli.images import check_new_file, check_writable

        # ``announce(path, record)`` tells a front-end of each file written (`generate` prints it: `emit`);
        # without it the images are a by-product of another command (finetune's validation and class images),
        # whose stdout holds its own result.
        self.plan, self.overwrite, self.name, self.announce = plan, overwrite, name, announce
        self.written: list[dict[str, Any]] = []
        count = len(plan.jobs)
        out = Path(out) if out is not None else defaults.OUT_DIR
        if out.suffix.lower() in OTHER_IMAGE_SUFFIXES:
            raise UsageError(f"--out {out}: sdcli writes PNG files (they carry the settings that made them); "
                             "name a .png file or a folder")
        if out.suffix.lower() == ".png":
            if count > 1:
                raise UsageError(f"--out {out} names one file but {count} images would be made; give a folder")
            # Every file this run writes, named now: none may fail after the image is made.
            for path in (out, *(trajectory_paths(out) if getattr(plan.settings, "save_trajectory", False) else ())):
                check_new_file(path, overwrite, "--out")
            check_writable(out.parent if str(out.parent) else Path("."))
            self.file, self.folder = out, out.parent
        else:
            if out.exists() and not out.is_dir():
                raise UsageError(f"--out {out} exists and is not a folder")
            check_writable(out)
            from sdcli.locks import check_own

            check_own(out / COUNTER)
            self.file, self.folder = None, out
        self.count, self._next = count, None
        if plan.state is not None and self.file is None:
            from sdcli import distributed

            # The main process reserves the run's numbers now; every process names its files from them.
            self._next = distributed.broadcast(reserve_numbers(self.folder, count) if plan.is_main else 0, plan.state)

    @property
    def next(self) -> int:
        """The run's first file number, reserved when the first image is written (so a run that
        fails before it leaves nothing behind)."""
        if self._next is None:
            self._next = reserve_numbers(self.folder, self.count)
        return self._next

    def path(self, job: Any) -> Path:
        if self.file is not None:
            return self.file
        if self.name is not None:
            return self.folder / self.name(job)
        parts = [f"{self.next + job.index:05d}", str(job.seed)]
        parts += [f"{d.opt.label}{job.values[d.record_key]:g}" for d in self.plan.swept()]
        return self.folder / ("-".join(parts) + ".png")

    def write(self, item: Any) -> Path:
        """Save one image (and its trajectory) atomically, with its record, and print its path."""
        from sdcli.images import save_png
        from sdcli.generation.metadata import pnginfo

        path = save_png(item.image, self.path(item.job), pnginfo(item.record), self.overwrite)
        self.emit(path, item.record)
        if item.trajectory:
            write_trajectory(item, path, self)
        self.written.append({"path": str(path), **item.job.values})
        return path

    def finish(self, say: Callable[[str], None] | None = None) -> list[Path]:
        """After the last image: one summary (to ``say``, from the main process) and the contact sheets."""
        from sdcli import distributed

        plan = self.plan
        everyone = distributed.gather(self.written, plan.state)
        if plan.state is not None:
            counts = distributed.gather([len(self.written)], plan.state)
            if say is not None and plan.is_main:
                say(f"{len(everyone)} images from {plan.state.num_processes} processes "
                    f"(per process: {', '.join(map(str, counts))})")
        if plan.is_main and plan.swept() and self.file is None:
            write_contact_sheets(everyone, self, plan.swept())
        if plan.state is not None:
            # Leave together: a process that exits (tearing down its gloo/NCCL group) while another is still
            # in a collective can abort it (seen once in CI as a SIGABRT of rank 1).
            plan.state.wait_for_everyone()
        return [Path(w["path"]) for w in self.written]

    def emit(self, path: Path, record: dict[str, Any]) -> None:
        """Announce a written file to the front-end, if it asked."""
        if self.announce is not None:
            self.announce(path, record)

    def sheet(self, prompt_index: int) -> Path:
        return self.folder / f"{self.next:05d}-sheet{prompt_index}.png"


def reserve_numbers(folder: Path, count: int) -> int:
    """The first of ``count`` file numbers in ``folder`` that no other run has used or reserved.

    Two runs into one folder used to number from the files each saw at its start, so the
    second one's images collided and were lost. A counter file, read and advanced under an
    exclusive lock (`sdcli.locks`), gives each run its own block of numbers.
    """
    from sdcli.locks import locked

    with locked(folder / COUNTER) as f:
        assert f is not None  # a waiting lock always comes
        text = f.read().strip()
        taken = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"(\d{5,})-", p.name))]
        first = max(max(taken, default=-1) + 1, int(text) if text.isdigit() else 0)
        f.seek(0)
        f.truncate()
        f.write(f"{first + count}\n")
    return first


def emit(path: Path, record: dict[str, Any], json: bool) -> None:
    """`generate`'s result line on stdout: the path, or the path and record as JSON.

    The line and its newline go out in one write: processes of one multi-process run share stdout, and
    print's two writes (text, then end) let another process's line land between them.
    """
    line = jsonlib.dumps({"path": str(path), **record}) if json else str(path)
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def write_trajectory(item: Any, path: Path, writer: ImageWriter) -> None:
    """x̂_0 after every step as a labelled strip and an animated GIF ending on the image."""
    from PIL import Image

    from sdcli.images import labelled_grid, save_gif, save_png

    # A hires fix's first-pass frames are smaller than the image; show every frame at the image's size.
    frames = [f if f.size == item.image.size else f.resize(item.image.size, Image.NEAREST) for f in item.trajectory]
    labels = [f"{i + 1}" for i in range(len(frames))]
    strip = labelled_grid([frames], labels, [""], title=f"predicted x0 per step: {item.job.prompt[:60]}")
    strip_to, gif_to = trajectory_paths(path)
    strip_path = save_png(strip, strip_to, overwrite=writer.overwrite)
    gif_path = save_gif(frames + [item.image], gif_to, overwrite=writer.overwrite)
    for p in (strip_path, gif_path):
        writer.emit(p, {"kind": "trajectory", "image": str(path)})


def trajectory_paths(path: Path) -> tuple[Path, Path]:
    """The strip and the GIF --save-trajectory writes beside the image ``path``."""
    return path.with_name(path.stem + "-trajectory.png"), path.with_name(path.stem + "-trajectory.gif")


def write_contact_sheets(written: list[dict[str, Any]], writer: ImageWriter, swept: list[Any]) -> None:
    """Per prompt: sweep values across, seeds down, the adherence/variety trade-off in one picture."""
    from PIL import Image

    from sdcli.images import save_png

    prompts = list(dict.fromkeys(w["prompt"] for w in written))
    for i, prompt in enumerate(prompts):
        sheet = contact_sheet([(w, Image.open(w["path"])) for w in written if w["prompt"] == prompt], swept)
        path = save_png(sheet, writer.sheet(i), overwrite=writer.overwrite)
        writer.emit(path, {"kind": "contact_sheet", "prompt": prompt})


def contact_sheet(cells: list[tuple[dict[str, Any], Any]], swept: list[Any]) -> Any:
    """One prompt's contact sheet from its (job values, image) cells: the values of the ``swept`` axes
    (`Plan.swept`) across, seeds down (`sdcli serve`'s page makes its sweeps with this too)."""
    from sdcli.images import labelled_grid

    keys = [d.record_key for d in swept]
    columns = list(dict.fromkeys(tuple(v[k] for k in keys) for v, _ in cells))
    seeds = list(dict.fromkeys(v["seed"] for v, _ in cells))
    cell = {(tuple(v[k] for k in keys), v["seed"]): image for v, image in cells}
    rows = [[cell[(c, s)] for c in columns] for s in seeds]
    names = {"guidance": "g", "guidance_rescale": "φ"}
    cols = [" ".join(f"{names.get(k, k)}={v:g}" for k, v in zip(keys, c)) for c in columns]
    return labelled_grid(rows, cols, [f"seed {s}" for s in seeds], title=cells[0][0]["prompt"][:80])
