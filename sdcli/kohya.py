"""LoRA files in the kohya layout, which AUTOMATIC1111 and ComfyUI load from their LoRA folders.

A finetune LoRA is trained with peft on diffusers' models, and diffusers' own file keeps those module
paths (``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight``). kohya's
sd-scripts, whose files the other tools read, join the path with underscores under a model prefix and
store one ``lora_down``/``lora_up`` pair and a scalar ``alpha`` per layer::

    lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   (SD 1.x/2.x)
    lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight                (SDXL)
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha          (lora_te1_/lora_te2_ on SDXL)

The UNet is named as kohya names it per family, which is also what every loader agrees on:

- SD 1.x/2.x: diffusers' paths (kohya trains those on a diffusers-shaped UNet). diffusers' SD loader
  reads only these (it has no UNet config at hand to renumber LDM blocks); AUTOMATIC1111 renames them
  to its LDM modules with SD's three blocks per level, which every SD 1.x/2.x model has; ComfyUI maps
  them from the model's config.
- SDXL: Stability's SGM names (``input_blocks``, ``middle_block``, ``output_blocks``), as kohya's SDXL
  UNet has them: AUTOMATIC1111 and ComfyUI match them directly, and diffusers' SDXL loader renumbers
  them with the model's config. `unet_name` computes them from the UNet's config (levels,
  ``layers_per_block``, which levels have attention), not from SDXL's numbers. (diffusers' loader would
  misread one layer SDXL does not have: the upsampler of an up level without attention.)

What differs per model (the prefixes, SGM names or not, ss_base_model_version) is each family's
``kohya`` layout (`sdcli.families`), looked up by the name records give the model (sd1, sd2, sdxl).

DoRA, LoHa and LoKr (`sdcli.adapters`) go in the same names with LyCORIS's tensors (``.dora_scale``,
``.hada_w1_a``..., ``.lokr_w1``...), as kohya's sd-scripts write them with ``--network_module lycoris.kohya``.

Chroma, Z-Image and Qwen-Image LoRAs are read by ComfyUI under diffusers' own module paths with a prefix per
family (``transformer.``, ``diffusion_model.``), each layer's ``.alpha`` beside it: `save_prefixed`.

Everything here is plain data in, plain data out; torch, peft and safetensors are imported only to
build tensors and write the file.
"""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

NETWORK_MODULE = "networks.lora"  # kohya's plain LoRA (LyCORIS and others name their own module)

