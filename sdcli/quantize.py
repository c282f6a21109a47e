"""Big models on small cards: quantized weights, GGUF files, offloading, fp8 storage and step caches.

Every mode here is diffusers' own: `PipelineQuantizationConfig` with torchao's or bitsandbytes' configs
(`--quantize`), `GGUFQuantizationConfig` for a GGUF denoiser (`--transformer`/`--unet FILE.gguf`, or
`--model FILE.gguf`), layerwise casting (`--storage-dtype float8`), model, sequential and group offloading
(`--offload`), and the denoiser caches First Block Cache, TaylorSeer and MagCache (`--cache`). This module
says what each mode is (its backend, its bytes per weight for `sdcli.memory`, whether it needs CUDA),
refuses in one line what cannot run here before anything loads (`check_load`, `check_cache`), and builds
what diffusers takes (`quantization_config`, `load_gguf_denoiser`, `apply_storage`, `apply_offload`,
`cache_config`). Which families take a cache or a GGUF file is family data (`sdcli.families.base.Family`:
``caches``, ``gguf_markers``). torch, diffusers and the backends are imported where they are used.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from sdcli.configs import GgufFacts, model_is_gguf, read_gguf  # noqa: F401 - callers find them here too
from sdcli.errors import UsageError

# 1. The quantization modes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """One `--quantize` mode: the backend that does it, and what a quantized linear weight costs."""

    backend: str  # torchao or bitsandbytes (also the package to install)
    kind: str  # nf4, int8, int8-weight, int4-weight, fp8
    bytes_per_weight: float  # scales included, as the backend stores them
    cuda_only: bool  # its kernels (or diffusers' quantizer for it) need a CUDA GPU
    trainable: bool = True  # a LoRA can train on it (peft has a layer for it)

    @property
    def spec(self) -> str:
        return f"{self.backend}:{self.kind}"


MODES: tuple[Mode, ...] = (
    Mode("bitsandbytes", "nf4", 0.5 + 4 / 64, True),  # 4 bits, and a float32 absmax per block of 64
    Mode("bitsandbytes", "int8", 1.0 + 4 / 1024, True),  # LLM.int8: a float32 scale per row (rows ~ 1024 and up)
    Mode("torchao", "int8-weight", 1.0 + 4 / 1024, False),  # int8, a scale per output row; computes dequantized
    Mode("torchao", "int4-weight", 0.5 + 4 / 128, True, trainable=False),  # bf16 scale and zero per group of 128
    Mode("torchao", "fp8", 1.0 + 4 / 1024, True),  # float8 e4m3, a scale per row
)
# A mode named without its backend: the backend is the device's (bitsandbytes' LLM.int8 on CUDA, torchao's
# weight-only int8 elsewhere, where bitsandbytes' kernels do not run).
ALIASES = {"torchao:int8": "torchao:int8-weight", "bitsandbytes:int8-weight": None}
KINDS = ("nf4", "int8", "int8-weight", "int4-weight", "fp8")
# torchao's configs diffusers' TorchAoConfig takes (torchao >= 0.15, diffusers' own floor).
TORCHAO_CONFIGS = {"int8-weight": "Int8WeightOnlyConfig", "int4-weight": "Int4WeightOnlyConfig",
                   "fp8": "Float8WeightOnlyConfig"}
TORCHAO_MIN = "0.15.0"


def _by_spec(spec: str) -> Mode | None:
    return next((m for m in MODES if m.spec == spec), None)


def parse_quantize(text: str | None) -> str | None:
    """``--quantize`` as typed ("int8", "torchao:int8-weight"), lower-cased; UsageError for a mode no backend has."""
    if text is None or not str(text).strip():
        return None
    spec = str(text).strip().lower()
    backend, _, kind = spec.rpartition(":")
    if backend:
        full = ALIASES.get(spec, spec)
        if backend not in ("torchao", "bitsandbytes") or full is None or _by_spec(full) is None:
            raise UsageError(f"--quantize {text}: unknown quantization; choose one of {', '.join(KINDS)}, or name the "
                             f"backend: {', '.join(m.spec for m in MODES)}", setting="quantize")
    elif kind not in KINDS:
        raise UsageError(f"--quantize {text}: unknown quantization; choose one of {', '.join(KINDS)} (or "
                         "BACKEND:MODE, e.g. torchao:int8-weight)", setting="quantize")
    return spec


def resolve(spec: str, device: str) -> Mode:
    """The mode ``spec`` (`parse_quantize`'s) runs as on ``device``."""
    spec = parse_quantize(spec) or ""
    if ":" in spec:
        return _by_spec(ALIASES.get(spec, spec))  # type: ignore[return-value]
    if spec == "nf4":
        return _by_spec("bitsandbytes:nf4")  # type: ignore[return-value]
    if spec == "int8":
        return _by_spec("bitsandbytes:int8" if device.startswith("cuda") else "torchao:int8-weight")  # type: ignore
    return _by_spec(f"torchao:{spec}")  # type: ignore[return-value]


def canonical(spec: str | None, device: str) -> str | None:
    """``spec`` as the record keeps it: its backend named, so a replay on another device runs the same mode."""
    return resolve(spec, device).spec if spec else None


def missing_package(mode: Mode) -> str | None:
    """The line saying the backend of ``mode`` is missing or too old, None where it is installed."""
    from importlib import metadata

    if importlib.util.find_spec(mode.backend) is None:
        return f"needs {mode.backend}, which is not installed (pip install {mode.backend})"
    if mode.backend == "torchao":
        from packaging.version import Version

        have = metadata.version("torchao")
        if Version(have) < Version(TORCHAO_MIN):
            return f"needs torchao >= {TORCHAO_MIN} (diffusers' floor), and {have} is installed (pip install -U torchao)"
    return None


def check_mode(spec: str, device: str, flag: str = "--quantize", setting: str = "quantize") -> Mode:
    """The mode ``spec`` is on ``device``, or UsageError in one line: a CUDA-only mode elsewhere, a backend not
    installed."""
    mode = resolve(spec, device)
    if mode.cuda_only and not device.startswith("cuda"):
        raise UsageError(f"{flag} {spec}: {mode.backend}'s {mode.kind} needs a CUDA GPU, and this runs on {device}; "
                         "use --quantize int8-weight (torchao), which runs on the CPU", setting=setting)
    missing = missing_package(mode)
    if missing:
        raise UsageError(f"{flag} {spec} {missing}", setting=setting)
    return mode


# 2. What diffusers takes ------------------------------------------------------------------------------------


def quantization_config(mode: Mode, denoiser: str | None, text_encoders: tuple[str, ...], dtype: Any) -> Any:
    """diffusers' `PipelineQuantizationConfig` quantizing the pipeline attribute ``denoiser`` (None: it comes from
    its own file, loaded apart) and ``text_encoders`` with ``mode``: diffusers' config for diffusers' models,
    transformers' own for the text encoders (the two libraries' configs are different classes)."""
    import diffusers
    import transformers

    mapping: dict[str, Any] = {name: model_quantization(mode, dtype, transformers) for name in text_encoders}
    if denoiser:
        mapping[denoiser] = model_quantization(mode, dtype, diffusers)
    return diffusers.PipelineQuantizationConfig(quant_mapping=mapping)


def model_quantization(mode: Mode, dtype: Any, library: Any) -> Any:
    """``library``'s (diffusers' or transformers': different classes) config quantizing one model with ``mode``."""
    if mode.backend == "torchao":
        import torchao.quantization as ao

        return library.TorchAoConfig(getattr(ao, TORCHAO_CONFIGS[mode.kind])())
    kw: dict[str, Any] = ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
                          if mode.kind == "nf4" else {"load_in_8bit": True})
    return library.BitsAndBytesConfig(**kw)


