"""Options shared between commands, defined once as `Annotated` aliases.

Choices are enums so `--help` lists them and typos fail at parse time.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sdcli import defaults
from sdcli.declare import Opt, Range, Role
from sdcli.schedule.core import TimestepSpacing  # declared once, beside the schedule code that checks it


class Device(str, Enum):
    auto = "auto"
    cuda = "cuda"
    mps = "mps"
    cpu = "cpu"


class Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class CompileMode(str, Enum):
    """torch.compile's modes as sdcli offers them (sdcli.pipeline.COMPILE_MODES says what each sets)."""

    default = "default"
    reduce_overhead = "reduce-overhead"
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


def alias(opt: Opt, type_: Any, default_flag: str) -> Any:
    """The `Annotated` alias of a shared option, for commands that take it as a plain parameter."""
    kwargs: dict[str, Any] = {"help": opt.help}
    if opt.envvar:
        kwargs.update(envvar=opt.envvar, show_envvar=False)
    if opt.show_default is not True:
        kwargs["show_default"] = opt.show_default
    return Annotated[type_, typer.Option(*(opt.flags or (default_flag,)), **kwargs)]


# Each shared option once; settings dataclasses declare their fields with these (sdcli.declare.option).
MODEL = Opt(
    "Hub id, local diffusers folder, or single-file .safetensors checkpoint (default: $SDCLI_MODEL, else the bundled model).",
    flags=("--model", "-m"), envvar=defaults.MODEL_ENV, show_default=False,
)
REVISION = Opt("Hub revision (branch, tag or commit) of --model.")
VARIANT = Opt("Weights variant of --model, e.g. fp16.")
ALLOW_PICKLE = Opt("Allow pickled weights (.ckpt/.bin/.pt), which can run arbitrary code.", flags=("--allow-pickle",),
                   role=Role.RUNTIME)
DEVICE = Opt("Where to run: auto picks cuda, then mps, then cpu.", flags=("--device",), cli_type=Device, role=Role.RUNTIME)
DTYPE = Opt("Weights precision: auto is float16 on cuda, float32 elsewhere.", flags=("--dtype",), cli_type=Dtype,
            role=Role.RUNTIME)
CHANNELS_LAST = Opt("UNet in channels-last memory format. Default: on CUDA with --compile.",
                    flags=("--channels-last/--no-channels-last",), role=Role.RUNTIME, show_default=False)
SCHEDULER = Opt("Sampler by name: sdcli's (euler-ancestral, dpm++2m-karras, ...), AUTOMATIC1111's (\"Euler a\", "
                "\"DPM++ 2M Karras\") or ComfyUI's (euler_ancestral, dpmpp_2m); 'list' lists them. Default: the model's own.",
                flags=("--scheduler", "-s", "--sampler"))
SPACING = Opt("How sampling timesteps are spread over training ones.", flags=("--timestep-spacing",),
              cli_type=TimestepSpacing)

Model = alias(MODEL, Optional[str], "--model")
Revision = alias(REVISION, Optional[str], "--revision")
Variant = alias(VARIANT, Optional[str], "--variant")
AllowPickle = alias(ALLOW_PICKLE, bool, "--allow-pickle")
DeviceOpt = alias(DEVICE, Device, "--device")
DtypeOpt = alias(DTYPE, Dtype, "--dtype")
ChannelsLast = alias(CHANNELS_LAST, Optional[bool], "--channels-last")
Scheduler = alias(SCHEDULER, Optional[str], "--scheduler")
Spacing = alias(SPACING, Optional[TimestepSpacing], "--timestep-spacing")
THREADS = Opt("CPU threads for torch. Default: one per core that other processes are not keeping busy.",
              role=Role.RUNTIME, show_default=False, range=Range(1, 1024))
Threads = alias(THREADS, Optional[int], "--threads")
QUIET = Opt("No progress or notes on stderr; results only.", flags=("--quiet", "-q"), role=Role.RUNTIME)
OVERWRITE = Opt("Replace existing output files.", flags=("--overwrite",), role=Role.RUNTIME)
Quiet = alias(QUIET, bool, "--quiet")
Json = Annotated[bool, typer.Option("--json", help="Print JSON records on stdout instead of plain lines.")]
Overwrite = alias(OVERWRITE, bool, "--overwrite")
OutPath = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder or file.")]
# Big models on small cards (sdcli.quantize): decided when the model loads, recorded with what it makes.
QUANTIZE = Opt("Quantize the denoiser's weights: int8-weight (torchao, runs on the CPU), int8 or nf4 (bitsandbytes, "
               "CUDA), fp8 or int4-weight (torchao, CUDA); BACKEND:MODE names the backend (torchao:int8-weight).",
               show_default=False)
QUANTIZE_TEXT_ENCODER = Opt("With --quantize: quantize the text encoders too (T5 is most of Flux's and SD3's).",
                            flags=("--quantize-text-encoder",))
