"""Find, load and place a diffusers pipeline: Hub id, local folder or single file.

The pipeline class is whatever the model says it is (`model_index.json`, or
the keys of a single-file checkpoint); its family (`sdcli.families`) says
what it is, and a class of no family is refused before its weights load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdcli import defaults
from sdcli.configs import (  # noqa: F401 - sdcli.pipeline is where callers find them
    PICKLE_SUFFIXES, SINGLE_FILE_SUFFIXES, _config, check_folder, local_kind,
)
from sdcli.devices import resolve_device, resolve_dtype  # noqa: F401
from sdcli.errors import ModelError, UsageError, concerning
from sdcli.progress import quiet_libraries  # noqa: F401
from sdcli.families import denoiser, family_before_load, family_of, gguf_family, pipe_family, single_file_class


def pickled_only(path: str | Path) -> bool:
    """A pickled weights file, or a folder whose only weights are pickled: loading either can run code."""
    path = Path(path).expanduser()
    if path.is_file():
        return path.suffix.lower() in PICKLE_SUFFIXES
    return path.is_dir() and not any(path.rglob("*.safetensors")) and any(
        p.suffix.lower() in PICKLE_SUFFIXES for p in path.rglob("*"))


def resolve_model(model: str | None) -> str:
    model = model or defaults.default_model()
    if not model:
        raise UsageError("no model given: pass --model (Hub id, folder or .safetensors file) or set SDCLI_MODEL")
    if model == defaults.BUNDLED_NAME:
        return str(defaults.BUNDLED_MODEL)
    return model


def model_reference(model: str) -> str:
    """How a record names a model: the bundled one by name (its install path changes with every
    install), a local one by absolute path, a Hub id as given."""
    if Path(model).expanduser().resolve() == defaults.BUNDLED_MODEL.resolve():
        return defaults.BUNDLED_NAME
    return absolute_if_local(model)


def absolute_if_local(path: str) -> str:
    """Local paths made absolute, so a record or a resume still works from another folder; Hub ids as they are."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


@dataclass
class Loaded:
    pipe: Any
    model: str  # what the user named
    family: str  # sd1, sd2, sdxl, sd3 or flux (`family_of`)
    device: str
    dtype: Any

    @property
    def prediction_type(self) -> str:
        if pipe_family(self.pipe).flow:
            return "flow"  # the velocity ε − x_0
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    @property
    def model_name(self) -> str:
        """A short name for metadata: the Hub id, or the folder/file name."""
        kind = "hub" if not Path(self.model).expanduser().exists() else "path"
        return self.model if kind == "hub" else Path(self.model).expanduser().resolve().name