def is_quantized(model: Any) -> bool:
    """Whether a loaded model holds quantized weights (diffusers/transformers keep its quantizer)."""
    return getattr(model, "hf_quantizer", None) is not None or bool(getattr(model, "is_quantized", False))


def weight_bytes(module: Any) -> int:
    """Bytes ``module``'s parameters and buffers hold as stored: a quantized tensor's own parts (torchao's data and
    scales), not the size of the dtype it computes in."""
    def size(t: Any) -> int:
        flatten = getattr(type(t), "__tensor_flatten__", None)
        if flatten is not None and type(t).__name__ not in ("Parameter", "Tensor"):
            names, _ctx = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()

    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += size(t)
    return total


# 3. GGUF files ------------------------------------------------------------------------------------------------


def load_gguf_denoiser(path: Any, base: str, subfolder: str | None, class_name: str, dtype: Any) -> Any:
    """The denoiser of class ``class_name`` from a GGUF file (or its tensors, read already), its config from ``base``
    (a pipeline folder or Hub id), its quantized weights kept quantized and dequantized layer by layer as they run
    (on the CPU too)."""
    import diffusers

    cls = getattr(diffusers, class_name)
    config = diffusers.GGUFQuantizationConfig(compute_dtype=dtype)
    source = path if isinstance(path, dict) else str(Path(path).expanduser())
    return cls.from_single_file(source, quantization_config=config, config=base, subfolder=subfolder, torch_dtype=dtype)


# 4. Storage dtype and offloading ---------------------------------------------------------------------------

STORAGE_DTYPES = {"float8": "float8_e4m3fn", "float8-e5m2": "float8_e5m2"}
OFFLOADS = ("model", "sequential", "group")


def apply_storage(denoiser: Any, storage: str, dtype: Any) -> None:
    """Layerwise casting: the denoiser's weights stored in ``storage`` (float8), each layer cast up to ``dtype`` only
    while it runs (diffusers skips norms and embeddings, whose precision matters most)."""
    import torch

    denoiser.enable_layerwise_casting(storage_dtype=getattr(torch, STORAGE_DTYPES[storage]), compute_dtype=dtype)


def apply_offload(pipe: Any, offload: str, device: str) -> None:
    """diffusers' offloading: whole models moved to the GPU as each runs (model), every layer as it runs
    (sequential: least memory, slowest), or groups of layers prefetched on a CUDA stream (group)."""
    import torch

    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="leaf_level", use_stream=True)


