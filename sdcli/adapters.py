"""The adapters finetune trains and generate loads: LoRA, DoRA, LoHa and LoKr, each through peft.

- LoRA (Hu et al. 2021): ΔW = (α/r)·B·A.
- DoRA (Liu et al. 2024): LoRA's update to the direction, each output row's norm a trained magnitude m:
  W' = m · (W + ΔW) / ‖W + ΔW‖ (row-wise).
- LoHa (Hyeon-Woo et al. 2022, FedPara): ΔW = (α/r)·(W1a·W1b) ⊙ (W2a·W2b).
- LoKr (LyCORIS, Yeh et al. 2024): ΔW = s·(W1 ⊗ W2), either factor possibly W·a·W·b of rank r.

diffusers' pipelines load LoRA and DoRA in their own layout and plain LoRA in kohya's; they refuse LoHa and
LoKr and drop kohya's DoRA magnitudes (``dora_scale``) with a warning. Those files are loaded here
(`load_lycoris`): peft's layers of the right kind are injected and made to hold the file's tensors exactly,
with the scale per layer the file's convention gives: peft's alpha / r for sdcli's diffusers-layout files, and
LyCORIS's alpha / dim (1 for a LoKr with neither factor decomposed) for kohya-layout files, as AUTOMATIC1111,
Forge and ComfyUI apply them. The adapters then answer to diffusers' own ``set_adapters``,
``delete_adapters`` and ``unload_lora_weights`` like any LoRA.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

LOHA_PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# Models a diffusers-layout file's keys start with (pipeline attributes).
MODELS = ("unet", "transformer", "text_encoder", "text_encoder_2")


class Adapter(str, Enum):
    """What `sdcli finetune --adapter` trains."""

    lora = "lora"
    dora = "dora"
    loha = "loha"
    lokr = "lokr"


# Which adapters plain diffusers' `pipe.load_lora_weights` reads (LoKr: only a model's `load_lora_adapter`).
DIFFUSERS_LOADS = {Adapter.lora: "pipe.load_lora_weights(OUT)", Adapter.dora: "pipe.load_lora_weights(OUT)",
                   Adapter.lokr: "pipe.<unet|transformer>.load_lora_adapter(OUT, prefix='<unet|transformer>')",
                   Adapter.loha: None}


def peft_config(kind: str, rank: int, alpha: float, targets) -> Any:
    """peft's config for ``kind``: LoRA and DoRA start from Gaussian A and zero B, LoHa and LoKr from peft's
    own initialisation (one factor zero); every one starts as the base model exactly."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    kind = Adapter(kind)
    if kind is Adapter.loha:
        return LoHaConfig(r=rank, alpha=alpha, target_modules=list(targets))
    if kind is Adapter.lokr:
        return LoKrConfig(r=rank, alpha=alpha, target_modules=list(targets))
    return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets),
                      use_dora=kind is Adapter.dora)


def param_of(key: str) -> tuple[str, str] | None:
    """(module key, LyCORIS parameter name) for a LoHa, LoKr or DoRA-magnitude key; None for others."""
    module, _, last = key.rpartition(".")
    if last in LOHA_PARAMS or last in LOKR_PARAMS or last == "dora_scale":
        return module, last
    return None


def needs_sdcli(keys) -> bool:
    """Whether a file holds what diffusers' pipeline loaders refuse or drop (LoHa, LoKr, kohya's DoRA)."""
    return any(param_of(key) for key in keys)


def weight_file(path: str | Path) -> Path | None:
    """The safetensors file a --lora path is: the file, or the one in a folder diffusers would read."""
    path = Path(path)
    if path.is_file():
        return path if path.suffix.lower() == ".safetensors" else None
    preferred = path / "pytorch_lora_weights.safetensors"
    if preferred.is_file():
        return preferred
    found = sorted(path.glob("*.safetensors"))
    return found[0] if len(found) == 1 else None


# 1. Where each key goes ---------------------------------------------------------------------------------


