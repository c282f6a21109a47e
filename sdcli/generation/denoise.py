"""One request's denoising: its jobs in batches through the task's pipeline, each image yielded as it exists.

The pipeline does the denoising; this module builds each batch's call (prompts or their embeddings,
guidance, seeds, the task's inputs), makes the classifier-free guidance formula hold for every scale
(`sdcli.generation.guidance`), turns diffusers' step callback into the engine's one `Step`, stops a
cancelled request between two steps, and guards against NaN images. All of it applies to every task
(`sdcli.generation.tasks`) alike. `sdcli.generation.engine.Engine.images` calls it inside a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from sdcli import __version__
from sdcli.errors import SdcliError


@dataclass
class Step:
    """One denoising step of one batch, as every listener sees it.

    ``index`` counts the steps of the whole request (hires fix's second pass continues the count) and
    ``total`` is their number; ``timestep`` is the model's timestep and ``sigma`` the noise level of
    ``latents`` after the step (None for a scheduler without σ's); ``x0`` is the model's estimate of the
    clean latents at this step, only when the request asked for it (trajectories, previews).
    """

    index: int
    total: int
    timestep: float
    sigma: float | None
    latents: Any
    x0: Any
    images: int  # images in the batch


class Cancelled(SdcliError):
    """A request stopped by its ``cancel`` between two steps (raised inside the pipeline, caught by the engine)."""


def base_record(s: Any, task: Any, loaded: Any, pipe: Any, width: int, height: int) -> dict[str, Any]:
    """What every image of a request records: its declared settings plus what the loaded model made of them."""
    from sdcli.generation.settings import settings_record
    from sdcli.schedule.samplers import schedule_type, spec_for

    spec = spec_for(pipe.scheduler)
    return {
        **settings_record(s, task.name),
        "task": task.name,
        "width": width,
        "height": height,
        "sampler": spec.a1111,
        "schedule_type": schedule_type(pipe.scheduler, s.sigmas),
        "prediction_type": loaded.prediction_type,
        "model_name": loaded.model_name,
        "model_family": loaded.family,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "sdcli_version": __version__,
    }


def batches(jobs: list[Any], batch_size: int) -> list[list[Any]]:
    """Consecutive jobs that share their guidance settings, at most ``batch_size`` together."""
    out: list[list[Any]] = []
    for job in jobs:
        last = out[-1] if out else None
        if last and len(last) < batch_size and last[0].shared() == job.shared():
            last.append(job)
        else:
            out.append([job])
    return out


def _sigma(scheduler: Any) -> float | None:
    """The noise level of the latents after the step just taken, for schedulers that keep σ's."""
    sigmas, index = getattr(scheduler, "sigmas", None), getattr(scheduler, "step_index", None)
    if sigmas is None or index is None or index >= len(sigmas):
        return None
    return float(sigmas[index])


def denoise_jobs(engine: Any, s: Any, jobs: list[Any], on_step: Callable[[Any], None], cancel: Any,
                 extra_record: dict[str, Any] | None) -> Iterator[Any]:
    """The images of ``jobs`` (`sdcli.generation.run.Job`) for request ``s`` on ``engine``'s pipeline, as
    `Generated`; raises `Cancelled` after the step under way once ``cancel`` is set."""
    import numpy as np
    import torch

    from sdcli.generation.guidance import guidance_kwargs, negative_applies
    from sdcli.generation.prompts import TextConditioning
    from sdcli.generation.run import Generated
    from sdcli.generation.tasks import task_for
    from sdcli.generation.trajectory import decode_latents

    loaded = engine.loaded
    task = task_for(s)
    kind, knob = engine.facts.guidance, engine.facts.family.knob
    # 1. The task's pipeline, size and shared arguments; what every image records.
    prepared = task.prepare(s, loaded.pipe)
    run_pipe = prepared.pipe
    base = {**base_record(s, task, loaded, run_pipe, prepared.width, prepared.height), **(extra_record or {})}
    total = task.denoising_steps(s, run_pipe.scheduler)  # as the loop runs them: PNDM's and Heun's are more

    # 2. The prompts' conditioning (a1111 syntax: sdcli's embeddings; plain: the text), batch by batch.
    text = TextConditioning(s, run_pipe, task.passes(s))
    for batch in text.regroup(batches(jobs, s.batch_size)):
        if cancel is not None and cancel.is_set():
            raise Cancelled("the request was cancelled")
        first = batch[0].values
        prompts = [j.prompt for j in batch]
        edited = text.edited(prompts)
        frames: list[Any] = []
        done = [0]

        # 3. One callback for every step: the engine's Step to the listener, the x̂0 kept for trajectories,
        # cancellation, and prompt editing's next embeddings (the tensors the pipeline holds, replaced).
        def callback(pipe, i, t, kwargs, n=len(batch), prompts=prompts, guidance=first["guidance"], edited=edited):
            x0 = getattr(pipe.scheduler, "sdcli_x0", None)
            if x0 is not None and s.save_trajectory:  # with the size that unpacks it (hires' passes differ)
                frames.append((x0.detach().float().cpu(), task.frame_size(prepared, pipe)))
            on_step(Step(index=done[0], total=max(total, done[0] + 1), timestep=float(t), sigma=_sigma(pipe.scheduler),
                         latents=kwargs.get("latents"), x0=x0, images=n))
            done[0] += 1
            if cancel is not None and cancel.is_set():
                raise Cancelled("the request was cancelled")
            return text.step_outputs(pipe, prompts, guidance, i) if edited else {}

        kwargs: dict[str, Any] = dict(
            **text.call_kwargs(prompts, first["guidance"]),
            num_inference_steps=s.steps,
            **({"eta": s.eta} if s.eta else {}),  # DDIM's η; 0, the pipelines' default, is not passed
            **guidance_kwargs(s, run_pipe, first),
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
            output_type="np",
            callback_on_step_end=callback,
            **prepared.call,
        )
        if engine.facts.family.call is not None:  # the family's last word on its call (the generic one trims it)
            kwargs = engine.facts.family.call(run_pipe, kwargs)
        if s.true_cfg and kwargs.get("negative_prompt") is None:
            # diffusers' Flux runs true CFG only with a negative prompt; without one, against the empty prompt.
            kwargs["negative_prompt"] = [""] * len(batch)

        # 4. Denoise, refuse NaN, finish (inpainting composites), decode the trajectory frames.
        arrays = task.denoise(prepared, kwargs)
        if np.isnan(arrays).any():
            hint = " (float16 overflow: try --dtype bfloat16 or float32)" if loaded.dtype == torch.float16 else ""
            raise SdcliError(f"the model produced NaN values instead of an image{hint}")
        images = task.finish(prepared, run_pipe.numpy_to_pil(arrays))
        frames_per_image: list[list[Any]] = [[] for _ in batch]
        for x0, size in frames:
            for k, frame in enumerate(decode_latents(run_pipe, x0, size)):
                frames_per_image[k].append(frame)
        # An image whose pass read no negative prompt (guidance 1 in a sweep) does not record one.
        unread = {} if negative_applies(s, kind, first["guidance"], knob) else {"negative_prompt": ""}
        for job, image, trajectory in zip(batch, images, frames_per_image):
            yield Generated(image=image, record={**base, **job.values, **unread}, job=job, trajectory=trajectory)
