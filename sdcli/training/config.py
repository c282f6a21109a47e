"""Every fine-tuning setting in one dataclass, checked before any work starts.

The same object is written to OUT/training_settings.json and into every
checkpoint, so a run records what made it and a resume can refuse settings
that would not continue the same run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sdcli import defaults
from sdcli.errors import UsageError

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
DEFAULT_MAX_STEPS = 1000

# Settings a resumed run may change without breaking "continues exactly":
# they decide when to stop, what to report and where, or how fast a step runs (memory layout,
# compilation; the same parameter names either way), never what a step computes.
RESUMABLE_CHANGES = {
    "max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "resume", "out", "overwrite", "quiet",
    "validation_prompts", "validation_every", "validation_guidance", "validation_steps", "data", "model",
    "strict", "device", "channels_last", "compile",
}


@dataclass
class FinetuneConfig:
    """What `sdcli finetune` does; field names match the command's options."""

    data: Path
    out: Path
    model: str | None = None
    revision: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    device: str = "auto"

    # Data
    caption_column: str = "text"
    strict: bool = False
    allow_empty_captions: bool = False
    resolution: int | None = None  # None: the model's native size
    center_crop: bool = True
    flip: bool = False

    # Objective
    uncond_prob: float = defaults.UNCOND_PROB
    snr_gamma: float | None = None
    noise_offset: float = 0.0

    # What is trained
    lora: bool = True
    rank: int = 4
    lora_alpha: float | None = None  # None: equal to rank (scale 1)
    lora_targets: tuple[str, ...] = LORA_TARGETS
    train_text_encoder: bool = False

    # Optimisation
    learning_rate: float | None = None  # None: 1e-4 for LoRA, 1e-5 for full
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    batch_size: int = 1
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # fp16 on CUDA, no elsewhere; resolved before training starts
    gradient_checkpointing: bool = False
    channels_last: bool | None = None  # None: on CUDA
    compile: bool = False
    ema: bool = False
    ema_decay: float = 0.9999
    use_8bit_adam: bool = False
    max_steps: int | None = None
    epochs: int | None = None
    seed: int = 0
    cache: bool = True

    # Long runs
    checkpoint_every: int = 500  # 0: only at the end and on Ctrl-C
    keep_checkpoints: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    validation_prompts: list[str] = field(default_factory=list)
    validation_every: int = 100
    validation_guidance: float = defaults.GUIDANCE
    validation_steps: int = defaults.STEPS

    overwrite: bool = False
    quiet: bool = False

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.lora else 1e-5

    @property
    def alpha(self) -> float:
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    def check(self) -> None:
        """Raise UsageError naming the first impossible value; nothing heavy is loaded yet."""
        self.data = Path(self.data).expanduser()
        self.out = Path(self.out).expanduser()
        self.lora_targets = tuple(t.strip() for t in self.lora_targets if t.strip())
        positive = {
            "--rank": self.rank, "--batch-size": self.batch_size, "--gradient-accumulation": self.gradient_accumulation,
            "--keep-checkpoints": self.keep_checkpoints, "--validation-every": self.validation_every,
            "--validation-steps": self.validation_steps,
        }
        for name, value in positive.items():
            if value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        if not 0.0 <= self.uncond_prob <= 1.0:
            raise UsageError(f"--uncond-prob must be between 0 and 1, got {self.uncond_prob}")
        if self.resolution is not None and self.resolution < 8:
            raise UsageError(f"--resolution must be at least 8, got {self.resolution}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise UsageError(f"--snr-gamma must be positive, got {self.snr_gamma}")
        for name, value in (("--noise-offset", self.noise_offset), ("--max-grad-norm", self.max_grad_norm),
                            ("--lr-warmup-steps", self.lr_warmup_steps), ("--checkpoint-every", self.checkpoint_every),
                            ("--weight-decay", self.weight_decay)):
            if value < 0 or math.isnan(value):
                raise UsageError(f"{name} must not be negative, got {value}")
        if not self.lr > 0:
            raise UsageError(f"--learning-rate must be positive, got {self.lr}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise UsageError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if not 0.0 < self.ema_decay < 1.0:
            raise UsageError(f"--ema-decay must be between 0 and 1, got {self.ema_decay}")
        if self.lora and not self.lora_targets:
            raise UsageError("--lora-targets is empty; name at least one module, e.g. to_q,to_k,to_v,to_out.0")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise UsageError(f"unknown --lr-scheduler {self.lr_scheduler!r}; choose from: {', '.join(LR_SCHEDULERS)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UsageError(f"unknown --mixed-precision {self.mixed_precision!r}; choose from: {', '.join(MIXED_PRECISION)}")
        if self.max_steps is not None and self.epochs is not None:
            raise UsageError("give --max-steps or --epochs, not both")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.epochs is not None and self.epochs < 1:
            raise UsageError(f"--epochs must be at least 1, got {self.epochs}")
        if self.use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise UsageError("--use-8bit-adam needs bitsandbytes, which is not installed (pip install bitsandbytes)") from None

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["data"] = str(self.data)
        record["out"] = str(self.out)
        record["lora_targets"] = list(self.lora_targets)
        record["learning_rate"] = self.lr
        record["lora_alpha"] = self.alpha if self.lora else None
        return record

    def incompatible_with(self, saved: dict[str, Any]) -> list[str]:
        """The settings that differ from a checkpoint's in a way that changes what a step does."""
        mine = self.to_json()
        names = [f.name for f in fields(self) if f.name not in RESUMABLE_CHANGES]
        return [n for n in names if n in saved and _norm(saved[n]) != _norm(mine[n])]


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