# 5. Checks before loading -----------------------------------------------------------------------------------


def check_load(values: Mapping[str, Any], device: str, family: Any = None, model: str = "",
               identify: Any = None) -> str | None:
    """Refuse in one line, before any weights load, the at-load modes (`Settings`' or finetune's fields in
    ``values``) that cannot run on ``device`` or together; returns the --quantize spec with its backend named."""
    spec = values.get("quantize")
    file = values.get("denoiser_file")
    gguf_file = file if file and model_is_gguf(file) else None
    storage = values.get("storage_dtype")
    offload = values.get("offload")
    flag = f"--{family.denoiser}" if family is not None else "--transformer"
    if spec and file and not values.get("quantize_text_encoder"):
        why = ("a GGUF file's weights are quantized already" if gguf_file else "sdcli does not quantize a denoiser "
               "read from its own file (diffusers' from_single_file leaves it unquantized); --storage-dtype float8 keeps "
               "its weights in float8, a GGUF file quantized")
        raise UsageError(f"--quantize {spec} with {flag} {Path(file).name}: {why}; add --quantize-text-encoder to "
                         "quantize the text encoders", setting="quantize")
    if values.get("quantize_text_encoder") and not spec:
        raise UsageError("--quantize-text-encoder needs --quantize MODE", setting="quantize_text_encoder")
    if storage and (spec or gguf_file):
        what = f"--quantize {spec}" if spec else f"{flag} {Path(gguf_file).name}"
        raise UsageError(f"--storage-dtype {storage} with {what}: the weights are stored quantized already",
                         setting="storage_dtype")
    if offload and not device.startswith("cuda"):
        raise UsageError(f"--offload {offload} needs a CUDA device (it moves weights between CPU and GPU), and this "
                         f"runs on {device}", setting="offload")
    if offload and values.get("cpu_offload") and offload != "model":
        raise UsageError(f"--offload {offload} with --cpu-offload (model offload): give one", setting="offload")
    if file and family is not None:
        from sdcli import denoiser_file

        denoiser_file.check(file, family, model, flag, identify)
    return check_mode(spec, device).spec if spec else None


# 6. Step caches -------------------------------------------------------------------------------------------

CACHES = ("first-block", "taylorseer", "mag")
FIRST_BLOCK_THRESHOLD = 0.05  # diffusers' default: the first block's residual may change 5 % and be reused


def parse_cache(text: str | None) -> str | None:
    """``--cache`` as typed: first-block[:THRESHOLD], taylorseer or mag; UsageError naming the value otherwise."""
    if text is None or not str(text).strip():
        return None
    spec = str(text).strip().lower()
    kind, _, threshold = spec.partition(":")
    if kind not in CACHES:
        raise UsageError(f"--cache {text}: unknown cache; choose first-block[:THRESHOLD], taylorseer or mag",
                         setting="step_cache")
    if threshold:
        if kind != "first-block":
            raise UsageError(f"--cache {text}: only first-block takes a threshold", setting="step_cache")
        try:
            value = float(threshold)
        except ValueError:
            value = float("nan")
        if not 0 < value <= 1:
            raise UsageError(f"--cache {text}: the threshold must be a number in (0, 1] (the relative change of the "
                             f"first block's output below which the rest is reused; default {FIRST_BLOCK_THRESHOLD})",
                             setting="step_cache")
        spec = f"first-block:{value:g}"
    return spec


def check_cache(spec: str | None, family: Any, model: str) -> None:
    """Refuse a cache diffusers has no hooks for on this family's denoiser (its ``caches``)."""
    if not spec:
        return
    kind = spec.partition(":")[0]
    if kind not in family.caches:
        has = f"it takes {', '.join(family.caches)}" if family.caches else "diffusers has no step cache for its denoiser"
        raise UsageError(f"--cache {spec}: {model} is {family.name}, and {has}", setting="step_cache")


def cache_config(spec: str, family: Any, steps: int) -> Any:
    """diffusers' config for the cache ``spec`` on a ``steps``-step request of ``family``."""
    import diffusers.hooks as hooks

    kind, _, threshold = spec.partition(":")
    if kind == "first-block":
        return hooks.FirstBlockCacheConfig(threshold=float(threshold or FIRST_BLOCK_THRESHOLD))
    if kind == "taylorseer":
        import torch

        # Full steps first, then one in every few; the Taylor factors in float32 (bfloat16 is diffusers' default,
        # for GPU memory; on the CPU float32 costs nothing and keeps the tiny models' images stable).
        return hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=min(3, max(1, steps - 1)),
                                           taylor_factors_dtype=torch.float32)
    from diffusers.hooks import mag_cache

    ratios = getattr(mag_cache, family.mag_ratios)  # calibrated on the family's reference model
    return hooks.MagCacheConfig(mag_ratios=ratios, num_inference_steps=steps)


class StorageDtype(str, Enum):
    float8 = "float8"
    float8_e5m2 = "float8-e5m2"


class Offload(str, Enum):
    model = "model"
    sequential = "sequential"
    group = "group"
