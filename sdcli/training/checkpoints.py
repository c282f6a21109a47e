"""Checkpoints: written atomically, pruned to the last K, found again for --resume, read without pickle.

A checkpoint holds the trained weights (``model.safetensors``, ``model_1.safetensors``
... one per trained model), the optimizer, lr schedule, gradient scaler and EMA
(tensors in ``NAME.safetensors``, the rest in ``NAME.json``), every process's RNG
(``random_states_<rank>``) and ``sdcli_state.json`` with the step, the settings that
made it and a fingerprint of the base model. Nothing in it is a pickle, so a
checkpoint someone shares cannot run code on resume: reading it builds numbers,
strings, lists and tensors only. Checkpoints from sdcli before this format are
accelerate's pickles (``optimizer.bin``, ``random_states_0.pkl``,
``custom_checkpoint_0.pkl``); they load only with --allow-pickle.

The data order needs no saved state: it is a function of (seed, epoch) and the
step (see `sdcli.training.data`). Each checkpoint is written to a temporary
folder and renamed into place, so a crash mid-write never leaves a checkpoint
that looks complete, and a failed write removes its temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdcli.errors import DataError, OutputError, UsageError
from sdcli.training.lazy import Deferred, LazyTensors, taken  # noqa: F401 - read_tree's; callers find them here too

DIRNAME = "checkpoints"
STATE_FILE = "sdcli_state.json"
FORMAT = 2  # sdcli_state.json without "format": accelerate's save_state, whose state files are pickles
PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth", ".ckpt")
RNG_STEM = "random_states"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Parts:
    """What a checkpoint holds besides the step: the prepared models (the denoiser first), the optimizer,
    the lr schedule and the EMA, if any. ``trainable_only``: LoRA, whose frozen weights come from --model."""

    models: list[Any]
    optimizer: Any
    lr_scheduler: Any
    ema: Any = None
    trainable_only: bool = True


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
        state = json.loads((Path(path) / STATE_FILE).read_text())
        if not isinstance(state, dict) or not isinstance(state.get("config", {}), dict):
            raise ValueError("not a JSON object with a config")
        return state
    except (OSError, ValueError) as exc:
        raise damaged(path, f"unreadable {STATE_FILE}: {exc}") from None


# ---------------------------------------------------------------- which model a checkpoint belongs to


def model_fingerprint(pipe: Any) -> str:
    """A short hash of the pipeline's weights (every tensor's name, shape, dtype and first values), taken
    before any adapter is added: the same model moved to another folder gives the same one, another model
    (even of the same shapes) another. Cheap: a few values per tensor, no full pass over the weights."""
    import torch

    h = hashlib.sha256()
    for name, module in sorted(getattr(pipe, "components", {}).items()):
        if not isinstance(module, torch.nn.Module):
            continue
        for key, tensor in module.state_dict().items():
            if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "dequantize"):
                tensor = tensor.dequantize()  # a quantized weight (QLoRA's base) has no flat view of its own
            sample = tensor.detach().flatten()[:8].to("cpu", torch.float64)
            h.update(f"{name}.{key}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_same_model(path: Path, saved: dict[str, Any], model: str, family: str, fingerprint: str) -> None:
    """Refuse a checkpoint another model made: its family or its base weights differ from --model's."""
    made_by = saved.get("config", {}).get("model")
    theirs = saved.get("family")
    if (theirs is not None and theirs != family) or (saved.get("model_fingerprint") not in (None, fingerprint)):
        raise other_model(path, made_by, theirs, model, family)


def check_fits(path: Path, saved: dict[str, Any], model: str, family: str, models: list[Any],
               trainable_only: bool) -> None:
    """Refuse, from the file headers alone, weights that do not fit the models being trained: a checkpoint
    from before fingerprints were recorded, made for another model."""
    for i, module in enumerate(models):
        file = Path(path) / _model_file(i)
        if not file.is_file():
            continue  # reported as damaged when loaded
        try:
            theirs = {_plain_name(k): tuple(s) for k, s in _safetensors_shapes(file).items()}
        except (OSError, ValueError):
            continue
        mine = _expected(module, trainable_only)
        if theirs.keys() != mine.keys() or any(theirs[k] != mine[k] for k in mine):
            raise other_model(path, saved.get("config", {}).get("model"), saved.get("family"), model, family)


