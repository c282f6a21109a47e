"""`generate` as plain functions: settings declared once, tasks as data, one engine that stays loaded.

- `settings`: every setting's declaration, checks that need no weights, records and replay.
- `tasks`: txt2img, img2img, inpainting, hires fix, ControlNet: each with its check, pipeline, call arguments
  and record fields.
- `run`: `plan(settings)` checks a request and lays out its images before anything loads.
- `engine`: `Engine.load(settings)` loads a model once; `engine.run(plan)` / `engine.generate(...)` serve
  requests against it, each leaving the pipeline as it found it, with one step callback and cancellation.
- `denoise`: one request's batches through the task's pipeline (guidance, NaN guard, trajectories).
- `prompts`, `prompt_editing`, `embeddings`: prompt text to conditioning (weights, BREAK, long prompts,
  `[from:to:when]`, textual inversion).
- `guidance`, `control`, `masks`, `applies`: what a request adds to the denoising and which settings apply.
- `trajectory`: x̂0 at every step, read from the one step callback.
- `outputs`, `metadata`: the writer that turns what the engine yields into files, and the record each
  image carries. `finetune`'s validation and prior images are generated, so it writes them here too.
"""

from sdcli.generation.engine import Cancelled, Engine, Step
from sdcli.generation.guidance import use_formula_guidance
from sdcli.generation.run import Generated, Job, Plan, dropped_words, plan, plan_jobs, resolve_seeds, unknown_words
from sdcli.generation.settings import (
    Settings, check_settings, parse_floats, parse_lora, parse_seeds, read_prompt_file, settings_from_record,
)

__all__ = [
    "Cancelled", "Engine", "Generated", "Job", "Plan", "Settings", "Step", "check_settings", "dropped_words",
    "parse_floats", "parse_lora", "parse_seeds", "plan", "plan_jobs", "read_prompt_file", "resolve_seeds",
    "settings_from_record", "unknown_words", "use_formula_guidance",
]
