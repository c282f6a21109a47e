"""What a run leaves in OUT: weights diffusers loads, the settings, a model card, the loss log and curve.

LoRA runs write `pytorch_lora_weights.safetensors` through the pipeline class's
own `save_lora_weights`, so `pipe.load_lora_weights(OUT)` reads it with no
sdcli code; SD 1.x/2.x and SDXL LoRA runs also write OUT/<OUT's name>.safetensors in the
kohya layout AUTOMATIC1111 and ComfyUI read (`sdcli.kohya`), and Chroma, Z-Image and Qwen-Image LoRA runs
the layout ComfyUI reads for them (`kohya.save_prefixed`); full runs write a complete
pipeline folder with `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from sdcli import __version__
from sdcli.errors import OutputError
from sdcli.locks import FolderLock
from sdcli import kohya

LORA_FILE = "pytorch_lora_weights.safetensors"
SETTINGS_FILE = "training_settings.json"
LOSS_FILE = "loss.csv"
LOSS_PLOT = "loss.png"
CARD_FILE = "README.md"
VALIDATION_DIR = "validation"
LOGS_DIR = "logs"  # --log-with's trackers (TensorBoard event files, wandb's run folder)
# val_loss: the held-out loss, on the steps that measured one (empty on the others).
LOSS_COLUMNS = ("step", "epoch", "loss", "lr", "images_per_s", "elapsed_s", "val_loss")
MANIFEST = ".sdcli-manifest.json"  # what runs into OUT wrote there: all --overwrite removes
# Everything a run may write (the kohya file aside, named after OUT).
PIPELINE_PARTS = ("model_index.json", "unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                  "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler", "safety_checker", "feature_extractor",
                  "image_encoder")
OUR_NAMES = (LORA_FILE, SETTINGS_FILE, LOSS_FILE, LOSS_PLOT, CARD_FILE, VALIDATION_DIR, "checkpoints",
             LOGS_DIR) + PIPELINE_PARTS


def check_out(out: Path, overwrite: bool, resuming: bool, writes: set[str] = frozenset()) -> None:
    """Refuse to write into a non-empty OUT unless told to (or continuing a run there); with --overwrite,
    refuse to write over ``writes`` (names this run writes) where no earlier run recorded writing them."""
    from sdcli.images import check_name_length
    from sdcli.locks import check_own

    check_name_length(out, "--out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder")
    check_own(out / FolderLock.NAME)
    if out.is_dir() and any(p.name != FolderLock.NAME for p in out.iterdir()) and not (overwrite or resuming):
        raise OutputError(f"--out {out} is not empty; pass --overwrite to replace it or --resume latest to continue")
    if overwrite and not resuming and out.is_dir():
        ours = set(read_manifest(out))
        foreign = sorted(name for name in writes if name not in ours and os.path.lexists(out / name))
        if foreign:
            raise OutputError(f"--out {out} holds {', '.join(foreign)}, which no earlier sdcli run recorded writing "
                              f"there (in {MANIFEST}); --overwrite replaces only a previous run's outputs, so move "
                              "them or pick another folder")


def lock_out(out: Path) -> FolderLock:
    """Reserve OUT for this run: a second run into it would silently replace this one's weights."""
    lock = FolderLock(out)
    holder = lock.acquire()
    if holder is not None:
        who = f" (process {holder})" if holder else ""
        raise OutputError(f"--out {out} is in use by another sdcli finetune{who}; wait for it or pick another folder")
    return lock


def names_written(cfg: Any) -> set[str]:
    """The names a run with ``cfg`` writes directly in OUT."""
    names = {SETTINGS_FILE, LOSS_FILE, LOSS_PLOT, CARD_FILE}
    names |= {LORA_FILE, kohya.file_name(cfg.out)} if cfg.lora else set(PIPELINE_PARTS)
    names |= {"checkpoints"} if cfg.checkpoint_every else set()
    names |= {VALIDATION_DIR} if cfg.validation_prompts else set()
    names |= {LOGS_DIR} if cfg.trackers else set()
    return names