def other_model(path: Path, made_by: str | None, their_family: str | None, model: str, family: str) -> UsageError:
    theirs = ", ".join(x for x in (made_by, their_family) if x) or "not recorded"
    return UsageError(f"--resume {path}: this checkpoint was made for another model ({theirs}), not --model {model} "
                      f"({family}); resume with the model it was made for, or start again without --resume")


def _expected(module: Any, trainable_only: bool) -> dict[str, tuple[int, ...]]:
    if trainable_only:
        return {name: tuple(p.shape) for name, p in module.named_parameters() if p.requires_grad}
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


def _plain_name(key: str) -> str:
    """A parameter name without the wrappers' prefixes (DDP's module., torch.compile's _orig_mod.) that
    accelerate's checkpoints kept."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _safetensors_shapes(file: Path) -> dict[str, list[int]]:
    return {k: t["shape"] for k, t in _safetensors_header(file).items() if k != "__metadata__"}


def _safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read without trusting its length field (a file that is
    something else would ask for petabytes). ValueError if it is not one."""
    with open(file, "rb") as f:
        head = f.read(8)
        (length,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
        if not 0 <= length <= Path(file).stat().st_size - 8:
            raise ValueError(f"{Path(file).name} is not a safetensors file")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{Path(file).name} is not a safetensors file")
    return header


def _model_file(i: int) -> str:
    return "model.safetensors" if i == 0 else f"model_{i}.safetensors"


# ---------------------------------------------------------------- saving


def save_checkpoint(accelerator, out: Path, step: int, state: dict[str, Any], keep: int, parts: Parts) -> Path:
    """Write checkpoint-<step> atomically and drop all but the newest ``keep``; every process must call it.

    A write that fails (a full disk, a read-only folder) removes the temporary folder and says so in one
    line: the earlier checkpoints stay as they were.
    """
    root = Path(out) / DIRNAME
    final = root / f"checkpoint-{step:06d}"
    tmp = root / f".tmp-checkpoint-{step:06d}"
    if final.is_dir() and (final / STATE_FILE).is_file():
        return final  # this step is already saved (Ctrl-C right after a periodic checkpoint)
    main = accelerator.is_main_process
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        write_tree(tmp, f"{RNG_STEM}_{accelerator.process_index}", _rng_state(accelerator))  # each its own
        whole = _parts_state(parts, accelerator)  # every process: under FSDP gathering the shards is collective
        if main:
            _write_parts(tmp, whole)
            (tmp / STATE_FILE).write_text(json.dumps({**state, "format": FORMAT}, indent=2))
        accelerator.wait_for_everyone()
        if main:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
    except BaseException as exc:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        from sdcli.training.outputs import disk_failure

        why = disk_failure(exc) if isinstance(exc, Exception) else None
        if why is not None:
            raise OutputError(f"cannot write checkpoint {final}: {why}; nothing of it was kept") from exc
        raise
    if main:
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _parts_state(parts: Parts, accelerator) -> dict[str, Any]:
    """What `_write_parts` writes: model files by name, then the optimizer, schedule, scaler and EMA state,
    each whole (gathered from every process's shard under FSDP, so the files are the same either way)."""
    from sdcli.training import sharding, zero

    keep = accelerator.is_main_process  # the others take part in gathering and keep nothing
    deepspeed = zero.is_engine(parts.models[0])  # ZeRO's partitions are gathered its own way (zero.py)
    raws = [_raw(accelerator, model) for model in parts.models]
    state: dict[str, Any] = {}
    for i, raw in enumerate(raws):
        trainable = {name for name, p in raw.named_parameters() if p.requires_grad} if parts.trainable_only else None
        state[_model_file(i)] = (zero if deepspeed else sharding).model_state(raw, trainable, keep)
    state["optimizer"] = (zero.optimizer_state(parts.optimizer, zero.trained(raws), keep) if deepspeed
                          else sharding.gathered(parts.optimizer.state_dict(), keep))
    state["scheduler"] = parts.lr_scheduler.state_dict()
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    if parts.ema is not None:
        state["ema"] = (zero.ema_state(parts.ema, zero.trained(raws), keep) if deepspeed
                        else sharding.gathered(parts.ema.state_dict(), keep))
    return state


def _write_parts(folder: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    for name, tree in state.items():
        if name.endswith(".safetensors"):
            save_file(_unshared(tree), str(folder / name))
        else:
            write_tree(folder, name, tree)


def _raw(accelerator, model):
    """The model itself, past DDP and torch.compile's wrapper: its own parameter names."""
    model = accelerator.unwrap_model(model)
    return getattr(model, "_orig_mod", model)


def _unshared(tensors: dict[str, Any]) -> dict[str, Any]:
    """Contiguous CPU tensors, a copy where two share storage (tied weights): safetensors stores each once."""
    seen, result = set(), {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and ptr in seen:
            tensor = tensor.clone()
        seen.add((tensor.untyped_storage().data_ptr(), tensor.storage_offset()))
        result[key] = tensor
    return result


def _rng_state(accelerator) -> dict[str, Any]:
    """Every random generator a step could draw from, and accelerate's micro-step count (it decides
    which micro-batches synchronise under gradient accumulation)."""
    import random

    import numpy as np
    import torch

    state: dict[str, Any] = {"step": accelerator.step, "python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(accelerator, state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    accelerator.step = int(state["step"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "mps" in state and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


# ---------------------------------------------------------------- a state dict as JSON and safetensors


def write_tree(folder: Path, stem: str, tree: Any) -> None:
    """``tree`` (dicts, lists, tuples, numbers, strings, tensors, numpy arrays: what optimizers, schedulers,
    EMA and RNGs return as state) as ``stem.json``, its tensors in ``stem.safetensors``. Reading it back
    (`read_tree`) builds only those types: unlike a pickle, the files cannot name code to run."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    text = json.dumps(_encode(tree, tensors), allow_nan=False)
    save_file(_unshared(tensors), str(Path(folder) / f"{stem}.safetensors"))  # written even when empty: a pair
    (Path(folder) / f"{stem}.json").write_text(text)


def read_tree(folder: Path, stem: str, lazy: bool = False) -> Any:
    """What `write_tree` wrote. ``lazy``: each tensor a `Deferred`, read from the file when taken, so a process
    that keeps only its shard of each (FSDP) never holds the whole file."""
    from safetensors.torch import load_file

    file = str(Path(folder) / f"{stem}.safetensors")
    tensors = LazyTensors(file) if lazy else load_file(file)
    return _decode(json.loads((Path(folder) / f"{stem}.json").read_text()), tensors)


def _encode(value: Any, tensors: dict[str, Any]) -> Any:
    import numpy as np
    import torch

    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return _encode(value.item(), tensors)
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, tensors) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"a checkpoint cannot store a {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, Any]) -> Any:
    import numpy as np

    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        (tag, body), = value.items()
        if tag == "tensor":
            return tensors[body]
        if tag == "float":
            return float(body)
        if tag == "tuple":
            return tuple(_decode(v, tensors) for v in body)
        if tag == "dict":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in body}
    if isinstance(value, dict) and value.keys() == {"ndarray", "dtype", "shape"}:
        return np.array(value["ndarray"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    raise ValueError(f"unknown entry {str(value)[:60]}")


# ---------------------------------------------------------------- loading


def load_checkpoint(accelerator, path: Path, parts: Parts, allow_pickle: bool = False) -> None:
    """Restore everything `save_checkpoint` wrote into the prepared models, optimizer, schedule and EMA.

    Nothing is unpickled: a checkpoint in the older, pickled layout is refused naming its first pickle,
    unless ``allow_pickle`` (then accelerate's `load_state` reads it, trusting its code). A damaged file
    (a disk filled up, a copy cut short) is named before loading.
    """
    path = Path(path)
    pickled = check_unpickled(path, allow_pickle)
    broken = damaged_files(path)
    if broken:
        raise damaged(path, ", ".join(broken) + (" is" if len(broken) == 1 else " are") + " truncated or unreadable")
    if pickled:
        _load_pickled(accelerator, path, parts)
        return
    name = ""
    try:
        from sdcli.training import sharding, zero

        # Every process reads the whole tensors, one at a time; under FSDP (and ZeRO) each keeps only its shard
        # of each (no message is sent), so no process holds a whole file.
        deepspeed = zero.is_engine(parts.models[0])
        raws = [_raw(accelerator, model) for model in parts.models]
        for i, raw in enumerate(raws):
            name = _model_file(i)
            (zero if deepspeed else sharding).load_model_state(
                raw, LazyTensors(str(path / name), deferred=False), strict=not parts.trainable_only)
        name = "optimizer.json"
        if deepspeed:
            zero.load_optimizer_state(parts.optimizer, zero.trained(raws), taken(read_tree(path, "optimizer", lazy=True)))
        else:
            parts.optimizer.load_state_dict(taken(sharding.shard_optimizer_state(
                read_tree(path, "optimizer", lazy=True), parts.optimizer)))
        name = "scheduler.json"
        parts.lr_scheduler.load_state_dict(read_tree(path, "scheduler"))
        if accelerator.scaler is not None and (path / "scaler.json").exists():
            name = "scaler.json"
            accelerator.scaler.load_state_dict(read_tree(path, "scaler"))
        if parts.ema is not None:
            name = "ema.json"
            ema = read_tree(path, "ema", lazy=True)
            parts.ema.load_state_dict(taken(zero.shard_ema_state(ema, zero.trained(raws)) if deepspeed else
                                            sharding.shard_ema_state(ema, sharding.optimizer_params(parts.optimizer))))
            parts.ema.to(accelerator.device)  # loaded on the CPU; the EMA steps where the parameters are
        name = f"{RNG_STEM}_{accelerator.process_index}.json"
        _set_rng_state(accelerator, read_tree(path, f"{RNG_STEM}_{accelerator.process_index}"))
    except Exception as exc:  # noqa: BLE001 - every failure here is a file that does not hold what it should
        from safetensors import SafetensorError

        if not isinstance(exc, (OSError, ValueError, KeyError, TypeError, RuntimeError, IndexError,
                                SafetensorError)):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise damaged(path, f"{name} is unreadable ({first[:200]})") from exc


def check_unpickled(path: Path, allow_pickle: bool) -> bool:
    """Whether ``path`` is in accelerate's pickled layout; refused (naming its first pickle) without
    ``allow_pickle``. Cheap: for `finetune` to call before anything loads."""
    pickled = read_state(path).get("format") != FORMAT
    if pickled and not allow_pickle:
        refuse_pickled(path)
    return pickled


def refuse_pickled(path: Path) -> None:
    """A checkpoint in accelerate's layout (sdcli before checkpoint format 2, or a state file edited to look
    like one): its optimizer, schedule, EMA and RNG are pickles, and unpickling runs whatever code they name."""
    pickles = sorted(p for p in Path(path).iterdir() if p.suffix in PICKLE_SUFFIXES)
    first = pickles[0] if pickles else Path(path) / STATE_FILE
    what = "is a pickle" if pickles else "names no format sdcli reads without pickle"
    raise DataError(f"checkpoint file {first} {what} (an older sdcli's checkpoint, or one someone changed), which "
                    "can run code when loaded; resume it with --allow-pickle only if you trust where it came from")


def _load_pickled(accelerator, path: Path, parts: Parts) -> None:
    import pickle

    if parts.ema is not None:
        accelerator.register_for_checkpointing(parts.ema)
    try:
        accelerator.load_state(str(path), strict=not parts.trainable_only)
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError) as exc:
        raise damaged(path, (str(exc).strip().splitlines() or [type(exc).__name__])[0]) from exc
    if parts.ema is not None:
        parts.ema.to(accelerator.device)


def damaged_files(path: Path) -> list[str]:
    """Files of a checkpoint that are missing or whose ends are missing: safetensors files shorter than
    their header says, JSON that does not parse, pickled archives without their zip directory. Only
    headers and the small JSON files are read, so this is quick."""
    import zipfile

    path = Path(path)
    pickled = read_state(path).get("format") != FORMAT
    names = {p.name for p in path.iterdir()}
    broken = [] if pickled else [n for n in ("model.safetensors", "optimizer.json", "scheduler.json") if n not in names]
    for file in sorted(path.iterdir()):
        if pickled and file.suffix in PICKLE_SUFFIXES and not zipfile.is_zipfile(file):
            broken.append(file.name)
        elif file.suffix == ".safetensors" and not _safetensors_whole(file):
            broken.append(file.name)
        elif file.suffix == ".json" and file.name != STATE_FILE and not _json_whole(file):
            broken.append(file.name)
        if not pickled and file.name != STATE_FILE and not file.name.startswith("model"):
            # write_tree's pairs: stem.json with stem.safetensors
            partner = file.stem + (".safetensors" if file.suffix == ".json" else ".json")
            if file.suffix in (".json", ".safetensors") and partner not in names:
                broken.append(partner)
    return sorted(set(broken), key=broken.index)


def _json_whole(file: Path) -> bool:
    try:
        json.loads(file.read_text())
        return True
    except (OSError, ValueError):
        return False


def _safetensors_whole(file: Path) -> bool:
    try:
        header = _safetensors_header(file)
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
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