def load_pipeline(
    model: str | None,
    *,
    revision: str | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    cpu_offload: bool = False,
    quantize: str | None = None,
    quantize_text_encoder: bool = False,
    denoiser_file: str | None = None,
    storage_dtype: str | None = None,
    offload: str | None = None,
) -> Loaded:
    """Load ``model`` as a diffusers pipeline, on ``device`` in ``dtype``; raises ModelError.

    With ``cpu_offload`` the weights stay in CPU memory and each model moves to the GPU only
    while it runs (diffusers' model offload), so the whole pipeline never has to fit at once.
    ``quantize``, ``quantize_text_encoder``, ``denoiser_file`` (a denoiser's own file: GGUF or safetensors),
    ``storage_dtype`` and ``offload`` are the modes of `sdcli.quantize`, each checked before any weights load.
    """
    from sdcli import quantize as q

    model = resolve_model(model)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if cpu_offload and not device.startswith("cuda"):
        raise UsageError("--cpu-offload needs a CUDA device")
    kind = local_kind(model)
    gguf_model = kind == "file" and q.model_is_gguf(model)
    family = None if kind == "file" and not gguf_model else family_before_load(model, revision)
    modes = dict(quantize=quantize, quantize_text_encoder=quantize_text_encoder, denoiser_file=denoiser_file,
                 storage_dtype=storage_dtype, offload=offload, cpu_offload=cpu_offload)
    if kind == "file" and not gguf_model and (quantize or denoiser_file):
        flag = "--quantize" if quantize else "--transformer"
        raise UsageError(f"{flag} with the single-file checkpoint {Path(model).name}: give a diffusers pipeline folder "
                         "(or Hub id) as --model", setting="quantize" if quantize else "denoiser_file")
    spec = q.check_load(modes, device, family, model, gguf_family) if (family is not None or not gguf_model) else \
        q.check_load({**modes, "denoiser_file": None}, device)
    mode = q.resolve(spec, device) if spec else None
    quiet_libraries()
    import diffusers

    # Safetensors only, unless the user accepts pickle's risk; never remote code.
    common: dict[str, Any] = {"torch_dtype": torch_dtype}
    try:
        if gguf_model:
            pipe = _load_gguf_model(Path(model).expanduser(), family, mode, quantize_text_encoder, torch_dtype)
        elif kind == "file":
            path = Path(model).expanduser()
            if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
                raise ModelError(f"{path.name} holds pickled weights, which can run code when loaded; "
                                 "convert it to .safetensors or pass --allow-pickle if you trust it")
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise ModelError(f"{path} is not a checkpoint file (.safetensors, or .ckpt with --allow-pickle)")
            pipe = single_file_class(path).from_single_file(str(path), **common)
        else:
            if kind == "folder":
                folder = Path(model).expanduser()
                check_folder(folder)
                if not allow_pickle and not any(folder.rglob("*.safetensors")) and any(
                    p.suffix in PICKLE_SUFFIXES for p in folder.rglob("*")
                ):
                    raise ModelError(f"{model} holds only pickled weights, which can run code when loaded; "
                                     "pass --allow-pickle if you trust it")
            # Another family's pipeline was refused before its weights load (`family_before_load`), not half-run.
            where = str(Path(model).expanduser()) if kind == "folder" else model
            encoders = family.text_encoders if quantize_text_encoder else ()
            if mode is not None:  # with a denoiser file, the text encoders alone (`check_load`)
                common["quantization_config"] = q.quantization_config(
                    mode, None if denoiser_file else family.denoiser, encoders, torch_dtype)
            index = _config(model, "model_index.json", revision) or {}
            if family.parts:  # what the family builds itself (a processor diffusers' loading cannot make here)
                common.update(family.parts(where, index, revision))
            if denoiser_file:
                common[family.denoiser] = _load_denoiser_file(denoiser_file, where, family, revision, torch_dtype)
            pipe = diffusers.DiffusionPipeline.from_pretrained(
                where,
                revision=revision,
                variant=variant,
                use_safetensors=None if allow_pickle else True,
                trust_remote_code=False,
                **common,
            )
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - every load failure is a bad model for the user
        message = _load_message(model, exc)
        if kind == "file" and "Hugging Face cache" in message:
            # diffusers reads a single file's architecture from the matching Hub config.
            message = (f"{model}: a single-file checkpoint needs its model family's config from the Hugging Face "
                       "Hub once, and it is not cached here (offline?); load a diffusers folder instead, or go online")
        raise ModelError(message) from exc
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if storage_dtype:
        q.apply_storage(denoiser(pipe), storage_dtype, torch_dtype)
    if offload or cpu_offload:
        q.apply_offload(pipe, offload or "model", device)
    else:
        pipe.to(device)
    return Loaded(pipe=pipe, model=model, family=family_of(pipe), device=device, dtype=torch_dtype)


def _load_denoiser_file(file: str, where: str, family: Any, revision: str | None, dtype: Any) -> Any:
    """The denoiser of the pipeline at ``where`` from ``file`` (GGUF, or safetensors in either naming; checked
    already by `sdcli.denoiser_file.check`)."""
    from sdcli import denoiser_file, quantize as q

    index = _config(where, "model_index.json", revision) or {}
    class_name = (index.get(family.denoiser) or [None, None])[1]
    if denoiser_file.is_gguf(file):
        return q.load_gguf_denoiser(file, where, family.denoiser, class_name, dtype)
    return denoiser_file.load(file, where, family.denoiser, class_name, dtype, f"--{family.denoiser}")