def read_manifest(out: Path) -> list[str]:
    """The names earlier runs recorded writing in OUT; only plain names inside it (a changed manifest
    cannot point --overwrite elsewhere)."""
    path = Path(out) / MANIFEST
    if not path.is_file() or path.is_symlink():
        return []
    try:
        names = json.loads(path.read_text()).get("written", [])
    except (OSError, ValueError, AttributeError):
        raise OutputError(f"{path} is unreadable, so --overwrite cannot tell what an earlier run wrote; "
                          "remove the folder's contents yourself or pick another folder") from None
    return [n for n in names if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..", MANIFEST,
                                                                                    FolderLock.NAME)]


def record_written(out: Path, names: list[str] | set[str]) -> None:
    """Add ``names`` to OUT's manifest, before they are written (a killed run's leftovers are listed too)."""
    known = read_manifest(out)
    new = [n for n in sorted(names) if n not in known]
    if new:
        text = json.dumps({"sdcli_version": __version__, "written": known + new}, indent=2) + "\n"
        _atomic_text(Path(out) / MANIFEST, text)


def clear_previous(out: Path) -> None:
    """For --overwrite: remove what earlier runs recorded writing (`record_written`), nothing else."""
    for name in read_manifest(out):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    with contextlib.suppress(FileNotFoundError):
        (out / MANIFEST).unlink()


@contextlib.contextmanager
def staged(out: Path):
    """A temporary folder in OUT to write the weights into; on success each entry replaces its namesake in
    OUT, on failure (a full disk) the folder goes and OUT keeps what it had: never half-written weights."""
    stage = Path(tempfile.mkdtemp(prefix=".tmp-output-", dir=out))
    try:
        yield stage
        record_written(out, {p.name for p in stage.iterdir()})
        for entry in sorted(stage.iterdir()):
            target = Path(out) / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def disk_failure(exc: BaseException) -> str | None:
    """What went wrong writing, for the errors a disk gives (full, read-only, name too long); None for others."""
    from safetensors import SafetensorError

    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    if isinstance(exc, SafetensorError):  # safetensors wraps the OS error in its own
        return (str(exc).strip().splitlines() or ["write failed"])[0]
    return None


def _atomic_text(path: Path, text: str) -> Path:
    from sdcli.images import atomic_write

    return atomic_write(path, lambda tmp: tmp.write_text(text), overwrite=True)


