"""ControlNet: what `generate --controlnet` parses, checks, loads and records, and the control maps it feeds.

A ControlNet is a trainable copy of the UNet's encoder that reads a control map (edges, depth,
pose) and adds its features to the UNet's skip connections at every step (Zhang et al. 2023,
"Adding Conditional Control to Text-to-Image Diffusion Models"). diffusers runs it in a
ControlNet twin of each task's pipeline (`sdcli.generation.tasks.WithControlNet` picks it);
this module owns the rest. Only the standard library is imported at the top: `--help` reads
the declarations that use it.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

from sdcli.errors import ModelError, SdcliError, UsageError, about

# AUTOMATIC1111's and diffusers' documented Canny thresholds (of the 8-bit gradient magnitude).
CANNY_LOW, CANNY_HIGH = 100, 200
INSTALL = "pip install 'sdcli[controlnet]' (or opencv-python-headless)"


class Preprocess(str, Enum):
    """How a control image becomes its control map: as given, or its Canny edges."""

    none = "none"
    canny = "canny"


# 1. Parsing and records ---------------------------------------------------------------------------


def parse_controlnet(spec: str) -> tuple[str, float]:
    """'path/or/hub-id:0.8' -> ('path/or/hub-id', 0.8); without a scale, 1.0."""
    from sdcli.generation.parsing import split_scale

    source, scale = split_scale(spec, "--controlnet")
    return str(Path(source).expanduser()) if Path(source).expanduser().exists() else source, scale


def controlnets_to_record(controlnets: list[tuple[str, float]]) -> list[dict[str, Any]]:
    from sdcli.pipeline import absolute_if_local

    return [{"path": absolute_if_local(source), "scale": scale} for source, scale in controlnets]


def controlnets_from_record(value: list[dict[str, Any]] | None) -> list[tuple[str, float]]:
    return [(unit["path"], float(unit["scale"])) for unit in value or []]


def per_controlnet(values: list[str], n: int) -> list[str]:
    """--control-preprocess as one value per ControlNet: none given is none for all, one is for all."""
    if not values:
        return [Preprocess.none.value] * n
    return list(values) * n if len(values) == 1 else list(values)


def a1111_units(record: dict[str, Any]) -> list[str]:
    """Each ControlNet as AUTOMATIC1111's ControlNet extension writes its unit (the value of "ControlNet i")."""
    units = record.get("controlnets") or []
    modules = per_controlnet(record.get("control_preprocess") or [], len(units))
    out = []
    for unit, module in zip(units, modules):
        fields = [f"Module: {module}", f"Model: {Path(unit['path']).name}", f"Weight: {unit['scale']:g}",
                  "Resize Mode: Just Resize"]
        if module == Preprocess.canny.value:
            fields += [f"Threshold A: {CANNY_LOW}", f"Threshold B: {CANNY_HIGH}"]
        fields += [f"Guidance Start: {record.get('control_start', 0.0):g}",
                   f"Guidance End: {record.get('control_end', 1.0):g}", "Control Mode: Balanced"]
        out.append('"' + ", ".join(fields) + '"')
    return out


# 2. Checks before any weights load ----------------------------------------------------------------


def check_control(s: Any) -> None:
    """The ControlNet settings on their own: counts, fractions, files and the Canny library."""
    from sdcli.images import image_size

    if not s.controlnets:
        for given, flag, name in ((s.control_images, "--control-image", "control_images"),
                                  (s.control_preprocess, "--control-preprocess", "control_preprocess"),
                                  (s.control_start != 0, "--control-start", "control_start"),
                                  (s.control_end != 1, "--control-end", "control_end")):
            if given:
                raise UsageError(f"{flag} needs --controlnet (the ControlNet that reads the control image)",
                                 setting=name)
        return
    n, images = len(s.controlnets), len(s.control_images)
    if images != n:
        raise UsageError(f"give one --control-image per --controlnet, in order: {n} ControlNet{'s' * (n > 1)} "
                         f"but {images} control image{'s' * (images != 1)}", setting="control_images")
    if len(s.control_preprocess) not in (0, 1, n):
        raise UsageError(f"--control-preprocess: give one for every ControlNet or one for each of the {n}, "
                         f"not {len(s.control_preprocess)}", setting="control_preprocess")
    if s.control_start >= s.control_end:
        raise UsageError(f"--control-start {s.control_start:g} must be less than --control-end {s.control_end:g}",
                         setting="control_start")
    if Preprocess.canny.value in s.control_preprocess:
        _opencv()
    for source in s.control_images:
        # there, an image, and under the pixel cap (a path, or a PIL image given in memory)
        image_size(source, what="--control-image", setting="control_images")


def controlnet_config(source: str) -> dict[str, Any] | None:
    """A ControlNet's config.json (None for a Hub id the cache cannot answer); ModelError for what is not one."""
    from sdcli.configs import _config, _read_json, local_kind

    try:
        kind = local_kind(source)
    except ModelError:
        raise ModelError(f"--controlnet {source}: no such folder (and not a Hugging Face Hub id)") from None
    if kind == "file":
        raise ModelError(f"--controlnet {source}: give a diffusers ControlNet folder (config.json and weights) or a "
                         "Hub id; single-file ControlNets are not read")
    if kind == "hub":
        return _config(source, "config.json")
    folder = Path(source).expanduser()
    if not (folder / "config.json").is_file():
        what = "a pipeline folder" if (folder / "model_index.json").is_file() else "a folder without config.json"
        raise ModelError(f"--controlnet {source} is {what}, not a diffusers ControlNet")
    config = _read_json(folder / "config.json")
    if config.get("_class_name") not in (None, "ControlNetModel"):
        raise ModelError(f"--controlnet {source} is a {config['_class_name']}, not a ControlNetModel")
    return config


