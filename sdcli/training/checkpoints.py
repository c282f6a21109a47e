"""Checkpoints: written atomically, pruned to the last K, found again for --resume.

A checkpoint is `accelerator.save_state` (weights, optimizer, lr scheduler,
grad scaler, EMA, every process's RNG) plus `sdcli_state.json` with the step
and the settings that made it. The data order needs no saved state: it is a
function of (seed, epoch) and the step (see `sdcli.training.data`). Each is
written to a temporary folder and renamed into place, so a crash mid-write
never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

from sdcli.errors import DataError, UsageError

DIRNAME = "checkpoints"
STATE_FILE = "sdcli_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints under OUT, oldest first."""
    root = Path(out) / DIRNAME
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_resume(resume: str, out: Path) -> Path:
    """The checkpoint folder --resume names: 'latest' under OUT, or a path."""
    if resume == "latest":
        found = checkpoint_dirs(out)
        if not found:
            raise UsageError(f"--resume latest: no checkpoint in {Path(out) / DIRNAME}")
        return found[-1]
    path = Path(resume).expanduser()
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"--resume {resume}: not a sdcli checkpoint folder (no {STATE_FILE})")
    return path


def read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise damaged(path, f"unreadable {STATE_FILE}: {exc}") from None


def keep_trainable_only(accelerator) -> None:
    """Save only the trained parameters of each model (LoRA: a few MB instead of the whole UNet).

    Loading then needs ``strict=False``, since the frozen weights come from --model.
    """

    def hook(models, weights, output_dir):
        for i, model in enumerate(models):
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in trainable}

    accelerator.register_save_state_pre_hook(hook)


def save_checkpoint(accelerator, out: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint-<step> atomically and drop all but the newest ``keep``; every process must call it."""
    root = Path(out) / DIRNAME
    final = root / f"checkpoint-{step:06d}"
    tmp = root / f".tmp-checkpoint-{step:06d}"
    if final.is_dir() and (final / STATE_FILE).is_file():
        return final  # this step is already saved (Ctrl-C right after a periodic checkpoint)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # each process writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, trainable_only: bool) -> None:
    """Restore everything `save_checkpoint` wrote into the prepared models and optimizer.

    A damaged file (a disk filled up, a copy cut short) is named before loading: accelerate
    would stop at the optimizer with a zip-reader error, or quietly skip the RNG states.
    """
    broken = damaged_files(path)
    if broken:
        raise damaged(path, ", ".join(broken) + (" is" if len(broken) == 1 else " are") + " truncated or unreadable")
    try:
        if trainable_only:
            accelerator.load_state(str(path), strict=False)
        else:
            accelerator.load_state(str(path))
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise damaged(path, (str(exc).strip().splitlines() or [type(exc).__name__])[0]) from exc


def damaged_files(path: Path) -> list[str]:
    """Files of a checkpoint whose ends are missing: torch.save archives without their zip directory,
    safetensors files shorter than their header says. Only the ends are read, so this is quick."""
    broken = []
    for file in sorted(Path(path).iterdir()):
        if file.suffix in (".bin", ".pkl", ".pt") and not zipfile.is_zipfile(file):
            broken.append(file.name)
        elif file.suffix == ".safetensors" and not _safetensors_whole(file):
            broken.append(file.name)
    return broken


def _safetensors_whole(file: Path) -> bool:
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        return file.stat().st_size >= 8 + length + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def damaged(path: Path, why: str) -> DataError:
    """The one line for a checkpoint that cannot be resumed: what is wrong, and the earlier ones to use instead."""
    path = Path(path)
    step = _NAME.match(path.name)
    folder = path.parent
    listed = sorted((int(m.group(1)), p) for p in (folder.iterdir() if folder.is_dir() else ())
                    if p.is_dir() and (m := _NAME.match(p.name)))
    earlier = [p for n, p in listed if step and n < int(step.group(1)) and (p / STATE_FILE).is_file()]
    if earlier:
        hint = (f"resume from an earlier one, e.g. --resume {earlier[-1]} "
                f"({folder} holds {', '.join(p.name for _n, p in listed)})")
    else:
        hint = f"{folder} holds no earlier one; start again without --resume"
    return DataError(f"checkpoint {path} is damaged: {why}; {hint}")