def save_lora(pipe: Any, family: Any, denoiser: Any, text_encoders: list[Any], out: Path, cfg: Any = None,
              into: Path | None = None) -> Path:
    """LoRA weights in the diffusers format, with rank and alpha stored so they load at the trained scale.

    Through the pipeline class's own `save_lora_weights` (``unet_lora_layers`` for a UNet,
    ``transformer_lora_layers`` for SD3 and Flux), so its `load_lora_weights` finds every key. For SD
    1.x/2.x and SDXL, unless ``cfg.lora_format`` is diffusers, the same weights also go to
    OUT/<OUT's name>.safetensors in the kohya layout, with ``cfg``'s settings in its ss_* metadata; for a
    family with a ``comfy_lora_prefix`` (Chroma, Z-Image, Qwen-Image, FLUX.2), in the layout ComfyUI loads for it.
    ``into``: the folder written to (`staged`), if not OUT itself.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    plain = getattr(cfg, "adapter", "lora") == "lora"

    def layers(model, peft_names=False):
        # diffusers' transformer LoRA scripts save peft's names as they are; its UNet scripts convert them.
        # DoRA's magnitudes, LoHa's and LoKr's tensors keep peft's names, which diffusers' loaders read.
        state = get_peft_model_state_dict(model)
        return state if peft_names or not plain else convert_state_dict_to_diffusers(state)

    def metadata(model):
        return model.peft_config["default"].to_dict()

    key = family.denoiser
    kwargs: dict[str, Any] = {f"{key}_lora_layers": layers(denoiser, family.peft_lora_names),
                              f"{key}_lora_adapter_metadata": metadata(denoiser)}
    for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders):
        kwargs[f"{name}_lora_layers"] = layers(encoder)
        kwargs[f"{name}_lora_adapter_metadata"] = metadata(encoder)
    into = Path(into or out)
    type(pipe).save_lora_weights(str(into), safe_serialization=True, **kwargs)
    name = family.record_name(pipe)  # sd1, sd2, sdxl, ...: each has its own kohya layout, or none
    both = getattr(cfg, "lora_format", kohya.LoraFormat.both) == kohya.LoraFormat.both
    if name in family.kohya and both:
        models = dict(zip((key, "text_encoder", "text_encoder_2"), [denoiser, *text_encoders]))
        kohya.save(into / kohya.file_name(out), name, models, denoiser.config, Path(out).resolve().name,
                   v_prediction=pipe.scheduler.config.get("prediction_type") == "v_prediction",
                   base_model=getattr(cfg, "model", None), cfg=cfg)
    elif family.comfy_lora_prefix and both:
        kohya.save_prefixed(into / kohya.file_name(out), family.comfy_lora_prefix, denoiser, name,
                            Path(out).resolve().name, base_model=getattr(cfg, "model", None), cfg=cfg,
                            alphas=family.comfy_lora_alpha)
    return out / LORA_FILE


def save_full(pipe: Any, out: Path, into: Path | None = None) -> Path:
    pipe.save_pretrained(str(into or out), safe_serialization=True)
    return out / "model_index.json"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def write_settings(out: Path, record: dict[str, Any]) -> Path:
    path = out / SETTINGS_FILE
    full = {"sdcli_version": __version__, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "libraries": library_versions(), **record}
    return _atomic_text(path, json.dumps(full, indent=2, default=str) + "\n")


def write_model_card(out: Path, record: dict[str, Any]) -> Path:
    """A short README.md with the front matter the Hugging Face Hub reads."""
    cfg = record["config"]
    lora = cfg["lora"]
    base = record["base_model"]
    kind = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}[cfg.get("adapter") or "lora"]
    what = (f"{kind} (rank {cfg['rank']}, alpha {cfg['lora_alpha']:g})" if lora
            else f"full {record.get('denoiser', 'unet')} fine-tune")
    if cfg["train_text_encoder"]:
        what += " with the text encoder"
    if cfg.get("quantize"):  # QLoRA: the LoRA itself is float32 and loads on the unquantized model as well
        what += f", trained on the base quantized with {cfg['quantize']}"
    adapter = cfg.get("adapter") or "lora"
    loads = {"loha": "# plain diffusers has no LoHa loader: use sdcli, AUTOMATIC1111, Forge or ComfyUI",
             "lokr": f"pipe.{record.get('denoiser', 'unet')}.load_lora_adapter(\"{out}\", "
                     f"weight_name=\"{LORA_FILE}\", prefix=\"{record.get('denoiser', 'unet')}\")"
                     "  # LoKr: the model's loader, not pipe.load_lora_weights"}
    from sdcli import defaults

    # The bundled model by name: its path is this machine's install, and the package knows where it is.
    base_in_diffusers = ("BUNDLED_MODEL  # from sdcli.defaults import BUNDLED_MODEL" if base == defaults.BUNDLED_NAME
                         else f"\"{base}\"")
    use = (
        f"sdcli generate --model {base} --lora {out} \"your prompt\"\n\n"
        f"# or in diffusers\npipe = DiffusionPipeline.from_pretrained({base_in_diffusers})\n"
        + loads.get(adapter, f"pipe.load_lora_weights(\"{out}\")")
        if lora else
        f"sdcli generate --model {out} \"your prompt\"\n\n"
        f"# or in diffusers\npipe = DiffusionPipeline.from_pretrained(\"{out}\")"
    )
    kohya_file = out / kohya.file_name(out)
    from sdcli.families import kohya_layout

    if lora and os.path.isfile(kohya_file) and kohya_layout(record["family"]) is None:  # ComfyUI's layout only
        use += (f"\n\n# ComfyUI: copy {kohya_file.name} into models/loras/ and load it with a LoraLoaderModelOnly "
                "node")
    elif lora and os.path.isfile(kohya_file):  # False, not ENAMETOOLONG, when OUT's name leaves no room for it
        use += (f"\n\n# AUTOMATIC1111 or ComfyUI: copy {kohya_file.name} into models/Lora/ (ComfyUI: models/loras/)"
                f"\n# and write <lora:{kohya_file.stem}:1> in the prompt")
    tags = ["text-to-image", "diffusers", "sdcli"] + (["lora"] if lora else [])
    card = f"""---
base_model: {base}
library_name: diffusers
tags: [{", ".join(tags)}]
---

# {out.name}

