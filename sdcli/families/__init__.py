"""The model families sdcli knows, one module each, and how a model is matched to one.

Each family module (`sd`, `sdxl`, `sd3`, `flux`) holds a `Family` (`sdcli.families.base`): what recognises
its models, their sizes, latents and guidance, how their prompts are read, which settings do nothing on them,
their memory figures, training hooks and LoRA layouts. Everything else in sdcli asks the family of a model
(`family_spec` by class name before loading, `pipe_family` of a pipeline in memory) instead of testing names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcli.errors import ModelError
from sdcli.families import chroma, flux, flux2, qwenimage, sd, sd3, sdxl, zimage
from sdcli.families.base import Family, KohyaLayout

# Most specific first: StableDiffusionXL and StableDiffusion3 before StableDiffusion.
# FLUX.2 and Chroma before Flux.1: their files hold Flux.1's block names too.
FAMILIES: tuple[Family, ...] = (sdxl.FAMILY, sd3.FAMILY, flux2.FAMILY, chroma.FAMILY, flux.FAMILY, zimage.FAMILY,
                                qwenimage.FAMILY, sd.FAMILY)
# What a model without model_index.json (a single-file checkpoint) is taken for until it loads.
SINGLE_FILE = sd.FAMILY
# Each name a record gives a model (`Loaded.family`, finetune's "family"), to its family.
BY_NAME: dict[str, Family] = {name: f for f in FAMILIES for name in (f.variants or (f.name,))}

SUPPORTED = ("sdcli works with Stable Diffusion 1.x/2.x, SDXL, SD3, Flux.1, FLUX.2, Chroma, Z-Image and Qwen-Image "
             "pipelines (diffusers' StableDiffusion*, StableDiffusionXL*, StableDiffusion3*, Flux*, Flux2*, Chroma*, "
             "ZImage* and QwenImage* classes), "
             "and with any other diffusers text-to-image pipeline (AutoPipelineForText2Image's) through its own "
             "arguments")


# 1. Which family --------------------------------------------------------------------------------


def claimed_by(class_name: str | None) -> Family | None:
    """The family that claims a pipeline class name, None where none does."""
    return next((f for f in FAMILIES if class_name and f.claims(str(class_name))), None)


def unclaimed(class_name: str, what: str) -> Family:
    """What a pipeline class no family file claims gets: the generic family, for a diffusers text-to-image
    pipeline whose __call__ sdcli can drive (`sdcli.families.generic`; ModelError naming what it lacks), else a
    ModelError naming ``what``: its model is another architecture (audio, video, custom code), and guessing one of
    ours would fail deep inside or run it wrongly."""
    from sdcli.families import generic

    found = generic.family(class_name, what)
    if found is not None:
        return found
    raise ModelError(f"{what} is a {class_name}; {SUPPORTED}")


def family_spec(class_name: str | None, what: str = "the pipeline") -> Family:
    """The family of a pipeline class name; SD for None (no model_index.json: a single-file checkpoint, which
    `single_file_class` loads as an SD-family class). `unclaimed` for a class no family claims."""
    if class_name is None:
        return SINGLE_FILE
    return claimed_by(class_name) or unclaimed(str(class_name), what)


def pipe_family(pipe: Any) -> Family:
    """The family of a pipeline in memory: of its class, or of the first diffusers base class a family claims
    (a library user's subclass of StableDiffusionPipeline is SD); `unclaimed`, naming its class, for any other."""
    from sdcli.families import generic

    for cls in type(pipe).__mro__:
        family = claimed_by(cls.__name__)
        if family is not None:
            return family
    # The generic family as loaded: its own denoiser and scheduler.
    return generic.pipe_family(pipe) or unclaimed(type(pipe).__name__, "the pipeline")


def family_of(pipe: Any) -> str:
    """sd1, sd2, sdxl, sd3 or flux: what records and messages call it (ModelError for another pipeline class)."""
    return pipe_family(pipe).record_name(pipe)


def denoiser(pipe: Any) -> Any:
    """The network that predicts the noise (or the velocity): the UNet, or the transformer of SD3 and Flux."""
    return getattr(pipe, pipe_family(pipe).denoiser)


def training_family(pipe: Any) -> Family:
    """The family of a pipeline finetune is to train; ModelError for one it has no training hooks for."""
    family = pipe_family(pipe)
    if family.encode is None:
        raise ModelError(f"finetune supports Stable Diffusion 1.x, 2.x, XL, 3, Flux.1, Chroma, Z-Image and Qwen-Image "
                         f"pipelines; this model is a {type(pipe).__name__}")
    return family


def kohya_layout(name: str) -> KohyaLayout | None:
    """The kohya LoRA layout of the model records call ``name`` (sd1, sd2, sdxl); None where it has none."""
    family = BY_NAME.get(name)
    return family.kohya.get(name) if family else None


def single_file_class(path: Path):
    """The diffusers pipeline class a single-file checkpoint loads as: the family whose markers its keys hold
    (each family's original code named blocks no other has), SD's otherwise (and for pickled files, not read)."""
    import diffusers

    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        for family in FAMILIES:
            if any(marker in k for marker in family.single_file_markers for k in keys):
                if not family.single_file_class:
                    raise ModelError(f"--model {path} is a {family.name} transformer alone (diffusers loads no "
                                     "whole pipeline from one file); give the model's diffusers folder or Hub id as "
                                     f"--model and this file as --{family.denoiser}")
                return getattr(diffusers, family.single_file_class)
    return getattr(diffusers, SINGLE_FILE.single_file_class)


def family_before_load(model: str, revision: str | None) -> Family:
    """The family of a pipeline folder or Hub id from its model_index.json; of a GGUF file from its header."""
    from sdcli.configs import _config, model_is_gguf, read_gguf

    if model_is_gguf(model):
        facts = read_gguf(model, "--model")
        family = gguf_family(facts)
        if family is None:
            raise ModelError(f"--model {model}: its tensors are no model sdcli knows"
                             + (f" (architecture {facts.architecture})" if facts.architecture else ""))
        return family
    return family_spec((_config(model, "model_index.json", revision) or {}).get("_class_name"), f"--model {model}")


def gguf_family(facts: Any) -> Family | None:
    """The family whose denoiser a denoiser file holds (GGUF, or safetensors: `sdcli.denoiser_file.FileFacts`):
    named by a GGUF's architecture metadata, else recognised by its tensor names (each family's ``gguf_markers``, the most specific family first); None where none is."""
    if facts.architecture:
        for family in FAMILIES:
            if facts.architecture in (family.name, *family.variants):
                return family
    for family in FAMILIES:
        if family.gguf_markers and any(m in n for m in family.gguf_markers for n in facts.names):
            return family
    return None


# 2. What a model is, before and after loading ------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What a model is, read from its configs alone (no weights): enough to check a request before loading."""

    class_name: str | None
    family: Family
    vae_factor: int
    guidance: str  # the family's guidance knob, "none" for a distilled family without the input (Flux-schnell)
    scheduler: str | None = None  # the class of the scheduler it comes with (model_index.json), where it says
    defaults: dict[str, float] = field(default_factory=dict)  # the model card's steps/guidance (`Family.defaults`)
    largest: tuple[int, int] | None = None  # the widest and tallest image its denoiser has positions for (pixels)

    @property
    def references(self) -> int:
        """How many --reference-image the model takes (0: none)."""
        return self.family.references(self.class_name)

    @property
    def size_multiple(self) -> int:
        """What width and height must be multiples of: the VAE factor times the patch, and never less than the 8
        that diffusers' Stable Diffusion pipelines insist on."""
        return max(8, self.vae_factor * self.family.patch)


def model_facts(model: str, revision: str | None = None) -> ModelFacts:
    from sdcli.configs import _config, check_folder, local_kind

    if local_kind(model) == "folder":
        check_folder(Path(model).expanduser())
    index = _config(model, "model_index.json", revision) or {}
    family = family_spec(index.get("_class_name"), f"--model {model}")
    if Path(model).suffix.lower() == ".gguf":  # a GGUF denoiser alone: its family from its header
        family = family_before_load(model, revision)
    if hasattr(family, "completed"):  # a family that reads its patch and scheduler off the configs (generic)
        family = family.completed(lambda name: _config(model, name, revision))
    vae = _config(model, "vae/config.json", revision)
    factor = family.vae_factor(vae) if vae else 8
    # Only a family whose guidance or defaults depend on the model reads the config they depend on (a Hub
    # download): ``guidance_config``'s (the denoiser's where "") over the pipeline's.
    config = None
    if family.guidance_of_config or family.defaults:
        where = family.guidance_config or family.denoiser
        name = "scheduler/scheduler_config.json" if where == "scheduler" else f"{where}/config.json"
        config = {**index, **(_config(model, name, revision) or {}), "pipeline_class": index.get("_class_name")}
    scheduler = (index.get("scheduler") or [None, None])[-1]
    largest = None
    if family.positions is not None:  # its denoiser's config (a small file), not its weights
        denoiser = _config(model, f"{family.denoiser}/config.json", revision)
        largest = family.positions(denoiser, factor) if denoiser else None
    return ModelFacts(index.get("_class_name"), family, factor, family.guidance_for(config),
                      scheduler if isinstance(scheduler, str) else None, family.defaults_for(config), largest)


def facts_of(pipe: Any) -> ModelFacts:
    """The same facts, of a pipeline already in memory."""
    family = pipe_family(pipe)
    config = family.config_of(pipe) if family.defaults else None
    factor = getattr(pipe, "vae_scale_factor", 8)
    part = getattr(pipe, family.denoiser, None)
    largest = family.positions(part.config, factor) if family.positions and part is not None else None
    return ModelFacts(type(pipe).__name__, family, factor, family.guidance_of(pipe),
                      type(getattr(pipe, "scheduler", None)).__name__, family.defaults_for(config), largest)


def arch_from_configs(denoiser: dict[str, Any], vae: dict[str, Any], pipeline_class: str = "") -> Any:
    """`sdcli.memory.Arch` of a ``pipeline_class`` model from its denoiser's and VAE's configs, as its family
    reads them; a UNet's with SD 1.5's values where no family file claims the class."""
    from sdcli.memory import unet_arch

    family = claimed_by(pipeline_class)
    return family.arch(denoiser, vae) if family else unet_arch(denoiser, vae)


def model_arch(model: str, revision: str | None = None, vae: str | None = None) -> Any:
    """``model``'s `sdcli.memory.Arch` from its configs alone (no weights); ``vae`` a replacement VAE folder."""
    from sdcli.configs import config_or_empty

    vae_config = config_or_empty(model, "vae/config.json", revision)
    if vae and Path(vae).expanduser().is_dir():
        vae_config = config_or_empty(vae, "config.json", None) or vae_config
    class_name = str(config_or_empty(model, "model_index.json", revision).get("_class_name", ""))
    family = claimed_by(class_name)
    denoiser = config_or_empty(model, f"{family.denoiser if family else 'unet'}/config.json", revision)
    return arch_from_configs(denoiser, vae_config, class_name)


# 3. diffusers' own task tables -----------------------------------------------------------------


def takes(cls: type, parameter: str) -> bool:
    import inspect

    return parameter in inspect.signature(cls.__call__).parameters


def task_pipeline_class(class_name: str | None, task_name: str) -> type | None:
    """The diffusers pipeline class a task runs for a model, from diffusers' own task tables (no weights load);
    None where they do not say."""
    try:
        from diffusers.pipelines import auto_pipeline as auto
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return None
    inner, _, control = task_name.partition("+")
    table = {"txt2img": auto.AUTO_TEXT2IMAGE_PIPELINES_MAPPING, "img2img": auto.AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
             "inpaint": auto.AUTO_INPAINT_PIPELINES_MAPPING, "outpaint": auto.AUTO_INPAINT_PIPELINES_MAPPING}[inner]
    key = next((k for m in auto.SUPPORTED_TASKS_MAPPINGS for k, c in m.items() if c.__name__ == class_name), None)
    if key is None:
        return None
    key = f"{key}-controlnet" if control and not key.endswith("-controlnet") else key
    return table.get(key)
