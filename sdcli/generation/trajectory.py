"""The reverse process made visible: the model's estimate of the clean image at every step."""

from __future__ import annotations

from typing import Any


def closed_form_x0(scheduler: Any, model_output: Any, timestep: Any, sample: Any) -> Any:
    """The model's estimate of the clean latent x̂_0 at a step whose scheduler does not return one (DPM-Solver,
    UniPC, PNDM work on x_t directly), from x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε and what the model predicts.

    The engine's step callback reads it (`sdcli.generation.engine.Step.x0`); most schedulers return it
    themselves as ``pred_original_sample``.
    """
    if not hasattr(scheduler, "alphas_cumprod"):
        # Flow matching: x_t = (1 − σ)·x_0 + σ·ε and the model predicts v = ε − x_0, so x̂_0 = x_t − σ·v;
        # the scheduler's timestep is σ·T.
        sigma = float(timestep) / scheduler.config.num_train_timesteps
        return sample - sigma * model_output
    a = scheduler.alphas_cumprod.to(sample.device)[int(timestep)].to(sample.dtype)
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * model_output
    if kind == "sample":
        return model_output
    return (sample - (1 - a).sqrt() * model_output) / a.sqrt()


def decode_latents(pipe: Any, latents: Any, size: tuple[int, int] | None = None) -> list[Any]:
    """Latents -> PIL images through the pipeline's VAE (used for trajectory frames).

    Flux works on 2x2-packed latents (B, tokens, 4·C); ``size`` (width, height in pixels) unpacks them
    (the family's ``unpack_latents``).
    """
    from sdcli.families import pipe_family

    family = pipe_family(pipe)
    pixels = family.decode(pipe, family.unpack_latents(pipe, latents, size))
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")
