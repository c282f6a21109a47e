"""Every fine-tuning setting in one dataclass, declared once and checked before any work starts.

Each field carries its option (`sdcli.declare.option`): `sdcli finetune`'s Typer
options are derived from these declarations, so a setting's name, type, default
and help are written here only. The same object is written to
OUT/training_settings.json and into every checkpoint, so a run records what made
it and a resume can refuse settings that would not continue the same run.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from sdcli import defaults, options
from sdcli.adapters import Adapter
from sdcli.declare import Range, Role, by_role, check_ranges, option
from sdcli.errors import UsageError
from sdcli.kohya import LoraFormat
from sdcli.training.objective import (TimestepSampling, WeightingScheme, check_ddpm_weighting, check_sampling_shape,
                                      refuse_ddpm_weighting)

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DEFAULT_MAX_STEPS = 1000
MAX_SIDE = 16384  # pixels: past the largest side any diffusers model has been trained or sampled at

# --help sections
DATA = "Data"
TRAIN = "Training"
LONG = "Checkpoints and validation"
DREAMBOOTH = "DreamBooth"

# RECORDED: changes what a step computes, so a resume must keep it.
# RUNTIME: when to stop, what to report and where, or how fast a step runs (memory layout,
# compilation; the same parameter names either way); a resumed run may change it.
RECORDED, RUNTIME = Role.RECORDED, Role.RUNTIME


def _parse_quantize(text):
    from sdcli.quantize import parse_quantize

    return parse_quantize(text)


class LrScheduler(str, Enum):
    """Learning-rate schedules by their diffusers.optimization names."""

    constant = "constant"
    constant_with_warmup = "constant_with_warmup"
    linear = "linear"
    cosine = "cosine"
    cosine_with_restarts = "cosine_with_restarts"
    polynomial = "polynomial"


class LogWith(str, Enum):
    """Trackers accelerate logs to, under OUT/logs; all: both."""

    tensorboard = "tensorboard"
    wandb = "wandb"
    all = "all"


# The package each tracker needs, for the one-line refusal when it is missing.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


class MixedPrecision(str, Enum):
    auto = "auto"
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


def _comma_tuple(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def _resolutions(text: str) -> int | tuple[int, ...]:
    """``--resolution 512`` or ``512,768,1024``: one size (an int, as before lists) or several (a tuple)."""
    parts = [part.strip() for part in str(text).split(",")]
    if not all(re.fullmatch(r"[+-]?\d+", part) for part in parts):
        raise UsageError(f"--resolution takes whole numbers of pixels, one or a comma list (512,768,1024), "
                         f"got {text!r}")
    sides = tuple(int(part) for part in parts)
    return sides[0] if len(sides) == 1 else sides


@dataclass
class FinetuneConfig:
    """What `sdcli finetune` does; each field is one of the command's options."""

    # Folders may move between a run and its resume (a warning); their repeat counts may not (incompatible_with).
    data: list[str] = option(
        help="Folder of images with captions (name.txt, metadata.jsonl or metadata.csv); DIR:N counts each of its "
        "images N times an epoch. Repeatable.", panel=DATA, role=RUNTIME, cli_type=list[str], show_default=False)
    out: Path = option(help="Folder the trained weights, settings and checkpoints go to.", flags=("--out", "-o"),
                       role=RUNTIME)
    model: Optional[str] = option(None, options.MODEL, role=RUNTIME)
    revision: Optional[str] = option(None, options.REVISION)
    variant: Optional[str] = option(None, options.VARIANT)
    # Which files may be trusted, not what a step computes: an older (pickled) checkpoint resumes with it.
    allow_pickle: bool = option(False, options.ALLOW_PICKLE, role=RUNTIME)
    device: str = option("auto", options.DEVICE)

    # Data
    caption_column: str = option("text", help="Caption column in metadata.jsonl/csv.", panel=DATA)
    strict: bool = option(False, help="Stop at an unreadable image instead of skipping it.", flags=("--strict",),
                          panel=DATA, role=RUNTIME)
    allow_empty_captions: bool = option(
        False, help="Train images without a caption as the null prompt instead of stopping.",
        flags=("--allow-empty-captions",), panel=DATA)
    resolution: Optional[int | tuple[int, ...]] = option(
        None, help="Training size in pixels: the square's side, and with buckets the area (its square) each bucket "
        "has at most; a comma list (512,768,1024) trains every image at each. Default: the model's native size.",
        panel=DATA, show_default=False, range=Range(8, MAX_SIDE), cli_type=str, parse=_resolutions)
    buckets: bool = option(
        True, help="Aspect-ratio buckets: train each image at the model's area in the shape nearest its own "
        "(--no-buckets: crop every image square).", flags=("--buckets/--no-buckets",), panel=DATA)
    min_bucket: Optional[int] = option(
        None, help="Shortest bucket side in pixels. Default: half --resolution.", panel=DATA, show_default=False, range=Range(8, MAX_SIDE))
    max_bucket: Optional[int] = option(
        None, help="Longest bucket side in pixels. Default: twice --resolution.", panel=DATA, show_default=False, range=Range(8, MAX_SIDE))
    upscale: bool = option(
        True, help="Enlarge images smaller than their bucket (--no-upscale: give them a bucket of their own size, "
        "skipping any smaller than --min-bucket).", flags=("--upscale/--no-upscale",), panel=DATA)
    center_crop: bool = option(
        True, help="Crop the centre, or a random crop each step (random crop cannot cache latents).",
        flags=("--center-crop/--random-crop",), panel=DATA)
    flip: bool = option(False, help="Mirror half the images at random.", flags=("--flip/--no-flip",), panel=DATA)
    caption_extension: str = option(".txt", help="Extension of the caption file beside each image.", panel=DATA)
    shuffle_captions: bool = option(
        False, help="Shuffle each caption's comma-separated tags every step (captions are then encoded every step).",
        flags=("--shuffle-captions",), panel=DATA)
    keep_tokens: int = option(0, help="With --shuffle-captions: keep the first N tags in place.", panel=DATA, range=Range(0))
    captions_from: Optional[Path] = option(
        None, help="A jsonl of several captions per image ({\"file_name\": ..., \"captions\": [...]}, names "
        "relative to it): each step trains one, drawn from --seed.", panel=DATA, role=RUNTIME, show_default=False)
    # Masked loss. The mask folder may move between a run and its resume, as --data may.
    masks: Optional[Path] = option(
        None, help="Folder of loss masks laid out as --data (DIR/sub/name.png for sub/name.jpg; or a `mask` column "
        "in metadata): the loss counts where a mask is white, --unmasked-weight where it is black.", panel=DATA,
        role=RUNTIME, show_default=False)
    alpha_mask: bool = option(
        False, help="Use each image's alpha channel as its loss mask (where --masks has none).",
        flags=("--alpha-mask",), panel=DATA)
    unmasked_weight: float = option(
        0.0, help="Loss weight of the masked-out (black) part of a loss mask; 1: masks change nothing.", panel=DATA,
        range=Range(0, 1))

    # DreamBooth prior preservation (Ruiz et al. 2023). The class folder may move between a run and its resume,
    # as --data may; what it holds is fixed by --num-class-images and the class prompt, which a resume keeps.
    class_data: Optional[Path] = option(
        None, help="DreamBooth: folder of class images (a dog, for sks dog) trained beside --data with "
        "--class-prompt, weighted by --prior-loss-weight.", panel=DREAMBOOTH, role=RUNTIME, show_default=False)
    class_prompt: Optional[str] = option(
        None, help="DreamBooth: the caption every class image trains with (and generates with).", panel=DREAMBOOTH,
        show_default=False)
    prior_loss_weight: Optional[float] = option(
        None, help="DreamBooth: loss = instance loss + W x class loss. Default: 1 with --class-data.",
        panel=DREAMBOOTH, show_default=False, range=Range(0, 1000, open=('low',)))
    num_class_images: Optional[int] = option(
        None, help="DreamBooth: make --class-data hold N images, generating the missing ones with the base model "
        "and --class-prompt first.", panel=DREAMBOOTH, show_default=False, range=Range(0))

    # Objective
    uncond_prob: float = option(
        defaults.UNCOND_PROB,
        help="Chance a caption is replaced by the null prompt, so guidance has an unconditional branch to use.",
        panel=TRAIN, range=Range(0, 1))
    snr_gamma: Optional[float] = option(
        None, help="Min-SNR loss weighting with this gamma (5 is common). Default: plain MSE.", panel=TRAIN,
        show_default=False, range=Range(0, 10_000, open=('low',)))
    debiased_loss: bool = option(
        False, help="Debiased-estimation loss weighting (Yu et al. 2024): 1/sqrt(SNR) on the noise MSE; more weight "
        "at high noise than min-SNR.", flags=("--debiased-loss",), panel=TRAIN)
    debiased_snr_floor: Optional[float] = option(
        None, help="With --debiased-loss: timesteps noisier than this SNR keep its weight instead of falling to 0 "
        "(v-prediction with zero terminal SNR; 0.0083 is t=850 of SD 1.5's schedule rescaled so). Default: no floor.",
        panel=TRAIN, show_default=False, range=Range(0, 1000, open=('low',), why='the weighting caps SNR at 1000'))
    noise_offset: float = option(0.0, help="Offset noise strength (0.05-0.1 helps very dark/bright images).",
                                 panel=TRAIN, range=Range(0, 1))
    # Flow matching (SD3, Flux): None until the model is known, so a DDPM model can refuse what was given.
    timestep_sampling: Optional[str] = option(
        None, help="Flow matching (SD3, Flux): how training draws sigma. Default: uniform.", panel=TRAIN,
        cli_type=TimestepSampling, show_default=False)
    logit_mean: Optional[float] = option(
        None, help="With --timestep-sampling logit-normal: the mean m of u = sigmoid(N(m, s)). Default: 0.",
        panel=TRAIN, show_default=False, range=Range(-10, 10, why='past that every draw lands at one end'))
    logit_std: Optional[float] = option(
        None, help="With --timestep-sampling logit-normal: the standard deviation s. Default: 1.", panel=TRAIN,
        show_default=False, range=Range(0, 10, open=('low',)))
    mode_scale: Optional[float] = option(
        None, help="With --timestep-sampling mode: SD3's scale, -1 to 1.75 (0: uniform). Default: 1.29.",
        panel=TRAIN, show_default=False, range=Range(-1, 2 / (math.pi - 2), why='Esser et al. 2024, eq. 20: a density only there'))
    weighting_scheme: Optional[str] = option(
        None, help="Flow matching: loss weight per sigma (sigma_sqrt: 1/sigma^2; cosmap: SD3's). Default: none.",
        panel=TRAIN, cli_type=WeightingScheme, show_default=False)
    distilled_guidance: Optional[float] = option(
        None, help="Flux-dev: the value its distilled guidance input gets while training. Default: 1.", panel=TRAIN,
        show_default=False, range=Range(0, 100))

    # What is trained
    lora: bool = option(
        True, help="Train LoRA adapters (small file) or the whole UNet or transformer (a full pipeline folder).",
        flags=("--lora/--full",), panel=TRAIN)
    adapter: str = option(
        Adapter.lora.value, help="What --lora trains (peft): lora, dora (LoRA with a trained magnitude per output "
        "row), loha (Hadamard product of two low-rank pairs) or lokr (Kronecker product).", panel=TRAIN,
        cli_type=Adapter)
    rank: int = option(4, help="LoRA rank.", panel=TRAIN, range=Range(1))
    # QLoRA: the frozen base quantized (sdcli.quantize), the LoRA trained and saved in float32.
    quantize: Optional[str] = option(None, options.QUANTIZE, parse=_parse_quantize, panel=TRAIN)
    lora_alpha: Optional[float] = option(
        None, help="LoRA alpha (scale = alpha / rank). Default: the rank.", panel=TRAIN, show_default=False, range=Range(0, 10_000, open=('low',)))
    lora_targets: tuple[str, ...] = option(
        LORA_TARGETS, help="Comma list of UNet or transformer modules that get LoRA adapters.", panel=TRAIN,
        cli_type=str, parse=_comma_tuple)
    train_text_encoder: bool = option(
        False, help="Train the text encoder(s) too (LoRA or full, like the UNet).", flags=("--train-text-encoder",),
        panel=TRAIN)
    lora_format: str = option(  # what is written, not what a step computes: a resume may change it
        LoraFormat.both.value, help="LoRA files: both (diffusers' and, for SD 1.x/2.x and SDXL, a kohya file "
        "AUTOMATIC1111 and ComfyUI load) or diffusers only.", panel=TRAIN, role=RUNTIME,
        cli_type=LoraFormat)

    # Optimisation
    learning_rate: Optional[float] = option(
        None, help="AdamW learning rate. Default: 1e-4 for LoRA, 1e-5 for --full.", flags=("--learning-rate", "--lr"),
        panel=TRAIN, show_default=False, range=Range(0, 1, open=('low',), why='AdamW moves each weight by about this much a step'))
    lr_scheduler: str = option("constant", help="Learning-rate schedule after warm-up (diffusers.optimization).",
                               panel=TRAIN, cli_type=LrScheduler)
    lr_warmup_steps: int = option(0, help="Steps of linear learning-rate warm-up.", panel=TRAIN, range=Range(0))
    weight_decay: float = option(1e-2, help="AdamW weight decay.", panel=TRAIN, range=Range(0, 1))
    batch_size: int = option(1, help="Images per step on each process.", panel=TRAIN, range=Range(1))
    gradient_accumulation: int = option(1, help="Micro-batches summed into one optimizer step.", panel=TRAIN, range=Range(1))
    max_grad_norm: float = option(1.0, help="Clip the gradient norm to this (0: no clipping).", panel=TRAIN, range=Range(0))
    mixed_precision: str = option(  # resolved before training starts
        "auto", help="Autocast precision for the UNet or transformer (frozen weights are stored in it too); auto: "
        "fp16 on CUDA, no elsewhere.", panel=TRAIN, cli_type=MixedPrecision)
    gradient_checkpointing: bool = option(
        False, help="Recompute activations in backward: less memory, ~30% slower.",
        flags=("--gradient-checkpointing",), panel=TRAIN)
    channels_last: Optional[bool] = option(None, options.CHANNELS_LAST)
    threads: Optional[int] = option(None, options.THREADS, panel=TRAIN)  # generate's rule (sdcli.threads)
    compile: bool = option(False, help="torch.compile what trains (slow first steps, faster after).",
                           flags=("--compile",), panel=TRAIN, role=RUNTIME)
    ema: bool = option(False, help="Keep an exponential moving average of the trained weights and save that.",
                       flags=("--ema",), panel=TRAIN)
    ema_decay: float = option(0.9999, help="EMA decay per step.", panel=TRAIN, range=Range(0, 1, open=('low', 'high')))
    use_8bit_adam: bool = option(False, help="8-bit AdamW from bitsandbytes (must be installed).",
                                 flags=("--use-8bit-adam",), panel=TRAIN)
    max_steps: Optional[int] = option(None, help="Optimizer steps to train. Default: 1000, unless --epochs.",
                                      panel=TRAIN, role=RUNTIME, show_default=False, range=Range(1))
    epochs: Optional[int] = option(None, help="Passes over the data (instead of --max-steps).", panel=TRAIN,
                                   role=RUNTIME, show_default=False, range=Range(1))
    seed: int = option(0, help="Seed for LoRA init, data order, noise and validation images.", panel=TRAIN, range=Range(0, 2**63 - 1))
    cache: bool = option(True, help="Encode images and captions once instead of every step.",
                         flags=("--cache/--no-cache",), panel=TRAIN)

    # Long runs
    checkpoint_every: int = option(
        500, help="Save a resumable checkpoint every N steps (0: only at the end and on Ctrl-C).", panel=LONG,
        role=RUNTIME, range=Range(0))
    keep_checkpoints: int = option(3, help="Keep only the newest K checkpoints.", panel=LONG, role=RUNTIME, range=Range(1))
    resume: Optional[str] = option(None, help="Continue from 'latest' (in --out) or a checkpoint folder.", panel=LONG,
                                   role=RUNTIME, show_default=False)
    validation_prompts: list[str] = option(
        [], help="Prompt rendered every --validation-every steps (repeatable).", flags=("--validation-prompt",),
        panel=LONG, role=RUNTIME, cli_type=list[str], show_default=False)
    validation_every: int = option(100, help="Steps between validation images and validation losses.", panel=LONG,
                                   role=RUNTIME, range=Range(1))
    # Which images train depends on the split, so a resume must keep it; a --validation-data folder only
    # changes what is measured.
    validation_split: Optional[float] = option(
        None, help="Hold out this fraction of --data (chosen by --seed) and log its loss every --validation-every "
        "steps, at fixed timesteps and noise.", panel=LONG, show_default=False, range=Range(0, 1, open=('low', 'high')))
    validation_data: Optional[Path] = option(
        None, help="Folder of captioned images to log the validation loss on (instead of --validation-split).",
        panel=LONG, role=RUNTIME, show_default=False)
    log_with: Optional[str] = option(
        None, help="Also log loss, learning rate, speed, validation loss and images to tensorboard, wandb or all, "
        "under OUT/logs.", panel=LONG, role=RUNTIME, cli_type=LogWith, show_default=False)
    validation_guidance: Optional[float] = option(
        None, help="Guidance for validation images: the classifier-free scale, or Flux-dev's distilled guidance. "
        "Default: the model's, as generate's.", panel=LONG, role=RUNTIME, show_default=False, range=Range(0))
    validation_steps: int = option(defaults.STEPS, help="Sampling steps for validation images.", panel=LONG,
                                   role=RUNTIME, range=Range(1))

    overwrite: bool = option(False, options.OVERWRITE)
    quiet: bool = option(False, options.QUIET)

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.lora else 1e-5

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Each --resolution (none before the model's native one is filled in, when none was given)."""
        r = self.resolution
        return () if r is None else tuple(r) if isinstance(r, (list, tuple)) else (r,)

    @property
    def alpha(self) -> float:
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    def check(self) -> None:
        """Raise UsageError naming the first impossible value; nothing heavy is loaded yet."""
        check_ranges(self)  # every number finite and in its declared range, before anything reads one
        self._check_data()
        self.out = Path(self.out).expanduser()
        self.lora_targets = tuple(t.strip() for t in self.lora_targets if t.strip())
        check_ddpm_weighting(self.snr_gamma, self.debiased_loss, flow=False, model="",
                             snr_floor=self.debiased_snr_floor)
        if self.lora and not self.lora_targets:
            raise UsageError("--lora-targets is empty; name at least one module, e.g. to_q,to_k,to_v,to_out.0")
        # Plain strings from here on (an Enum member given from Python too), so the settings JSON stays as it was.
        self.lr_scheduler = _choice(LrScheduler, self.lr_scheduler, "--lr-scheduler")
        self.mixed_precision = _choice(MixedPrecision, self.mixed_precision, "--mixed-precision")
        self.lora_format = _choice(LoraFormat, self.lora_format, "--lora-format")
        self.adapter = _choice(Adapter, self.adapter, "--adapter")
        if self.adapter != Adapter.lora.value and not self.lora:
            raise UsageError(f"--adapter {self.adapter} is a kind of adapter, which --full does not train "
                             "(it trains every weight); drop one of them")
        self._check_flow_options()
        if self.max_steps is not None and self.epochs is not None:
            raise UsageError("give --max-steps or --epochs, not both")
        self._check_quantize()
        self._check_validation()
        self._check_class_data()
        self._check_apart()
        if self.use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise UsageError("--use-8bit-adam needs bitsandbytes, which is not installed (pip install bitsandbytes)") from None

    def _check_quantize(self) -> None:
        """QLoRA: a LoRA on a quantized frozen base. Full fine-tuning would update the quantized weights themselves,
        which no backend trains; the mode is checked against the device here, before anything loads, and kept
        with its backend named."""
        if not self.quantize:
            return
        from sdcli.pipeline import resolve_device
        from sdcli.quantize import check_mode

        self.quantize = _parse_quantize(self.quantize)
        if not self.lora:
            raise UsageError(f"--quantize {self.quantize} with --full: full fine-tuning of quantized weights is not "
                             "supported; train a LoRA (--lora) on the quantized model, or drop --quantize",
                             setting="quantize")
        mode = check_mode(self.quantize, resolve_device(self.device))
        if not mode.trainable:
            raise UsageError(f"--quantize {self.quantize}: peft cannot train a LoRA on {mode.backend}'s {mode.kind}; "
                             "use int8-weight, fp8 or nf4", setting="quantize")
        self.quantize = mode.spec

    def _check_validation(self) -> None:
        from sdcli.generation.prompts import check_prompt_numbers

        for prompt in self.validation_prompts:  # read as generate reads prompts, so refused now, not at step N
            check_prompt_numbers(prompt, "--validation-prompt")
        if self.class_prompt:
            check_prompt_numbers(self.class_prompt, "--class-prompt")
        if self.validation_data is not None:
            if self.validation_split is not None:
                raise UsageError("give --validation-split or --validation-data, not both")
            self.validation_data = Path(self.validation_data).expanduser()
            if not self.validation_data.is_dir():
                what = "is a file, not a folder" if self.validation_data.exists() else "does not exist"
                raise UsageError(f"--validation-data {self.validation_data} {what}")
        if self.log_with is not None:
            self.log_with = _choice(LogWith, self.log_with, "--log-with")
            for name in self.trackers:
                if not _installed(TRACKER_PACKAGES[name]):
                    raise UsageError(f"--log-with {self.log_with} needs {name}, which is not installed "
                                     f"(pip install {TRACKER_PACKAGES[name]})")

    def _check_class_data(self) -> None:
        """DreamBooth's options come as a set: a class folder needs its prompt (and the prompt its folder), and
        one with no images needs --num-class-images to fill it."""
        if self.class_data is None:
            for flag, value in (("--class-prompt", self.class_prompt), ("--prior-loss-weight", self.prior_loss_weight),
                                ("--num-class-images", self.num_class_images)):
                if value is not None:
                    raise UsageError(f"{flag} is for DreamBooth prior preservation, which needs --class-data DIR "
                                     "(the class images)")
            return
        self.class_data = Path(self.class_data).expanduser()
        if not self.class_prompt or not self.class_prompt.strip():
            raise UsageError(f"--class-data {self.class_data} needs --class-prompt, the caption its images train "
                             "with (e.g. 'a photo of a dog')")
        self.prior_loss_weight = 1.0 if self.prior_loss_weight is None else float(self.prior_loss_weight)
        if self.class_data.exists() and not self.class_data.is_dir():
            raise UsageError(f"--class-data {self.class_data} is a file, not a folder")
        if not self.num_class_images and not class_images(self.class_data):
            where = "has no images" if self.class_data.is_dir() else "does not exist"
            raise UsageError(f"--class-data {self.class_data} {where}; add class images or pass "
                             "--num-class-images N to generate them with the base model")

    def _check_apart(self) -> None:
        """--data folders are read with their subfolders: a validation or class folder inside one (or holding one)
        would have its images trained on as instance data, or score the model on what it trained on."""
        for flag, other in (("--validation-data", self.validation_data), ("--class-data", self.class_data),
                            ("--masks", self.masks)):
            if other is None:
                continue
            mine = Path(other).resolve()
            for folder, _ in self.data_sources:
                data = folder.resolve()
                if mine == data or data in mine.parents or mine in data.parents:
                    raise UsageError(f"{flag} {other} overlaps --data {folder}, which is read with its subfolders: "
                                     "keep the two folders apart")

    @property
    def trackers(self) -> list[str]:
        """accelerate's tracker names for --log-with (all: both)."""
        if self.log_with is None:
            return []
        return list(TRACKER_PACKAGES) if self.log_with == LogWith.all.value else [self.log_with]

    def _check_data(self) -> None:
        given = [self.data] if isinstance(self.data, (str, Path)) else list(self.data)
        if not given:
            raise UsageError("--data is missing: give a folder of captioned images")
        if self.captions_from is not None:
            self.captions_from = Path(self.captions_from).expanduser()
            if not self.captions_from.is_file():
                what = "is a folder, not a file" if self.captions_from.is_dir() else "does not exist"
                raise UsageError(f"--captions-from {self.captions_from} {what}")
        if self.masks is not None:
            self.masks = Path(self.masks).expanduser()
            if not self.masks.is_dir():
                what = "is a file, not a folder" if self.masks.exists() else "does not exist"
                raise UsageError(f"--masks {self.masks} {what}")
        self.data = [str(spec) for spec in given]
        for spec in self.data:
            parse_data(spec)  # raises on a bad repeat count
        if self.keep_tokens and not self.shuffle_captions:
            raise UsageError("--keep-tokens keeps tags in place for --shuffle-captions, which was not given")
        ext = self.caption_extension.strip()
        ext = ext if ext.startswith(".") else "." + ext
        if ext == "." or "/" in ext or "\\" in ext or ext.lower() in (".png", ".jpg", ".jpeg", ".webp"):
            raise UsageError(f"--caption-extension must be a file extension like .txt or .caption, "
                             f"got {self.caption_extension!r}")
        self.caption_extension = ext
        if isinstance(self.resolution, (list, tuple)):
            sides = self.resolutions
            if len(set(sides)) < len(sides):
                raise UsageError(f"--resolution {','.join(map(str, sides))} names a size twice")
            if not self.upscale:
                raise UsageError("--no-upscale with several --resolution sizes is not supported: an image too small "
                                 "for one size would train at the others only")
            self.resolution = sides[0] if len(sides) == 1 else sides
        for flag, value in (("--min-bucket", self.min_bucket), ("--max-bucket", self.max_bucket)):
            if value is not None and not self.buckets:
                raise UsageError(f"{flag} sizes the aspect-ratio buckets, which --no-buckets turns off")
        if not self.upscale and not self.buckets:
            raise UsageError("--no-upscale gives small images a bucket of their own size, which --no-buckets turns "
                             "off (every image is cropped to one square)")
        if self.min_bucket is not None and self.max_bucket is not None and self.min_bucket > self.max_bucket:
            raise UsageError(f"--min-bucket {self.min_bucket} is larger than --max-bucket {self.max_bucket}")

    @property
    def data_sources(self) -> list[tuple[Path, int]]:
        """(folder, repeats) for each --data."""
        given = [self.data] if isinstance(self.data, (str, Path)) else self.data
        return [parse_data(str(spec)) for spec in given]

    def _check_flow_options(self) -> None:
        if self.timestep_sampling is not None:
            self.timestep_sampling = _choice(TimestepSampling, self.timestep_sampling, "--timestep-sampling")
        if self.weighting_scheme is not None:
            self.weighting_scheme = _choice(WeightingScheme, self.weighting_scheme, "--weighting-scheme")
        check_sampling_shape(self.timestep_sampling, logit_mean=self.logit_mean, logit_std=self.logit_std,
                             mode_scale=self.mode_scale)

    def settle_for(self, family: str, flow: bool, guidance: str) -> None:
        """Refuse options the model's training objective does not have, and fill in the flow-matching defaults.

        Min-SNR weighting is defined on DDPM's SNR for ε and v targets; offset noise makes up for a DDPM
        schedule that never reaches pure noise (Lin et al. 2024), which flow matching does at σ = 1. The
        timestep sampling and weighting schemes, in turn, are flow matching's (DDPM draws t uniformly).
        """
        flow_given = [flag for flag, value in (
            ("--timestep-sampling", self.timestep_sampling), ("--logit-mean", self.logit_mean),
            ("--logit-std", self.logit_std), ("--mode-scale", self.mode_scale),
            ("--weighting-scheme", self.weighting_scheme)) if value is not None]
        if self.distilled_guidance is not None and guidance != "distilled":
            raise UsageError(f"--distilled-guidance: this {family} model has no guidance input (only guidance-"
                             "distilled Flux, like Flux-dev, has one)")
        if self.validation_guidance is not None and guidance == "none":
            raise UsageError(f"--validation-guidance: this {family} model has no guidance (a distilled model that "
                             "needs none, like Flux-schnell)")
        if not flow:
            if flow_given:
                raise UsageError(f"{flow_given[0]} is a flow-matching option (SD3, Flux); this {family} model is a "
                                 "DDPM model, trained on uniform t (weight it with --snr-gamma)")
            return
        refuse_ddpm_weighting(self.snr_gamma, self.debiased_loss, model=f"this {family} model")  # its values: validate()
        if self.noise_offset:
            raise UsageError(f"--noise-offset: this {family} model trains by flow matching, which reaches pure noise "
                             "at sigma = 1, what offset noise approximates for DDPM models; drop it")
        if self.train_text_encoder:
            raise UsageError(f"--train-text-encoder: finetune trains the transformer only on a {family} model "
                             "(its text encoders stay frozen and cached)")
        self.timestep_sampling = self.timestep_sampling or TimestepSampling.uniform.value
        self.weighting_scheme = self.weighting_scheme or WeightingScheme.none.value
        if self.timestep_sampling == TimestepSampling.logit_normal.value:
            self.logit_mean = 0.0 if self.logit_mean is None else self.logit_mean
            self.logit_std = 1.0 if self.logit_std is None else self.logit_std
        if self.timestep_sampling == TimestepSampling.mode.value and self.mode_scale is None:
            self.mode_scale = 1.29
        if guidance == "distilled" and self.distilled_guidance is None:
            self.distilled_guidance = 1.0  # diffusers' Flux LoRA recipe (--guidance_scale=1)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["data"] = [str(path) + (f":{n}" if n != 1 else "") for path, n in self.data_sources]
        record["out"] = str(self.out)
        record["validation_data"] = str(self.validation_data) if self.validation_data is not None else None
        record["class_data"] = str(self.class_data) if self.class_data is not None else None
        record["masks"] = str(self.masks) if self.masks is not None else None
        record["captions_from"] = str(self.captions_from) if self.captions_from is not None else None
        record["lora_targets"] = list(self.lora_targets)
        record["learning_rate"] = self.lr
        record["lora_alpha"] = self.alpha if self.lora else None
        return record

    def incompatible_with(self, saved: dict[str, Any]) -> list[str]:
        """The settings that differ from a checkpoint's in a way that changes what a step does."""
        mine = self.to_json()
        names = [f.name for f in fields(self) if f.name not in RESUMABLE_CHANGES]
        differ = [n for n in names if n in saved and _norm(saved[n]) != _norm(mine[n])]
        # A folder may move, but how often each counts decides every epoch's order.
        if "data" in saved and _repeats(saved["data"]) != _repeats(mine["data"]):
            differ.append("data")
        return differ


# Settings a resumed run may change without breaking "continues exactly": the runtime ones.
RESUMABLE_CHANGES = frozenset(d.name for d in by_role(FinetuneConfig, RUNTIME))


def _choice(choices: type[Enum], value: Any, flag: str) -> str:
    try:
        return choices(value).value
    except ValueError:
        names = ", ".join(c.value for c in choices)
        raise UsageError(f"unknown {flag} {value!r}; choose from: {names}") from None


def class_images(folder: Path) -> list[Path]:
    """The images directly or deeper in a class folder (none for a missing folder), found without opening them."""
    from sdcli.training.data import IMAGE_SUFFIXES

    if not Path(folder).is_dir():
        return []
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _installed(package: str) -> bool:
    """Whether ``package`` can be imported, found without importing it (tensorboard and wandb are slow to)."""
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def parse_data(spec: str) -> tuple[Path, int]:
    """``DIR`` or ``DIR:N`` as (folder, repeats); UsageError for a repeat count that is not a whole number >= 1.

    An existing folder is taken whole, colons and all; a Windows drive's colon (C:\\photos) is never a repeat
    count, so only a last ``:N`` after it is one.
    """
    if Path(spec).expanduser().is_dir():
        return Path(spec).expanduser(), 1
    body = spec[2:] if re.match(r"[A-Za-z]:[\\/]", spec) else spec
    if ":" not in body:
        return Path(spec).expanduser(), 1
    folder, count = spec.rsplit(":", 1)
    if not re.fullmatch(r"[+-]?\d+", count.strip()):
        raise UsageError(f"--data {spec}: after the last colon comes how many times its images count an epoch "
                         f"(DIR:N, a whole number), got {count!r}")
    if int(count) < 1:
        raise UsageError(f"--data {spec}: the repeat count must be at least 1, got {int(count)}")
    return Path(folder).expanduser(), int(count)


def _repeats(data: Any) -> list[int]:
    return [parse_data(str(spec))[1] for spec in ([data] if isinstance(data, str) else data)]


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
