"""Noise schedules and the samplers that walk them, as diffusers defines them.

- `core`: a schedule as its forward process (α_t, σ_t per training timestep), built from a preset or a
  model's config; the sampling timesteps; the numbers `inspect-schedule` shows.
- `samplers`: the sampler names `generate --scheduler` takes, each a diffusers scheduler class and settings.
- `report`: how `inspect-schedule` lays the numbers out (table, CSV, JSON, plot, noised strip).
- `inspect`: `inspect-schedule`'s work as one plain call (build, describe, write the files).

Only the standard library is imported here; torch and diffusers come inside the functions that need them.
"""

from sdcli.schedule.core import (
    PRESETS, ForwardProcess, Schedule, build, describe, is_flow, model_config, parse_timesteps, preset_config, q_sample,
    row, sampling, with_overrides,
)

__all__ = [
    "PRESETS", "ForwardProcess", "Schedule", "build", "describe", "is_flow", "model_config", "parse_timesteps",
    "preset_config", "q_sample", "row", "sampling", "with_overrides",
]