def _targets(pipe: Any, family: Any) -> dict[str, tuple[str, str]]:
    """Every name a file may give an adaptable layer -> (pipeline attribute, module path): diffusers' paths
    under the model's attribute (diffusers' layout) and, for the denoiser, under the family's ComfyUI prefix
    (``diffusion_model.``, ``transformer.``: `Family.comfy_lora_prefix`), and kohya's underscore names under each
    prefix (SGM block names for SDXL's UNet)."""
    import torch

    from sdcli import kohya

    layouts = list(family.kohya.values())
    names: dict[str, tuple[str, str]] = {}
    models = [family.denoiser] + [name for name in family.text_encoders if getattr(pipe, name, None) is not None]
    for attr in models:
        model = getattr(pipe, attr)
        if attr == family.denoiser:
            prefixes = {"lora_unet", "lora_transformer", "lycoris"} | {
                layout.prefixes[attr] for layout in layouts if attr in layout.prefixes}
        else:
            prefixes = {layout.prefixes[attr] for layout in layouts if attr in layout.prefixes}
        sgm = attr == "unet" and any(layout.sgm_unet for layout in layouts)
        dotted_prefixes = {f"{attr}."}
        if attr == family.denoiser and family.comfy_lora_prefix:
            dotted_prefixes.add(family.comfy_lora_prefix)
        for path, module in model.named_modules():
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or ".base_layer" in path:
                continue
            path = path.replace(".base_layer", "")
            for dotted in dotted_prefixes:
                names[f"{dotted}{path}"] = (attr, path)
            spellings = {path}
            if attr == "unet" and sgm:
                try:
                    spellings = {kohya.unet_name(path, model.config)}
                except ValueError:
                    continue
            elif attr != family.denoiser:  # kohya's text_model. level, or the model's own paths (transformers 5)
                spellings = {kohya.text_encoder_name(path), path}
            for prefix in prefixes:
                for spelled in spellings:
                    names[f"{prefix}_{spelled.replace('.', '_')}"] = (attr, path)
    return names


# 2. Loading ---------------------------------------------------------------------------------------------


def load_lycoris(pipe: Any, family: Any, path: str | Path, adapter_name: str) -> bool:
    """Load a LoHa, LoKr or kohya-DoRA file as the adapter ``adapter_name``; False for a file diffusers reads
    itself (LoRA, diffusers' DoRA). ValueError for layers this model does not have."""
    from safetensors import safe_open

    file = weight_file(path)
    if file is None:
        return False
    with safe_open(str(file), framework="pt") as f:
        if not needs_sdcli(f.keys()):
            return False
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        meta = dict(f.metadata() or {})
    names = _targets(pipe, family)
    peft_layout = any(key.split(".", 1)[0] in MODELS for key in tensors)
    scales = _peft_scales(meta) if peft_layout else {}
    layers: dict[tuple[str, str], dict[str, Any]] = {}
    unknown = []
    for key, tensor in tensors.items():
        found = param_of(key)
        if found is None:
            module, _, last = key.rpartition(".")
            if last == "alpha":
                found = (module, "alpha")
            elif key.endswith((".lora_down.weight", ".lora_up.weight")):
                found = (key.rsplit(".", 2)[0], key.rsplit(".", 2)[1])
            elif key.endswith((".lora_A.weight", ".lora_B.weight")):  # peft's halves: a ComfyUI-layout DoRA's
                module, half, _ = key.rsplit(".", 2)
                found = (module, {"lora_A": "lora_down", "lora_B": "lora_up"}[half])
            else:
                unknown.append(key)
                continue
        module, param = found
        if module not in names:
            unknown.append(key)
            continue
        layers.setdefault(names[module], {})[param] = tensor
    if unknown:
        raise ValueError(f"{len(unknown)} of its tensors fit no layer of {type(pipe).__name__} (first: {unknown[0]})")
    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    for (attr, module_path), params in layers.items():
        by_model.setdefault(attr, {})[module_path] = params
    for attr, modules in by_model.items():
        _inject(getattr(pipe, attr), modules, adapter_name, scales.get(attr))
    return True


def _peft_scales(meta: Mapping[str, str]) -> dict[str, tuple[float, float]]:
    """(alpha, r) per model from a diffusers-layout file's ``lora_adapter_metadata`` (peft's scale alpha / r)."""
    try:
        config = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except ValueError:
        config = {}
    out = {}
    for attr in MODELS:
        alpha = config.get(f"{attr}.alpha", config.get(f"{attr}.lora_alpha"))
        rank = config.get(f"{attr}.r")
        if alpha is not None and rank:
            out[attr] = (float(alpha), float(rank))
    return out


