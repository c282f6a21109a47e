"""A denoiser from a file of its own (`--transformer`/`--unet FILE`) into the base pipeline `--model` names.

What people download for FLUX.2, Chroma, Z-Image and Qwen-Image (and Flux.1, SD3) is the transformer alone: the
files in ComfyUI's ``diffusion_models/`` folder, in the original code's tensor names or diffusers', often under
ComfyUI's ``model.diffusion_model.`` prefix, in bfloat16 or in float8 (``*_fp8_e4m3fn``, ``*_fp8mixed``, the latter
with a scale per weight), or quantized as GGUF (`sdcli.quantize`). diffusers loads each with
``<Transformer class>.from_single_file(file, config=<base pipeline>, subfolder="transformer")``; this module reads
a safetensors file's header to say, before anything loads, which family's denoiser it is (`check`), and loads it
(`load`) with what diffusers leaves to the caller done first: the prefix taken off (diffusers' converters strip it
for some families only, and never from a file already in its own names), ComfyUI's scaled float8 weights
multiplied by their scales (diffusers would drop the scales and load wrong weights without a word), and the
tensors checked against the model before they load (diffusers leaves missing ones empty).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdcli.errors import ModelError, UsageError

SUFFIXES = (".safetensors", ".gguf")
# What ComfyUI (and the original training code) put before a denoiser's tensor names in a saved file.
PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# ComfyUI's scaled float8: a weight's scale beside it (weight_scale, or scale_weight in its older files), and the
# input scales and format notes its own fp8 kernels read, which the weights do without.
SCALES = (".weight_scale", ".scale_weight")
COMFY_EXTRAS = (".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2")
FLOAT8 = ("F8_E4M3", "F8_E5M2")
LDM_UNET = "model.diffusion_model."  # where diffusers' converter of an original (LDM) UNet looks for it
FAMILIES_TAKING_FILES = "Stable Diffusion, SDXL, SD3, Flux.1, FLUX.2, Chroma, Z-Image and Qwen-Image"


@dataclass(frozen=True)
class FileFacts:
    """What a safetensors denoiser holds, from its header alone (the shape `sdcli.families.gguf_family` reads)."""

    names: tuple[str, ...]  # tensor names, the prefix taken off
    dtypes: dict[str, str]  # name -> safetensors dtype (BF16, F8_E4M3, U8, ...)
    nbytes: int
    architecture: str | None = None  # a GGUF file may say; a safetensors one does not

    @property
    def float8(self) -> bool:
        return any(d in FLOAT8 for d in self.dtypes.values())


def is_gguf(path: str | Path) -> bool:
    return Path(str(path)).suffix.lower() == ".gguf"


def read_safetensors(path: str | Path, flag: str) -> FileFacts:
    """The tensor names and dtypes of a safetensors file, from its header; ModelError for a file that is not one."""
    import json
    import struct

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"{flag} {path}: no such file")
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, 100_000_000):
                raise ValueError("header length past the end of the file")
            header = json.loads(f.read(length))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except Exception as exc:  # noqa: BLE001 - any failure to read the header: not a whole safetensors file
        raise ModelError(f"{flag} {path}: not a readable safetensors file ("
                         f"{' '.join(str(exc).split())[:120] or type(exc).__name__})") from None
    if not tensors:
        raise ModelError(f"{flag} {path}: the file holds no tensors")
    if 8 + length + end > size:
        raise ModelError(f"{flag} {path}: the safetensors file is truncated (its tensors run past its end)")
    names = {_unprefixed(k): v["dtype"] for k, v in tensors.items()}
    return FileFacts(tuple(names), names, size)


def _unprefixed(name: str) -> str:
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def check(path: str, family: Any, model: str, flag: str, identify: Any) -> Any:
    """Refuse, before loading, a denoiser file that cannot go into ``model`` (of ``family``), one line each: a family
    that takes none, a file neither safetensors nor GGUF, one of no known denoiser or of another family's
    (``identify(facts)`` names the family its tensors are of: `sdcli.families.gguf_family`), weights packed in a
    format diffusers cannot read. Returns the file's facts."""
    from sdcli.configs import read_gguf

    if not family.gguf_markers:
        raise UsageError(f"{flag} {path}: sdcli loads a denoiser file into {FAMILIES_TAKING_FILES} models, and "
                         f"--model {model} is none of them", setting="denoiser_file")
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise UsageError(f"{flag} {path}: give the denoiser as a .safetensors or .gguf file (a pickled "
                         f"{suffix or 'file'} can run code when loaded; convert it to safetensors)",
                         setting="denoiser_file")
    facts = read_gguf(path, flag) if suffix == ".gguf" else read_safetensors(path, flag)
    theirs = identify(facts)
    if theirs is None:
        raise ModelError(f"{flag} {path}: its tensors are no denoiser sdcli knows"
                         + (f" (architecture {facts.architecture})" if facts.architecture else
                            " (a whole checkpoint, a LoRA or a VAE goes elsewhere: --model, --lora, --vae)"),
                         setting="denoiser_file")
    if theirs is not family:
        raise ModelError(f"{flag} {path}: the file holds a {theirs.denoiser} of the {theirs.name} family, and --model "
                         f"{model} is of the {family.name} family; give a file made from a {family.name} model",
                         setting="denoiser_file")
    if isinstance(facts, FileFacts):
        packed = next((n for n, d in facts.dtypes.items() if n.endswith(".weight") and d in ("U8", "I8")), None)
        if packed is not None:
            raise ModelError(f"{flag} {path}: its weights are packed in a quantized format diffusers cannot load "
                             f"({packed} is {facts.dtypes[packed]}: NVFP4/MXFP or int8); use the model's bf16, fp8 "
                             "or GGUF file", setting="denoiser_file")
    return facts


