"""A model as it lies on disk or on the Hub, read without loading any weights: what a --model value names
(a folder, a file or a Hub id), a pipeline folder's model_index.json, any one of its config files, and a
GGUF file's header.

The families (`sdcli.families`) read what a model is from these; `sdcli.pipeline` loads it.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from sdcli.errors import ModelError, UsageError

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}
SINGLE_FILE_SUFFIXES = {".safetensors"} | PICKLE_SUFFIXES
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def local_kind(model: str) -> str:
    """'folder', 'file' or 'hub' for a --model value; raises for paths that do not exist."""
    path = Path(model).expanduser()
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "file"
    # Hub ids are "name" or "owner/name"; anything else the user meant as a path.
    looks_like_path = (
        model.startswith((".", "/", "~", "\\")) or model.count("/") > 1 or path.suffix.lower() in SINGLE_FILE_SUFFIXES
    )
    if looks_like_path or not _HUB_ID.match(model):
        raise ModelError(f"no such model file or folder: {model}")
    return "hub"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"unreadable config {path}: {exc}") from None


def check_folder(path: Path) -> dict[str, Any]:
    """Read model_index.json of a pipeline folder, or explain what the folder is instead."""
    index = path / "model_index.json"
    if not index.is_file():
        hint = ""
        if any(path.glob("*lora*.safetensors")):
            hint = " (it looks like LoRA weights: use --lora)"
        elif (path / "config.json").is_file():
            hint = " (it looks like a single model component, not a whole pipeline)"
        raise ModelError(f"{path} is not a diffusers pipeline folder: no model_index.json{hint}")
    return _read_json(index)


def _config(model: str, name: str, revision: str | None = None) -> dict[str, Any] | None:
    """One config file of a pipeline folder or Hub model, None where there is none (or the Hub cannot say)."""
    kind = local_kind(model)
    if kind == "folder":
        path = Path(model).expanduser() / name
        return _read_json(path) if path.is_file() else None
    if kind == "hub":
        try:
            from huggingface_hub import hf_hub_download

            return _read_json(Path(hf_hub_download(model, name, revision=revision)))
        except Exception:  # noqa: BLE001 - the real load reports the real error
            return None
    return None


def config_or_empty(model: str, name: str, revision: str | None) -> dict[str, Any]:
    """A config file of a pipeline folder or Hub model as a dict; {} when it cannot be had (for estimates, which
    fall back to SD 1.5's figures; the load reports why)."""
    try:
        path = Path(model).expanduser()
        if path.is_dir():
            path = path / name
        elif path.is_file():
            return {}  # a single-file checkpoint carries no config
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, name, revision=revision))
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except Exception:  # noqa: BLE001 - a model without readable configs is estimated as SD 1.5
        return {}


# GGUF files (a denoiser quantized, as ComfyUI-GGUF and stable-diffusion.cpp share them): their header alone.


def model_is_gguf(model: str | None) -> bool:
    return bool(model) and Path(str(model)).suffix.lower() == ".gguf"


@dataclass(frozen=True)
class GgufFacts:
    architecture: str | None  # general.architecture, where the file says (ComfyUI-GGUF and llama.cpp write it)
    names: tuple[str, ...]  # tensor names
    types: tuple[str, ...]  # their GGML types, each once: Q8_0, Q4_K, F32, ...
    nbytes: int  # the file's size


def read_gguf(path: str | Path, flag: str) -> GgufFacts:
    """What a GGUF file holds, from its header alone; UsageError for no gguf package, ModelError for a file that is
    not one or is cut short (a tensor's data past the end of the file)."""
    path = Path(path).expanduser()
    if importlib.util.find_spec("gguf") is None:
        raise UsageError(f"{flag} {path.name}: reading GGUF files needs gguf, which is not installed (pip install gguf)")
    if not path.is_file():
        raise ModelError(f"{flag} {path}: no such file")
    size = path.stat().st_size
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        tensors = list(reader.tensors)
        cut = next((t.name for t in tensors if int(t.data_offset) + int(t.n_bytes) > size), None)
    except Exception as exc:  # noqa: BLE001 - any failure to read the header: not a whole GGUF file
        raise ModelError(f"{flag} {path}: not a readable GGUF file (truncated or corrupt: "
                         f"{' '.join(str(exc).split())[:120] or type(exc).__name__})") from None
    if cut is not None or not tensors:
        raise ModelError(f"{flag} {path}: the GGUF file is truncated (" +
                         (f"tensor {cut} runs past its end)" if cut else "it holds no tensors)"))
    arch = reader.fields.get("general.architecture")
    try:
        architecture = str(arch.contents()) if arch is not None else None
    except Exception:  # noqa: BLE001 - an odd metadata value: the tensor names still tell
        architecture = None
    return GgufFacts(architecture, tuple(t.name for t in tensors),
                     tuple(dict.fromkeys(t.tensor_type.name for t in tensors)), size)


def vae_factor(vae: Mapping[str, Any]) -> int:
    """A VAE's downsampling factor from its config, as diffusers' pipelines compute their ``vae_scale_factor``
    from the VAEs they ship: the ratio it states, a halving per temporal-downsampling entry (Wan-style VAEs: Qwen-
    Image's), or per level but the last (AutoencoderKL's block_out_channels; a deep-compression VAE, Sana's, names
    its levels encoder_block_out_channels); 8 where the config says nothing."""
    if vae.get("spatial_compression_ratio"):
        return int(vae["spatial_compression_ratio"])
    if vae.get("temperal_downsample") is not None:
        return 2 ** len(vae["temperal_downsample"])
    levels = vae.get("block_out_channels") or vae.get("encoder_block_out_channels")
    return 2 ** (len(levels) - 1) if levels else 8
