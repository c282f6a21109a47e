"""--log-with: the run's numbers and validation images in TensorBoard or Weights & Biases, through accelerate.

accelerate owns the trackers (`Accelerator(log_with=..., project_dir=OUT/logs)`, `init_trackers`, `log`,
`end_training` closes them); this module names what is logged. Everything here runs on the main process
only (accelerate's tracker calls are main-process calls). The packages were checked for in
`FinetuneConfig.check`, before anything heavy loaded.

TensorBoard: event files under OUT/logs/sdcli-finetune (`tensorboard --logdir OUT/logs`), scalars
train/loss, train/lr, train/steps_per_s, train/images_per_s and validation/loss, one image per validation
prompt under validation/<nn-prompt>. wandb: project sdcli-finetune, the run named after OUT, its files in
OUT/logs/wandb.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROJECT = "sdcli-finetune"


def start(accelerator, cfg, logs: Path) -> None:
    """Open the trackers with every setting as the run's configuration."""
    if not cfg.trackers:
        return
    if accelerator.is_main_process:
        logs.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(PROJECT, config=hyperparameters(cfg.to_json()),
                              init_kwargs={"wandb": {"name": Path(cfg.out).resolve().name, "dir": str(logs)}})


def hyperparameters(record: dict[str, Any]) -> dict[str, Any]:
    """The settings as TensorBoard's hparams take them: numbers, strings and booleans (a list as a comma list)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        flat[key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def log_step(accelerator, cfg, step: int, values: dict[str, float | None]) -> None:
    """One optimizer step's numbers (those that are not None)."""
    if cfg.trackers:
        accelerator.log({k: v for k, v in values.items() if v is not None}, step=step)


def log_images(accelerator, cfg, step: int, paths: list[Path]) -> None:
    """The validation images of one step, each under its file's name (00-a-red-circle)."""
    if not cfg.trackers or not paths or not accelerator.is_main_process:
        return
    import numpy as np
    from PIL import Image

    images = {f"validation/{p.stem}": np.asarray(Image.open(p).convert("RGB")) for p in paths}
    if "tensorboard" in cfg.trackers:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for tag, image in images.items():
            writer.add_images(tag, image[None], step, dataformats="NHWC")
        writer.flush()
    if "wandb" in cfg.trackers:
        import wandb

        prompts = dict(zip(images, cfg.validation_prompts))
        accelerator.get_tracker("wandb", unwrap=True).log(
            {"validation": [wandb.Image(image, caption=prompts.get(tag, tag)) for tag, image in images.items()]},
            step=step)