def load(path: str, base: str, subfolder: str, class_name: str, dtype: Any, flag: str) -> Any:
    """The ``subfolder`` model (a ``class_name``) of the pipeline at ``base`` (folder or Hub id: its config), its
    weights from the safetensors file ``path`` in ``dtype`` (float8 weights upcast, scaled ones scaled first)."""
    import diffusers
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES
    from safetensors.torch import load_file

    cls = getattr(diffusers, class_name, None)
    if cls is None or class_name not in SINGLE_FILE_LOADABLE_CLASSES:
        raise ModelError(f"{flag} {path}: diffusers loads no {class_name} from a single file", setting="denoiser_file")
    state = _descaled({_unprefixed(k): v for k, v in load_file(str(Path(path).expanduser())).items()}, dtype)
    if subfolder == "unet" and any(k.startswith("input_blocks.") for k in state):
        state = {LDM_UNET + k: v for k, v in state.items()}  # diffusers' LDM converter reads it under its prefix
    config = cls.load_config(base, subfolder=subfolder)
    expected = _expected_names(cls, config)
    if set(state) != expected:
        convert = SINGLE_FILE_LOADABLE_CLASSES[class_name]["checkpoint_mapping_fn"]
        try:
            state = convert(checkpoint=state, config=config)
        except Exception as exc:  # noqa: BLE001 - diffusers' converters fail on a missing original name
            raise ModelError(f"{flag} {path}: its tensors do not make a {class_name} (diffusers' conversion failed: "
                             f"{type(exc).__name__} {' '.join(str(exc).split())[:100]})", setting="denoiser_file")
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            what = (f"lacks {len(missing)} of its tensors ({missing[0]}, ...)" if missing else
                    f"has {len(extra)} tensors it has no place for ({extra[0]}, ...)")
            raise ModelError(f"{flag} {path}: the file {what} for --model {base}'s {subfolder}; is it another variant "
                             "of the model?", setting="denoiser_file")
    try:
        return cls.from_single_file(state, config=base, subfolder=subfolder, torch_dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - a shape that does not fit the base model's config
        raise ModelError(f"{flag} {path}: does not fit --model {base}'s {subfolder}: "
                         f"{' '.join(str(exc).split())[:200]}", setting="denoiser_file") from exc


def _expected_names(cls: Any, config: dict[str, Any]) -> set[str]:
    """The tensor names of a ``cls`` made from ``config``, built on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = cls.from_config(config)
    return set(model.state_dict())


def _descaled(state: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """ComfyUI's scaled float8 weights as the weights they stand for (stored × scale, in ``dtype``), and the tensors
    only its kernels read dropped; a file without scales as it is."""
    import torch

    scales = [k for k in state if k.endswith(SCALES)]
    for key in scales:
        scale, weight_key = state.pop(key).float(), key.rsplit(".", 1)[0] + ".weight"
        weight = state.get(weight_key)
        if weight is None:
            continue
        if scale.numel() not in (1, weight.shape[0]):
            raise ModelError(f"{weight_key}: a scale of shape {tuple(scale.shape)} for a weight of shape "
                             f"{tuple(weight.shape)}, which sdcli cannot apply", setting="denoiser_file")
        scale = scale.reshape(-1, *([1] * (weight.dim() - 1))) if scale.numel() > 1 else scale.reshape(())
        state[weight_key] = (weight.to(torch.float32) * scale).to(dtype)
    return {k: v for k, v in state.items() if not k.endswith(COMFY_EXTRAS) and k != "scaled_fp8"}
