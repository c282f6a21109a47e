"""`generate` as plain functions: settings declared once, tasks as data, one run loop.

- `settings`: every setting's declaration, checks that need no weights, records and replay.
- `tasks`: txt2img and img2img, each with its check, pipeline, call arguments and record fields.
- `run`: plan the images, load the pipeline, denoise; `generate(plan)` yields each image as it exists, and
  `run_generate(settings, out=...)` writes them, as the command does.
- `prompts`, `prompt_editing`, `embeddings`: prompt text to conditioning (weights, BREAK, long prompts,
  `[from:to:when]`, textual inversion).
- `guidance`, `control`, `masks`, `applies`: what a request adds to the denoising and which settings apply.
- `trajectory`: x̂0 at every step, read from the one step callback.
- `outputs`, `metadata`: the writer that turns what `generate` yields into files, and the record each
  image carries. `finetune`'s validation and prior images are generated, so it writes them here too.
"""

from sdcli.generation.run import (
    Generated, Job, Plan, dropped_words, generate, iter_images, plan, plan_jobs, prepare_pipeline, resolve_seeds,
    run_generate, unknown_words,
)
from sdcli.generation.guidance import use_formula_guidance
from sdcli.generation.settings import (
    Settings, check_settings, parse_floats, parse_lora, parse_seeds, read_prompt_file, settings_from_record,
)

__all__ = [
    "Generated", "Job", "Plan", "Settings", "check_settings", "dropped_words", "generate", "iter_images", "parse_floats", "parse_lora",
    "parse_seeds", "plan", "plan_jobs", "prepare_pipeline", "read_prompt_file", "resolve_seeds",
    "run_generate", "settings_from_record", "unknown_words", "use_formula_guidance",
]