def _load_gguf_model(path: Path, family: Any, mode: Any, quantize_text_encoder: bool, dtype: Any) -> Any:
    """A pipeline around a GGUF denoiser given as --model: the rest of it (and the denoiser's config) from the Hub
    model diffusers takes the file's tensors for, as for a single-file checkpoint."""
    import diffusers
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint

    from sdcli import quantize as q

    checkpoint = load_single_file_checkpoint(str(path))
    repo = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    index = _config(repo, "model_index.json")
    if not index or not index.get(family.denoiser):
        raise ModelError(f"--model {path.name}: a GGUF file holds only the {family.denoiser}; the rest of the pipeline "
                         f"comes from {repo} on the Hugging Face Hub (the model diffusers takes it for), which is not "
                         f"cached here (offline?); give a {family.name} pipeline folder as --model and the file as "
                         f"--{family.denoiser}")
    common: dict[str, Any] = {"torch_dtype": dtype}
    if mode is not None:
        common["quantization_config"] = q.quantization_config(
            mode, None, family.text_encoders if quantize_text_encoder else (), dtype)
    common[family.denoiser] = q.load_gguf_denoiser(checkpoint, repo, family.denoiser, index[family.denoiser][1], dtype)
    if family.parts:
        common.update(family.parts(repo, index, None))
    return diffusers.DiffusionPipeline.from_pretrained(repo, use_safetensors=True, trust_remote_code=False, **common)


@concerning("vae")
def replace_vae(loaded: Loaded, source: str, cpu_offload: bool = False) -> None:
    """Put the VAE at ``source`` (a VAE folder or Hub id, or a pipeline's, whose vae/ is used) into the
    loaded pipeline, on its device and in its dtype; ModelError if it does not fit the model's latents."""
    from diffusers import AutoencoderKL

    pipe, old = loaded.pipe, loaded.pipe.vae
    kind = local_kind(source)
    path = Path(source).expanduser()
    if kind == "file":
        raise ModelError(f"--vae {source}: give a VAE folder (config.json and weights) or a Hub id, not a file")
    subfolder = "vae" if kind == "folder" and not (path / "config.json").is_file() else None
    if subfolder and not (path / "vae" / "config.json").is_file():
        raise ModelError(f"--vae {source}: neither a VAE folder (no config.json) nor a pipeline folder with a vae/")
    try:
        vae = AutoencoderKL.from_pretrained(str(path) if kind == "folder" else source, subfolder=subfolder,
                                            torch_dtype=loaded.dtype, use_safetensors=True)
    except Exception as exc:  # noqa: BLE001 - a Hub pipeline keeps its VAE in vae/; otherwise the load failed
        if kind != "hub":
            raise ModelError(f"--vae {_load_message(source, exc)}") from exc
        try:
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=loaded.dtype, use_safetensors=True)
        except Exception:  # noqa: BLE001 - report the first failure, about the repo itself
            raise ModelError(f"--vae {_load_message(source, exc)}") from exc
    theirs, ours = vae.config.latent_channels, old.config.latent_channels
    if theirs != ours:
        raise ModelError(f"--vae {source}: its latents have {theirs} channels but this model's have {ours}; "
                         "use a VAE made for this model's family")
    if len(vae.config.block_out_channels) != len(old.config.block_out_channels):
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        raise ModelError(f"--vae {source}: it shrinks images {factor}x but this model's VAE "
                         f"{pipe.vae_scale_factor}x; use a VAE made for this model's family")
    if cpu_offload:  # the hooks were set on the old VAE; set them again (diffusers removes the old ones first)
        pipe.vae = vae
        pipe.enable_model_cpu_offload(device=loaded.device)
    else:
        pipe.vae = vae.to(loaded.device)


def _load_message(model: str, exc: Exception) -> str:
    """One line for a failed load, worded by what the exception chain holds (`sdcli.errors` classifies it)."""
    from sdcli.errors import classify_chain

    text = " ".join(str(exc).split()) or type(exc).__name__
    low = text.lower()
    kinds = {known.kind for known in classify_chain(exc)}
    # diffusers says this only in words (a plain OSError): the weights exist, but not as safetensors.
    if "safetensors" in low and any(w in low for w in ("could not find", "no such", "no file")):
        return f"{model} has no safetensors weights; pass --allow-pickle to load pickled ones if you trust them"
    if "not-found" in kinds:
        return f"model {model!r} not found locally or on the Hugging Face Hub"
    if "gated" in kinds:
        return (f"model {model!r} is gated on the Hugging Face Hub: accept its terms on the model page "
                "and log in (hf auth login)")
    # Older diffusers raise these without a chain; their words are all there is.
    offline = any(w in low for w in ("offline", "outgoing traffic", "not fully cached", "local_files_only"))
    if kinds & {"offline", "not-cached", "unreachable"} or offline:
        return (f"model {model!r} not found in the local Hugging Face cache, and the Hub cannot be reached "
                "(offline, or HF_HUB_OFFLINE=1)")
    if "corrupt-weights" in kinds or "header" in low or "deserializ" in low:
        return f"corrupt weights in {model}: {text[:200]}"
    return f"cannot load {model}: {text[:300]}"