def _kind(params: Mapping[str, Any]) -> Adapter:
    if any(p.startswith("hada_") for p in params):
        return Adapter.loha
    if any(p.startswith("lokr_") for p in params):
        return Adapter.lokr
    return Adapter.dora


def _inject(model: Any, modules: Mapping[str, Mapping[str, Any]], adapter_name: str,
            peft_scale: tuple[float, float] | None) -> None:
    """Add peft layers of the file's kind to ``modules`` of ``model`` and set them to the file's tensors."""
    from peft import inject_adapter_in_model

    kinds = {_kind(params) for params in modules.values()}
    if len(kinds) > 1:
        raise ValueError(f"its {type(model).__name__} layers mix {' and '.join(sorted(k.value for k in kinds))}")
    kind = kinds.pop()
    config = peft_config(kind, 1, 1.0, list(modules))
    inject_adapter_in_model(config, model, adapter_name)
    for path, params in modules.items():
        layer = model.get_submodule(path)
        base = layer.get_base_layer().weight
        scale = _layer_scale(kind, params, peft_scale)
        if kind is Adapter.dora:
            _set_dora(layer, adapter_name, params, base, scale)
        else:
            own = LOHA_PARAMS if kind is Adapter.loha else LOKR_PARAMS
            for name in own:
                if adapter_name in getattr(layer, name):
                    del getattr(layer, name)[adapter_name]
                if name in params:
                    getattr(layer, name)[adapter_name] = _param(params[name], base)
            # set_adapters' weight multiplies alpha / r: keep that ratio the file's scale.
            layer.r[adapter_name], layer.alpha[adapter_name] = 1, scale
            layer.scaling[adapter_name] = scale
    if not hasattr(model, "peft_config"):
        model.peft_config = {}
    model.peft_config[adapter_name] = config
    model._hf_peft_config_loaded = True


def _layer_scale(kind: Adapter, params: Mapping[str, Any], peft_scale: tuple[float, float] | None) -> float:
    """The factor ΔW is multiplied by: peft's alpha / r in sdcli's diffusers layout, LyCORIS's alpha / dim in
    kohya's (dim: the rank of a decomposed factor; a LoKr with none decomposed has scale 1)."""
    if peft_scale is not None:
        return peft_scale[0] / peft_scale[1]
    if kind is Adapter.loha:
        dim = params["hada_w1_b"].shape[0]
    elif kind is Adapter.lokr:
        factor = params.get("lokr_w1_b", params.get("lokr_w2_b"))
        if factor is None:
            return 1.0
        dim = factor.shape[0]
    else:
        dim = params["lora_down"].shape[0]
    alpha = params.get("alpha")
    return float(alpha) / dim if alpha is not None else 1.0


def _param(tensor: Any, base: Any) -> Any:
    import torch

    return torch.nn.Parameter(tensor.to(device=base.device, dtype=base.dtype), requires_grad=False)


def _set_dora(layer: Any, adapter_name: str, params: Mapping[str, Any], base: Any, scale: float) -> None:
    """A kohya/LyCORIS DoRA layer: lora_down/up and ``dora_scale``, the norm of each output row (LyCORIS's
    wd_on_output, shape (out, 1)); the older per-input-column magnitude has no peft equivalent."""
    if "lora_down" not in params or "lora_up" not in params or "dora_scale" not in params:
        raise ValueError("a DoRA layer needs lora_down, lora_up and dora_scale")
    magnitude = params["dora_scale"]
    if magnitude.shape[0] != base.shape[0]:
        raise ValueError("its DoRA magnitudes are per input column (LyCORIS wd_on_output=False), which peft's "
                         "DoRA (per output row) cannot apply")
    layer.lora_A[adapter_name].weight = _param(params["lora_down"], base)
    layer.lora_B[adapter_name].weight = _param(params["lora_up"], base)
    own = layer.lora_magnitude_vector[adapter_name].weight  # (out,) for a Linear, (1, out, 1, 1) for a Conv2d
    layer.lora_magnitude_vector[adapter_name].weight = _param(magnitude.reshape(own.shape), base)
    layer.r[adapter_name], layer.lora_alpha[adapter_name] = 1, scale
    layer.scaling[adapter_name] = scale
