"""The reverse process made visible: the model's estimate of the clean image at every step."""

from __future__ import annotations

from typing import Any


class StepRecorder:
    """Wraps ``scheduler.step`` to keep the model's estimate of the clean latent x̂_0 at each step.

    Most schedulers return it as ``pred_original_sample``; for the rest
    (DPM-Solver, UniPC, PNDM, which work on x_t directly) it follows in closed
    form from x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε.
    """

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler
        self.x0: list[Any] = []
        self._step = scheduler.step

    def __enter__(self) -> "StepRecorder":
        self.scheduler.step = self._record
        return self

    def __exit__(self, *exc: Any) -> None:
        self.scheduler.step = self._step

    def _record(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        out = self._step(model_output, timestep, sample, *args, return_dict=True, **kwargs)
        x0 = getattr(out, "pred_original_sample", None)
        if x0 is None:
            x0 = self._closed_form_x0(model_output, timestep, sample)
        self.x0.append(x0.detach().float().cpu())
        return out if return_dict else (out.prev_sample,)

    def _closed_form_x0(self, model_output, timestep, sample):
        if not hasattr(self.scheduler, "alphas_cumprod"):
            # Flow matching: x_t = (1 − σ)·x_0 + σ·ε and the model predicts v = ε − x_0, so x̂_0 = x_t − σ·v;
            # the scheduler's timestep is σ·T.
            sigma = float(timestep) / self.scheduler.config.num_train_timesteps
            return sample - sigma * model_output
        a = self.scheduler.alphas_cumprod.to(sample.device)[int(timestep)].to(sample.dtype)
        kind = self.scheduler.config.get("prediction_type", "epsilon")
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
    from sdcli.latents import decode

    latents = pipe_family(pipe).unpack_latents(pipe, latents, size)
    return pipe.image_processor.postprocess(decode(pipe.vae, latents).float(), output_type="pil")