def _family_words(config: dict[str, Any]) -> str:
    """What a UNet or ControlNet config says it belongs to, in the words users know."""
    if config.get("addition_embed_type") == "text_time":
        return "SDXL"
    width = config.get("cross_attention_dim")
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(width, f"a UNet with {width}-wide cross-attention")


# What a ControlNet must share with the UNet it steers: the text it attends to, SDXL's extra
# embedding, and the widths of the skip connections its residuals are added to.
_MUST_MATCH = ("cross_attention_dim", "addition_embed_type", "block_out_channels")


def check_fits(source: str, controlnet: dict[str, Any], unet: dict[str, Any]) -> None:
    """ModelError if the ControlNet was made for another model family than ``unet``'s."""
    def norm(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    if any(norm(controlnet.get(key)) != norm(unet.get(key)) for key in _MUST_MATCH):
        theirs, ours = _family_words(controlnet), _family_words(unet)
        if theirs == ours:  # the same family name, another shape (a pruned or custom UNet)
            theirs, ours = (f"{w} (skip widths {norm(c.get('block_out_channels'))})" for w, c in
                            ((theirs, controlnet), (ours, unet)))
        raise ModelError(f"--controlnet {source} was made for {theirs}, but the model is {ours}; use a ControlNet "
                         "made for this model's family")


def check_family(s: Any) -> None:
    """Every --controlnet is a ControlNet made for the model's UNet, by their configs alone (no weights load)."""
    from sdcli.families import model_facts
    from sdcli.pipeline import _config, resolve_model

    model = resolve_model(s.model)
    facts = model_facts(model, s.revision)
    if not facts.family.controlnet:
        raise UsageError(f"--controlnet: {facts.class_name} is not a UNet model; sdcli runs ControlNets on "
                         "SD 1.x, SD 2.x and SDXL", setting="controlnets")
    unet = _config(model, "unet/config.json", s.revision)
    for source, _scale in s.controlnets:
        try:
            config = controlnet_config(source)
            if unet is not None and config is not None:
                check_fits(source, config, unet)
        except SdcliError as exc:
            raise about(exc, "controlnets")


# 3. Loading and control maps ----------------------------------------------------------------------


def load_controlnets(s: Any, pipe: Any) -> Any:
    """The ControlNet(s), on the UNet's device and in its dtype: one model, or diffusers' MultiControlNetModel
    holding them in --controlnet order."""
    from diffusers import ControlNetModel, MultiControlNetModel

    from sdcli.pipeline import _load_message

    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise UsageError(f"--controlnet: {type(pipe).__name__} has no UNet; sdcli runs ControlNets on SD 1.x, "
                         "SD 2.x and SDXL", setting="controlnets")
    models = []
    for source, _scale in s.controlnets:
        try:
            model = ControlNetModel.from_pretrained(source, torch_dtype=unet.dtype,
                                                    use_safetensors=None if s.allow_pickle else True)
        except Exception as exc:  # noqa: BLE001 - any failure here is a ControlNet that cannot be used
            raise ModelError(f"--controlnet {_load_message(source, exc)}", setting="controlnets") from exc
        try:  # checked again, loaded: a single-file model has no config to read first
            check_fits(source, dict(model.config), dict(unet.config))
        except SdcliError as exc:
            raise about(exc, "controlnets")
        if getattr(pipe, "_offload_device", None) is None:  # offloaded pipelines place it themselves
            model.to(unet.device)
        models.append(model)
    return models[0] if len(models) == 1 else MultiControlNetModel(models)


def control_maps(s: Any, size: tuple[int, int]) -> list[Any]:
    """Each --control-image at ``size`` (width, height), as its --control-preprocess makes it (RGB PIL)."""
    from PIL import Image

    from sdcli.images import open_image

    maps = []
    for source, module in zip(s.control_images, per_controlnet(s.control_preprocess, len(s.control_images))):
        image = open_image(source, what="--control-image", setting="control_images")
        if image.size != size:  # what diffusers' control image processor would do: a Lanczos stretch
            image = image.resize(size, Image.LANCZOS)
        maps.append(canny(image) if module == Preprocess.canny.value else image)
    return maps


def canny(image: Any) -> Any:
    """Canny's edges (1986) of an RGB image as a white-on-black RGB map, at A1111's default thresholds."""
    import numpy as np
    from PIL import Image

    edges = _opencv().Canny(np.asarray(image), CANNY_LOW, CANNY_HIGH)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def _opencv() -> Any:
    try:
        import cv2
    except ImportError:
        raise UsageError(f"--control-preprocess canny needs OpenCV, which is not installed: {INSTALL}",
                         setting="control_preprocess") from None
    return cv2


def first_image_size(s: Any, factor: int) -> tuple[int, int]:
    """The output size a ControlNet text-to-image takes from its first control image: -W/-H where given,
    else the image's sides cut down to multiples of ``factor`` (as img2img does with its init image)."""
    from sdcli.errors import DataError
    from sdcli.images import image_size, named

    iw, ih = image_size(s.control_images[0], what="--control-image", setting="control_images")
    width, height = s.width or iw - iw % factor, s.height or ih - ih % factor
    if width < factor or height < factor:
        raise DataError(f"--control-image: {named(s.control_images[0])} is too small ({iw}x{ih})",
                        setting="control_images")
    return width, height