# What each --compile-mode sets on CUDA: torch.compile's mode, the inductor options diffusers' inference-speed
# guide pairs with autotuning (they lengthen compiling, so the faster-compiling modes leave inductor's defaults),
# and the mode used instead with --cpu-offload: CUDA graphs replay fixed addresses, and offloaded weights move
# to the GPU anew for every image.
_SPEED_GUIDE = {"conv_1x1_as_mm": True, "coordinate_descent_tuning": True,
                "coordinate_descent_check_all_directions": True, "epilogue_fusion": False}
COMPILE_MODES = {
    "default": {"inductor": {}, "offloaded": "default"},
    "reduce-overhead": {"inductor": {}, "offloaded": "default"},
    "max-autotune": {"inductor": _SPEED_GUIDE, "offloaded": "max-autotune-no-cudagraphs"},
    "max-autotune-no-cudagraphs": {"inductor": _SPEED_GUIDE, "offloaded": "max-autotune-no-cudagraphs"},
}
_INDUCTOR_DEFAULTS: dict[str, Any] = {}  # inductor's own values of those options, read before sdcli first sets them


def default_channels_last(device: str, compile: bool) -> bool:
    """Channels-last by default only for a compiled UNet on CUDA: eager, on an H100 at batch 4, it measured
    2-5 % slower than the default layout (docs/benchmarks.md); compiled, it is part of the measured recipe."""
    return device.startswith("cuda") and compile


def apply_runtime_options(
    pipe: Any,
    *,
    device: str,
    vae_tiling: bool = False,
    attention_slicing: bool = False,
    compile: bool = False,
    compile_mode: str | None = None,
    channels_last: bool | None = None,
    has_lora: bool = False,
    cpu_offload: bool = False,
) -> None:
    """Memory and speed switches, each a diffusers/torch feature behind one option.

    ``channels_last`` None means ``default_channels_last``.
    ``compile`` also fuses the attention's q, k and v projections into one matmul (not with LoRAs,
    whose adapters sit on the separate projections); on CUDA it compiles in ``compile_mode``
    (default: defaults.COMPILE_MODE, or its mode without CUDA graphs when ``cpu_offload``) with that
    mode's inductor options (COMPILE_MODES), elsewhere in torch's default mode.
    """
    import torch

    net = denoiser(pipe)
    if channels_last is None:
        channels_last = default_channels_last(device, compile)
    if channels_last and pipe_family(pipe).denoiser == "unet":  # a transformer has no convolutions to speak of
        net.to(memory_format=torch.channels_last)
    if attention_slicing:
        pipe.enable_attention_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
    if compile:
        if not has_lora and hasattr(pipe, "fuse_qkv_projections"):
            pipe.fuse_qkv_projections()
        mode = "default"
        if device.startswith("cuda"):
            import torch._inductor.config as inductor

            mode = compile_mode or defaults.COMPILE_MODE
            if cpu_offload:
                mode = COMPILE_MODES[mode]["offloaded"]
            # Set for every mode (the options are process-wide and read when compiling), so a default-mode
            # compile after an autotuned one in the same process gets inductor's own values back.
            if not _INDUCTOR_DEFAULTS:
                _INDUCTOR_DEFAULTS.update({key: getattr(inductor, key) for key in _SPEED_GUIDE})
            for key, value in {**_INDUCTOR_DEFAULTS, **COMPILE_MODES[mode]["inductor"]}.items():
                setattr(inductor, key, value)
        compiled = torch.compile(net, mode=mode)
        setattr(pipe, pipe_family(pipe).denoiser, compiled)