A {what} of `{base}` ({record['family']}, {record.get('objective', record['prediction_type'])}), made with sdcli {__version__}:
{record['steps']} steps of batch {cfg['batch_size']} x {cfg['gradient_accumulation']} accumulation x {record['world_size']} process(es)
on {record['data']['images']} images at {cfg['resolution']} px, learning rate {cfg['learning_rate']:g}, captions dropped
to the null prompt with probability {cfg['uncond_prob']:g} so classifier-free guidance keeps working.
Final loss {_loss(record['final_loss'])}; the full settings are in `{SETTINGS_FILE}`, the loss per step in `{LOSS_FILE}`.

## Use

```
{use}
```
"""
    return _atomic_text(out / CARD_FILE, card)


def _loss(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.4f}"


class LossLog:
    """loss.csv, one row per optimizer step; a resumed run first drops the rows after its checkpoint."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOSS_COLUMNS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def append(self, **row: Any) -> None:
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.file.flush()  # a killed run still leaves its curve

    def close(self) -> None:
        self.file.close()


def read_losses(path: Path) -> tuple[list[int], list[float]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


def read_validation_losses(path: Path) -> tuple[list[int], list[float]]:
    """The steps that measured a validation loss, and its values (a loss.csv from before the column: none)."""
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_loss")]
    return [int(r["step"]) for r in rows], [float(r["val_loss"]) for r in rows]


def plot_loss(csv_path: Path, png_path: Path) -> Path | None:
    """The loss per step and its running mean, and the validation loss where there is one, as a PNG
    (matplotlib, no display needed)."""
    steps, losses = read_losses(csv_path)
    val_steps, val_losses = read_validation_losses(csv_path)
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss")
    if window > 1:  # a mean of one step is the loss itself: a short run's legend said "mean of last 1"
        ax.plot(steps, smooth, color="#c33", linewidth=1.6, label=f"mean of the last {window} steps")
    if val_steps:
        ax.plot(val_steps, val_losses, color="#26a", linewidth=1.6, marker="o", markersize=3,
                label="validation (held out, fixed noise)")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        from sdcli.images import atomic_write

        return atomic_write(Path(png_path), lambda tmp: fig.savefig(tmp, format="png"), overwrite=True)
    finally:
        plt.close(fig)


def render_validation(pipe: Any, family: str, device: Any, cfg: Any, step: int, guidance: str = "cfg") -> list[Path]:
    """One image per validation prompt under OUT/validation/step-N/, from the same seed every time so steps compare.

    Made by `sdcli generate`'s own code (guidance, NaN guard, writer, metadata) on the pipeline being
    trained. The record names the weights this run writes to OUT (the LoRA on the base model, or the
    full pipeline), so `sdcli generate --from-metadata` remakes the last step's image. ``guidance`` is the
    model's kind ("cfg", "distilled", "none"): --validation-guidance is Flux-dev's distilled guidance, and
    without it generate's own default applies.
    """
    from sdcli.generation import Engine, Settings
    from sdcli.generation.outputs import ImageWriter

    out = Path(cfg.out).resolve()
    settings = Settings(
        prompts=list(cfg.validation_prompts), model=cfg.model if cfg.lora else str(out),
        revision=cfg.revision if cfg.lora else None, variant=cfg.variant if cfg.lora else None,
        loras=[(str(out), 1.0)] if cfg.lora else [], steps=cfg.validation_steps, seeds=[cfg.seed],
        width=max(cfg.resolutions), height=max(cfg.resolutions), device=str(device))
    if cfg.validation_guidance is not None:
        if guidance == "distilled":
            settings.distilled_guidance = cfg.validation_guidance
        else:
            settings.guidance = [cfg.validation_guidance]
    # The LoRA being trained is in the pipeline already (its adapter, live): recorded, not loaded again.
    engine = Engine.around(pipe, settings, family=family, baked=settings.loras)
    p = engine.plan(settings)
    slugs = [re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt" for prompt in settings.prompts]
    writer = ImageWriter(out / VALIDATION_DIR / f"step-{step:06d}", p,
                         name=lambda job: f"{job.index:02d}-{slugs[job.index]}.png")
    for item in engine.run(p, extra_record={"finetune_validation": {"out": str(out), "step": step}}):
        writer.write(item)
    return writer.finish()