# diffusers ResnetBlock2D -> LDM ResBlock
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# UNet layers outside the down/mid/up blocks
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
# Where a LoRA key's module path ends, and what kohya calls that tensor: peft's names, then diffusers' two
# spellings; DoRA's magnitude is LyCORIS's dora_scale; LoHa's and LoKr's tensors keep their (LyCORIS) names.
_HALVES = ((".lora_A.weight", "lora_down.weight"), (".lora_B.weight", "lora_up.weight"),
           (".lora.down.weight", "lora_down.weight"), (".lora.up.weight", "lora_up.weight"),
           (".lora_linear_layer.down.weight", "lora_down.weight"), (".lora_linear_layer.up.weight", "lora_up.weight"),
           (".lora_magnitude_vector.weight", "dora_scale"), (".lora_magnitude_vector", "dora_scale"),
           *((f".{name}", name) for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                             "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                             "lokr_t2")))
# What each adapter's layer must hold, as alternatives (LoKr's factors are whole or a product of two).
_COMPLETE = {
    "lora": [("lora_down.weight",), ("lora_up.weight",)],
    "loha": [("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)],
    "lokr": [("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")],
}
NETWORK_MODULES = {"lora": NETWORK_MODULE, "dora": "lycoris.kohya", "loha": "lycoris.kohya",
                   "lokr": "lycoris.kohya"}


class LoraFormat(str, Enum):
    """Which LoRA files a finetune run writes."""

    both = "both"  # diffusers' pytorch_lora_weights.safetensors and OUT/<OUT's name>.safetensors (kohya)
    diffusers = "diffusers"


def file_name(out: Path) -> str:
    """OUT/<OUT's name>.safetensors, the name the LoRA shows under in AUTOMATIC1111 and ComfyUI."""
    name = Path(out).resolve().name or "lora"
    return f"{name}-kohya.safetensors" if name == "pytorch_lora_weights" else f"{name}.safetensors"


# 1. Names -------------------------------------------------------------------------------------------


def _per_level(value: Any, levels: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * levels


def unet_name(path: str, config: Mapping[str, Any]) -> str:
    """A diffusers UNet2DConditionModel module path as the LDM/SGM UNet names it.

    ``input_blocks`` hold conv_in, then per level its ResBlocks (each with its attention as ``.1``) and
    the level's downsampler; ``output_blocks`` hold per up level ``layers_per_block + 1`` ResBlocks, the
    level's last one also its upsampler (``.2`` after an attention, else ``.1``); ``middle_block`` is
    ResBlock, attention, ResBlock. ``config`` is the UNet's config (down/up block types, layers_per_block).
    """
    for prefix, ldm in _TOP.items():
        if path == prefix:
            return ldm
    parts = path.split(".")
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    layers = _per_level(config["layers_per_block"], len(down_types))
    try:
        if parts[0] == "down_blocks":
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            start = 1 + sum(n + 1 for n in layers[:level])
            if kind == "downsamplers" and rest == ["conv"]:
                return f"input_blocks.{start + layers[level]}.0.op"
            if kind in ("resnets", "attentions") and index < layers[level]:
                return _inner(f"input_blocks.{start + index}", kind, rest)
        elif parts[0] == "up_blocks":
            level, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            up_layers = [n + 1 for n in reversed(layers)]
            start = sum(up_layers[:level])
            if kind == "upsamplers" and rest == ["conv"]:
                after = 2 if "Attn" in up_types[level] else 1
                return f"output_blocks.{start + up_layers[level] - 1}.{after}.conv"
            if kind in ("resnets", "attentions") and index < up_layers[level]:
                return _inner(f"output_blocks.{start + index}", kind, rest)
        elif parts[0] == "mid_block":
            kind, index, rest = parts[1], int(parts[2]), parts[3:]
            if kind in ("resnets", "attentions"):
                return _inner(f"middle_block.{2 * index + (kind == 'attentions')}", kind, rest, mid=True)
    except (IndexError, ValueError):
        pass
    raise ValueError(f"no LDM name for the UNet layer {path!r}")


def _inner(block: str, kind: str, rest: list[str], mid: bool = False) -> str:
    inner = ".".join(rest)
    if kind == "attentions":  # diffusers' Transformer2DModel names its layers as LDM's SpatialTransformer does
        return f"{block}.{inner}" if mid else f"{block}.1.{inner}"
    if inner not in _RESNET:
        raise ValueError(f"no LDM name for the ResBlock layer {inner!r}")
    return f"{block}.{_RESNET[inner]}" if mid else f"{block}.0.{_RESNET[inner]}"


def text_encoder_name(path: str) -> str:
    """A CLIP text encoder module path as kohya names it: always under ``text_model.``.

    transformers 5 dropped that level from CLIPTextModel (not from CLIPTextModelWithProjection); kohya,
    AUTOMATIC1111 and ComfyUI expect it, and diffusers' loader removes it again where the model lacks it.
    """
    return path if path.startswith(("text_model.", "text_projection")) else f"text_model.{path}"


def layout(family: str) -> Any:
    """The kohya layout (`sdcli.families.base.KohyaLayout`) of the model records call ``family``; ValueError for
    one without (SD3 and Flux LoRAs stay diffusers-only)."""
    from sdcli.families import BY_NAME, kohya_layout

    found = kohya_layout(family)
    if found is None:
        names = [name for name, f in BY_NAME.items() if name in f.kohya]
        raise ValueError(f"no kohya LoRA layout for {family!r}; families: {', '.join(names)}")
    return found


# 2. Tensors -----------------------------------------------------------------------------------------


def _split(key: str) -> tuple[str, str]:
    """(module path, kohya's name for the tensor) of one adapter key of peft's or diffusers' state dict."""
    for suffix, name in _HALVES:
        if key.endswith(suffix):
            return key[: -len(suffix)], name
    raise ValueError(f"not a LoRA weight (nor DoRA, LoHa or LoKr): {key!r}")


def _kind(names) -> str:
    return "loha" if any(n.startswith("hada_") for n in names) else "lokr" if any(
        n.startswith("lokr_") for n in names) else "lora"


def _lyco_tensors(params: dict[str, Any], alpha: float, rank: int | None) -> dict[str, Any]:
    """One layer's tensors as LyCORIS stores them: DoRA's magnitude as dora_scale (out, 1, ...), as LyCORIS's
    wd_on_output keeps it; a LoKr with no decomposed factor has no alpha scaling in LyCORIS (AUTOMATIC1111 and
    ComfyUI apply it at 1), so peft's alpha / r goes into its first factor."""
    out = {name: tensor.contiguous() for name, tensor in params.items()}
    if "dora_scale" in out:
        down = out["lora_down.weight"]
        out["dora_scale"] = out["dora_scale"].reshape(-1, *[1] * (down.ndim - 1)).contiguous()
    if _kind(out) == "lokr" and "lokr_w1_b" not in out and "lokr_w2_b" not in out:
        if rank is None:
            raise ValueError("a LoKr with whole factors needs its peft rank (ranks=) for its scale")
        out["lokr_w1"] = (out["lokr_w1"] * (alpha / rank)).contiguous()
    return out


def convert(layers: Mapping[str, Mapping[str, Any]], alphas: Mapping[str, float], unet_config: Mapping[str, Any],
            family: str, ranks: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The kohya state dict of an adapter: per layer ``<name>.lora_down.weight``, ``.lora_up.weight`` (and
    ``.dora_scale`` for DoRA), or LyCORIS's ``.hada_w1_a``... (LoHa) or ``.lokr_w1``... (LoKr), and ``.alpha``.

    ``layers`` maps "unet", "text_encoder" (and "text_encoder_2" on SDXL) to that model's adapter state dict,
    keyed the way peft's ``get_peft_model_state_dict`` or diffusers' files key it (no model prefix);
    ``alphas`` gives each model's alpha, as the scale alpha / rank means in all three tools (``ranks``: each
    model's peft rank, which a LoKr with whole factors needs); ``unet_config`` (the UNet's config) numbers
    SDXL's blocks. Each alpha is a 0-dim float32 tensor, as kohya stores it.
    """
    import torch

    found = layout(family)
    prefixes = found.prefixes
    out: dict[str, Any] = {}
    for model, state in layers.items():
        if model not in prefixes:
            raise ValueError(f"{family} has no {model!r} for a kohya LoRA; models: {', '.join(prefixes)}")
        per_layer: dict[str, dict[str, Any]] = {}
        for key, tensor in state.items():
            path, name = _split(key)
            per_layer.setdefault(path, {})[name] = tensor
        for path, params in per_layer.items():
            kind = _kind(params)
            missing = [alts[0] for alts in _COMPLETE[kind] if not any(a in params for a in alts)]
            if missing:
                raise ValueError(f"{model} layer {path!r} has {', '.join(sorted(params))} without its other half "
                                 f"({missing[0]})")
            if model != "unet":
                path = text_encoder_name(path)
            elif found.sgm_unet:
                path = unet_name(path, unet_config)
            name = f"{prefixes[model]}_{path.replace('.', '_')}"
            if f"{name}.alpha" in out:
                raise ValueError(f"two {model} layers are both named {name}")
            rank = ranks[model] if ranks is not None else None
            for key, tensor in _lyco_tensors(params, float(alphas[model]), rank).items():
                out[f"{name}.{key}"] = tensor
            out[f"{name}.alpha"] = torch.tensor(float(alphas[model]), dtype=torch.float32)
    return out


# 3. Metadata ----------------------------------------------------------------------------------------


def metadata(family: str, rank: int, alpha: float, output_name: str, v_prediction: bool = False,
             base_model: str | None = None, training: Mapping[str, Any] | None = None,
             adapter: str = "lora") -> dict[str, str]:
    """kohya's ``ss_*`` metadata (strings, as safetensors stores them) for what sdcli knows of a run.

    AUTOMATIC1111 tells the family by ``ss_base_model_version`` (sdxl_...) and ``ss_v2``, and shows
    ``ss_output_name`` as the LoRA's alias; ``training`` adds kohya's fields for the run's settings
    (see `training_fields`).
    """
    from sdcli import __version__

    found = layout(family)
    version = found.version + ("_v" if v_prediction and found.v_suffix else "")
    meta: dict[str, Any] = {
        "ss_network_module": NETWORK_MODULES[adapter], "ss_network_dim": int(rank), "ss_network_alpha": float(alpha),
        "ss_base_model_version": version, "ss_v2": found.v2, "ss_v_parameterization": bool(v_prediction),
        "ss_output_name": output_name,
        "ss_training_comment": f"sdcli {__version__} finetune; every setting is in training_settings.json",
    }
    if adapter != "lora":  # LyCORIS's own record of what it trained
        algo = {"dora": "lora", "loha": "loha", "lokr": "lokr"}[adapter]
        meta["ss_network_args"] = json.dumps({"algo": algo, **({"dora_wd": "True"} if adapter == "dora" else {})})
    if base_model:
        meta["ss_sd_model_name"] = base_model
    meta.update(training or {})
    return {key: str(value) for key, value in meta.items()}


def training_fields(cfg: Any) -> dict[str, Any]:
    """kohya's names for the finetune settings that have one (a FinetuneConfig, or anything with its fields)."""
    optimizer = "bitsandbytes.optim.AdamW8bit" if cfg.use_8bit_adam else "torch.optim.AdamW"
    fields = {
        "ss_learning_rate": cfg.lr, "ss_lr_scheduler": cfg.lr_scheduler, "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_optimizer": f"{optimizer}(weight_decay={cfg.weight_decay:g})", "ss_max_grad_norm": cfg.max_grad_norm,
        "ss_gradient_accumulation_steps": cfg.gradient_accumulation, "ss_batch_size_per_device": cfg.batch_size,
        "ss_gradient_checkpointing": cfg.gradient_checkpointing, "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": cfg.seed, "ss_caption_dropout_rate": cfg.uncond_prob, "ss_noise_offset": cfg.noise_offset,
        "ss_flip_aug": cfg.flip, "ss_random_crop": not cfg.center_crop, "ss_cache_latents": cfg.cache,
        # Buckets and captions, as kohya's train_util names them.
        "ss_enable_bucket": cfg.buckets, "ss_bucket_no_upscale": not cfg.upscale,
        "ss_shuffle_caption": cfg.shuffle_captions, "ss_keep_tokens": cfg.keep_tokens,
        "ss_caption_extension": cfg.caption_extension,
    }
    if cfg.buckets and cfg.min_bucket:
        fields["ss_min_bucket_reso"] = cfg.min_bucket
    if cfg.buckets and cfg.max_bucket:
        fields["ss_max_bucket_reso"] = cfg.max_bucket
    if cfg.resolution:
        fields["ss_resolution"] = (max(cfg.resolutions), max(cfg.resolutions))
    if cfg.snr_gamma is not None:
        fields["ss_min_snr_gamma"] = cfg.snr_gamma
    if cfg.debiased_loss:
        fields["ss_debiased_estimation"] = True
    if cfg.max_steps is not None:
        fields["ss_max_train_steps"] = cfg.max_steps
    return fields


# 4. From trained models to a file -------------------------------------------------------------------


def peft_alpha(config: Any) -> float:
    """The alpha that gives peft's scale as alpha / rank (rsLoRA scales by alpha / sqrt(rank); LoHa and LoKr
    name it alpha)."""
    if not hasattr(config, "lora_alpha"):
        return float(config.alpha)
    return config.lora_alpha * math.sqrt(config.r) if getattr(config, "use_rslora", False) else config.lora_alpha


def adapter_kind(config: Any) -> str:
    """The adapter a peft config trains: lora, dora, loha or lokr (`sdcli.adapters.Adapter`'s values)."""
    name = type(config).__name__
    if name == "LoHaConfig":
        return "loha"
    if name == "LoKrConfig":
        return "lokr"
    return "dora" if getattr(config, "use_dora", False) else "lora"


def save(path: Path, family: str, models: Mapping[str, Any], unet_config: Mapping[str, Any], output_name: str,
         v_prediction: bool = False, base_model: str | None = None, cfg: Any = None) -> Path:
    """Write the kohya file of peft-adapted ``models`` ({"unet": unet, "text_encoder": ..., ...}) to ``path``."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    configs = {name: model.peft_config["default"] for name, model in models.items()}
    for name, config in configs.items():
        if config.rank_pattern or config.alpha_pattern:
            raise ValueError(f"{name}: a LoRA with per-layer ranks or alphas has no single ss_network_dim/alpha")
    layers = {name: get_peft_model_state_dict(model) for name, model in models.items()}
    alphas = {name: peft_alpha(config) for name, config in configs.items()}
    tensors = convert(layers, alphas, unet_config, family, ranks={name: c.r for name, c in configs.items()})
    first = configs["unet"] if "unet" in configs else next(iter(configs.values()))
    if base_model and Path(base_model).exists():
        base_model = Path(base_model).resolve().name  # as kohya does: a file or folder by its name; a Hub id whole
    meta = metadata(family, first.r, peft_alpha(first), output_name, v_prediction, base_model,
                    training_fields(cfg) if cfg is not None else None, adapter=adapter_kind(first))
    save_file(tensors, str(path), metadata=meta)
    return path


def save_prefixed(path: Path, prefix: str, model: Any, family: str, output_name: str, base_model: str | None = None,
                  cfg: Any = None, alphas: bool = True) -> Path:
    """Write the LoRA of a peft-adapted transformer in the layout ComfyUI loads for a family whose LoRAs it maps
    by diffusers' module paths under ``prefix`` (`sdcli.families.Family.comfy_lora_prefix`)::

        diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight   (Qwen-Image; Z-Image: layers.0.attention...)
        diffusion_model.transformer_blocks.0.attn.to_q.lora_B.weight
        diffusion_model.transformer_blocks.0.attn.to_q.alpha           (0-dim float32)

    ComfyUI reads peft's ``lora_A``/``lora_B`` names and scales by the ``.alpha`` beside them (diffusers' own file
    keeps alpha in its metadata, which ComfyUI does not read). DoRA, LoHa and LoKr keep LyCORIS's tensor names, as
    `convert` writes them. The ``ss_*`` metadata is kohya's, for the tools that show it.

    ``alphas`` False (`Family.comfy_lora_alpha`): a LoRA's alpha / rank goes into ``lora_B`` and no ``.alpha`` is
    written, which ComfyUI and diffusers both apply at scale 1 (diffusers' FLUX.2 loader refuses alpha tensors).
    """
    import torch
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = model.peft_config["default"]
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("a LoRA with per-layer ranks or alphas has no single ss_network_dim/alpha")
    alpha = float(peft_alpha(config))
    per_layer: dict[str, dict[str, Any]] = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        module, name = _split(key)
        per_layer.setdefault(module, {})[name] = tensor
    peft_halves = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
    kind = adapter_kind(config)
    fold = not alphas and kind == "lora"
    tensors: dict[str, Any] = {}
    for module, params in per_layer.items():
        for name, tensor in _lyco_tensors(params, alpha, config.r).items():
            if fold and name == "lora_up.weight":
                tensor = (tensor * (alpha / config.r)).contiguous()
            tensors[f"{prefix}{module}.{peft_halves.get(name, name)}"] = tensor
        if not fold:
            tensors[f"{prefix}{module}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    if fold:
        alpha = float(config.r)  # what the file now means: scale 1
    if base_model and Path(base_model).exists():
        base_model = Path(base_model).resolve().name
    from sdcli import __version__

    meta: dict[str, Any] = {
        "ss_network_module": NETWORK_MODULES[kind], "ss_network_dim": int(config.r), "ss_network_alpha": alpha,
        "ss_base_model_version": family, "ss_output_name": output_name,
        "ss_training_comment": f"sdcli {__version__} finetune; every setting is in training_settings.json",
        **({"ss_sd_model_name": base_model} if base_model else {}),
        **(training_fields(cfg) if cfg is not None else {}),
    }
    save_file(tensors, str(path), metadata={key: str(value) for key, value in meta.items()})
    return path


def read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A kohya file's tensors and metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})
