"""Options shared between commands, defined once as `Annotated` aliases.

Choices are enums so `--help` lists them and typos fail at parse time.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdcli import defaults


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


class TimestepSpacing(str, Enum):
    leading = "leading"
    linspace = "linspace"
    trailing = "trailing"


Model = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        envvar=defaults.MODEL_ENV,
        help="Hub id, local diffusers folder, or single-file .safetensors checkpoint (default: $SDCLI_MODEL, else the bundled model).",
        show_default=False,
        show_envvar=False,
    ),
]
Revision = Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) of --model.")]
Variant = Annotated[Optional[str], typer.Option(help="Weights variant of --model, e.g. fp16.")]
AllowPickle = Annotated[
    bool,
    typer.Option("--allow-pickle", help="Allow pickled weights (.ckpt/.bin/.pt), which can run arbitrary code."),
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run: auto picks cuda, then mps, then cpu.")]
DtypeOpt = Annotated[
    Dtype, typer.Option("--dtype", help="Weights precision: auto is float16 on cuda, float32 elsewhere.")
]
ChannelsLast = Annotated[
    Optional[bool],
    typer.Option("--channels-last/--no-channels-last", help="UNet in channels-last memory format. Default: on CUDA.",
                 show_default=False),
]
Scheduler = Annotated[
    Optional[str],
    typer.Option(
        "--scheduler",
        "-s",
        help="Sampler by friendly name (ddim, euler, dpm++2m-karras, ...); 'list' lists them. Default: the model's own.",
    ),
]
Spacing = Annotated[
    Optional[TimestepSpacing],
    typer.Option("--timestep-spacing", help="How sampling timesteps are spread over training ones."),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes on stderr; results only.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON records on stdout instead of plain lines.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
OutPath = Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder or file.")]
