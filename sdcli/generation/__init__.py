"""`generate` as plain functions: settings declared once, tasks as data, one run loop.

- `settings`: every setting's declaration, checks that need no weights, records and replay.
- `tasks`: txt2img and img2img, each with its check, pipeline, call arguments and record fields.
- `run`: plan the images, load the pipeline, denoise; `generate(plan)` yields each image as it exists.

The writer (`sdcli.outputs`) turns what `generate` yields into files.
"""

from sdcli.generation.run import (
    Generated, Job, Plan, dropped_words, generate, iter_images, plan, plan_jobs, prepare_pipeline, resolve_seeds,
    unknown_words,
)
from sdcli.generation.guidance import use_formula_guidance
from sdcli.generation.settings import (
    Settings, check_settings, parse_floats, parse_lora, parse_seeds, read_prompt_file, settings_from_record,
)

__all__ = [
    "Generated", "Job", "Plan", "Settings", "check_settings", "dropped_words", "generate", "iter_images", "parse_floats", "parse_lora",
    "parse_seeds", "plan", "plan_jobs", "prepare_pipeline", "read_prompt_file", "resolve_seeds",
    "settings_from_record", "unknown_words", "use_formula_guidance",
]
