"""Running `generate`: plan the images, load the pipeline, denoise, and hand each image on as it exists.

The pipeline does the denoising; this module decides what to run (prompts ×
sweep values × seeds), makes the classifier-free guidance formula hold for
every scale, guards against NaN images, and watches the reverse process
through the scheduler so it can be shown. All of it applies to every task
(`sdcli.generation.tasks`) alike.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sdcli import __version__, defaults, threads
from sdcli.errors import ModelError, SdcliError, UsageError
from sdcli.generation.settings import Settings, check_settings, check_size, settings_record, sweep_axes
from sdcli.generation.guidance import guidance_kwargs, settle_guidance, use_formula_guidance
from sdcli.generation.tasks import Task, task_for
from sdcli.progress import note


@dataclass
class Job:
    """One image: its value on every sweep axis (prompt, guidance, rescale, seed) and its place in the run."""

    values: dict[str, Any]  # record key -> value
    index: int

    @property
    def prompt(self) -> str:
        return self.values["prompt"]

    @property
    def seed(self) -> int:
        return self.values["seed"]

    def shared(self) -> tuple[Any, ...]:
        """What every image of a batch must share: all sweep values but the prompt and the seed."""
        return tuple(v for k, v in self.values.items() if k not in ("prompt", "seed"))


@dataclass
class Generated:
    image: Any  # PIL.Image
    record: dict[str, Any]  # what the image's metadata holds
    job: Job
    trajectory: list[Any] = field(default_factory=list)  # PIL images of x̂_0, one per scheduler step


@dataclass
class Plan:
    """What a run will make, settled before any weights load."""

    settings: Settings
    task: Task
    seeds: list[int]
    jobs: list[Job]
    state: Any = None  # accelerate's PartialState when several processes share the jobs

    @property
    def is_main(self) -> bool:
        return self.state is None or self.state.is_main_process

    def swept(self) -> list[Any]:
        """The sweep axes (other than prompts and seeds) that take more than one value."""
        return [d for d in sweep_axes() if d.opt.label and len(getattr(self.settings, d.name)) > 1]


# 1. Planning: everything that needs no weights --------------------------------------------------


def resolve_seeds(s: Settings) -> list[int]:
    """The seeds to use: the given list, or N consecutive from the given (or a random) seed."""
    if s.seeds and len(s.seeds) > 1:
        return list(s.seeds)
    start = s.seeds[0] if s.seeds else secrets.randbelow(2**32)
    return [start + i for i in range(s.num_images)]


def plan_jobs(s: Settings, seeds: list[int]) -> list[Job]:
    """Every combination of the sweep axes, in declaration order (prompt, guidance, rescale, seed):
    jobs sharing their guidance settings are neighbours, so they batch together."""
    axes = [(d.record_key, seeds if d.record_key == "seed" else getattr(s, d.name)) for d in sweep_axes()]
    # An unset guidance is the classifier-free default (plan() settles it per model family first).
    axes = [(k, v or [defaults.GUIDANCE]) if k == "guidance" else (k, v) for k, v in axes]
    keys = [k for k, _ in axes]
    return [Job(dict(zip(keys, combo)), i) for i, combo in enumerate(itertools.product(*(v for _, v in axes)))]


def plan(s: Settings, *, distributed: bool = True, model_on_disk: bool = True, facts: Any = None) -> Plan:
    """Check the settings, settle the model, seeds and jobs; raises before anything heavy loads.

    ``model_on_disk=False`` is for a pipeline already in memory whose weights are still to be
    written (finetune's validation images): its model is recorded as named, not looked up, and
    ``facts`` (`sdcli.pipeline.facts_of(pipe)`) says what kind of model it is.
    """
    from sdcli import distributed as dist
    from sdcli.pipeline import absolute_if_local, model_facts, resolve_model
    from sdcli.generation.applies import check_family, check_rescale, check_task
    from sdcli.generation.settings import check_lora_tensors
    from sdcli.generation.prompts import check_prompt_editing

    check_settings(s)
    task = task_for(s)
    task.check(s)
    check_task(s, task)
    if model_on_disk:
        s.model = absolute_if_local(resolve_model(s.model))
        facts = model_facts(s.model, s.revision)
        check_size(s, facts.size_multiple)
        from sdcli.memory import check_generation

        check_generation(s)  # refuses, in one line, a size that would outgrow memory once the weights load
    if facts is not None:
        check_prompt_editing([*s.prompts, s.negative_prompt], s.prompt_syntax, facts.class_name)
        check_family(s, facts)
        check_rescale(s, facts, task)
        settle_guidance(s, facts)
        from sdcli.generation.embeddings import check_embeddings_fit

        check_embeddings_fit(s.embeddings, s.allow_pickle, s.model if model_on_disk else None, facts.class_name,
                             s.revision)
    for path, _scale in s.loras:
        check_lora_tensors(path)
    if s.init_image:
        s.init_image = absolute_if_local(s.init_image)
    st = dist.state() if distributed else None
    seeds = dist.broadcast(resolve_seeds(s), st)  # a random seed is the main process's
    if st is not None and s.device == "auto":
        s.device = str(st.device)
    return Plan(settings=s, task=task, seeds=seeds, jobs=plan_jobs(s, seeds), state=st)


# 2. Loading and preparing the pipeline ---------------------------------------------------------


def prepare_pipeline(s: Settings):
    """Load the model, set the sampler, load LoRAs and apply memory/speed options."""
    from sdcli.pipeline import apply_runtime_options, load_pipeline, replace_vae
    from sdcli.generation.prompts import prepare_text_encoders
    from sdcli.schedule.samplers import make_scheduler

    loaded = load_pipeline(
        s.model, revision=s.revision, variant=s.variant, allow_pickle=s.allow_pickle, device=s.device, dtype=s.dtype,
        cpu_offload=s.cpu_offload,
    )
    pipe = loaded.pipe
    threads.apply(s.threads, loaded.device)
    if s.vae:
        replace_vae(loaded, s.vae, cpu_offload=s.cpu_offload)
    if s.scheduler is not None or s.timestep_spacing is not None or s.sigmas != "default":
        pipe.scheduler = make_scheduler(s.scheduler, pipe.scheduler.config, s.timestep_spacing, s.sigmas)
    trained = pipe.scheduler.config.get("num_train_timesteps", 1000)
    if s.steps > trained:
        raise UsageError(f"--steps {s.steps}: this model was trained on {trained} timesteps, so a sampler can take "
                         f"at most {trained} steps")
    if s.loras:
        load_loras(pipe, s.loras, allow_pickle=s.allow_pickle)
    prepare_text_encoders(pipe, s)  # textual-inversion embeddings loaded, --clip-skip checked
    apply_runtime_options(
        pipe, device=loaded.device, vae_tiling=s.vae_tiling, attention_slicing=s.attention_slicing,
        compile=s.compile, compile_mode=s.compile_mode, channels_last=s.channels_last, has_lora=bool(s.loras),
        cpu_offload=s.cpu_offload,
    )
    use_formula_guidance(pipe)
    return loaded


def load_loras(pipe: Any, loras: list[tuple[str, float]], allow_pickle: bool = False) -> None:
    """Load each LoRA as its own adapter: safetensors only, unless ``allow_pickle`` (.bin files, checked earlier)."""
    names = []
    for i, (path, _scale) in enumerate(loras):
        name = f"lora{i}"
        # A file by its folder and name, so diffusers reads it in the format its suffix says.
        where, weight_name = (str(Path(path).parent), Path(path).name) if Path(path).is_file() else (path, None)
        try:
            pipe.load_lora_weights(where, weight_name=weight_name, adapter_name=name,
                                   use_safetensors=None if allow_pickle else True)
        except Exception as exc:  # noqa: BLE001 - any failure here means the LoRA does not fit
            msg = " ".join(str(exc).split())[:300]
            raise ModelError(f"LoRA {path} does not fit this model: {msg}") from exc
        # diffusers skips a LoRA none of whose layers match (another family's) with only a warning.
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            raise ModelError(f"LoRA {path} does not fit this model: none of its layers match "
                             f"{type(pipe).__name__}'s (a LoRA for another model family?)")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _path, scale in loras])


def dropped_words(tokenizer: Any, prompt: str) -> str | None:
    """The words a prompt loses to the text encoder's token limit, or None."""
    limit = tokenizer.model_max_length
    if not limit or limit > 100_000:
        return None
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
    if len(ids) <= limit:
        return None
    return tokenizer.decode(ids[limit - 1 : -1]).strip()


def unknown_words(tokenizer: Any, prompt: str) -> list[str]:
    """Words of ``prompt`` that are not whole tokens of ``tokenizer``'s vocabulary.

    Meaningful for a model whose vocabulary is its training captions' words
    (the bundled one); a real CLIP splits rare words into known pieces.
    """
    import re

    vocab = tokenizer.get_vocab()
    words = re.findall(r"[a-z0-9']+", prompt.lower())
    return list(dict.fromkeys(w for w in words if f"{w}</w>" not in vocab))


def warn_prompts(loaded: Any, prompts: list[str], quiet: bool, syntax: str = "plain") -> None:
    """Unbalanced brackets, words the text encoder will drop, and words the bundled toy model has never seen."""
    from sdcli.generation.prompts import prompt_warnings, reads_whole, visible_text

    tokenizer = getattr(loaded.pipe, "tokenizer", None)
    if tokenizer is None:
        return
    bundled = Path(loaded.model).expanduser().resolve() == defaults.BUNDLED_MODEL.resolve()
    for p in dict.fromkeys(prompts):
        for warning in prompt_warnings(p, syntax):
            note(quiet, warning)
        lost = None if reads_whole(loaded.pipe, syntax) else dropped_words(tokenizer, p)
        if lost:
            note(quiet, f"warning: prompt longer than the text encoder's {tokenizer.model_max_length} tokens; "
                        f"ignored: {lost!r}")
        unknown = unknown_words(tokenizer, visible_text(p, syntax)) if bundled else []
        if unknown:
            note(quiet, f"warning: the bundled shapes model has never seen {', '.join(map(repr, unknown))}; it knows "
                        "only colours, shapes, sizes, positions and backgrounds (use --model for a real model)")


# 3. Denoising -----------------------------------------------------------------------------------


def base_record(s: Settings, task: Task, loaded: Any, width: int, height: int) -> dict[str, Any]:
    """What every image of a run records: its declared settings plus what the loaded model made of them."""
    from sdcli.schedule.samplers import schedule_type, spec_for

    spec = spec_for(loaded.pipe.scheduler)
    return {
        **settings_record(s, task.name),
        "task": task.name,
        "width": width,
        "height": height,
        "sampler": spec.a1111,
        "schedule_type": schedule_type(loaded.pipe.scheduler),
        "prediction_type": loaded.prediction_type,
        "model_name": loaded.model_name,
        "model_family": loaded.family,
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "sdcli_version": __version__,
    }


def batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Consecutive jobs that share their guidance settings, at most ``batch_size`` together."""
    out: list[list[Job]] = []
    for job in jobs:
        last = out[-1] if out else None
        if last and len(last) < batch_size and last[0].shared() == job.shared():
            last.append(job)
        else:
            out.append([job])
    return out


def iter_images(
    s: Settings,
    loaded: Any,
    jobs: list[Job],
    on_step: Callable[[int], None] | None = None,
    extra_record: dict[str, Any] | None = None,
) -> Iterator[Generated]:
    """Run ``jobs`` in batches and yield each image with its record as soon as it exists."""
    import numpy as np
    import torch

    from sdcli.generation.prompts import TextConditioning
    from sdcli.generation.trajectory import StepRecorder, decode_latents

    from sdcli.generation.guidance import negative_applies
    from sdcli.pipeline import facts_of

    task = task_for(s)
    kind = facts_of(loaded.pipe).guidance
    prepared = task.prepare(s, loaded.pipe)
    run_pipe = prepared.pipe
    base = {**base_record(s, task, loaded, prepared.width, prepared.height), **(extra_record or {})}

    text = TextConditioning(s, run_pipe, task.passes(s))  # prompt embeddings (a1111 syntax) or the plain text
    for batch in text.regroup(batches(jobs, s.batch_size)):
        first = batch[0].values
        prompts = [j.prompt for j in batch]
        edited = text.edited(prompts)

        def callback(pipe, i, _t, _kwargs, n=len(batch), prompts=prompts, guidance=first["guidance"], edited=edited):
            if on_step:
                on_step(n)
            # Prompt editing: the next step's embeddings replace the tensors the pipeline holds.
            return text.step_outputs(pipe, prompts, guidance, i) if edited else {}

        kwargs: dict[str, Any] = dict(
            **text.call_kwargs(prompts, first["guidance"]),
            num_inference_steps=s.steps,
            **guidance_kwargs(s, run_pipe, first),
            generator=[torch.Generator("cpu").manual_seed(j.seed) for j in batch],
            output_type="np",
            callback_on_step_end=callback,
            **prepared.call,
        )
        if loaded.family == "generic":  # FAMILY HOOK (generic): only what its __call__ takes
            from sdcli.families import generic

            kwargs = generic.call_kwargs(run_pipe, kwargs)
        if s.true_cfg and kwargs.get("negative_prompt") is None:
            # diffusers' Flux runs true CFG only with a negative prompt; without one, against the empty prompt.
            kwargs["negative_prompt"] = [""] * len(batch)
        recorder = StepRecorder(run_pipe.scheduler)
        with recorder if s.save_trajectory else contextlib.nullcontext():
            arrays = task.denoise(prepared, kwargs)
        if np.isnan(arrays).any():
            hint = " (float16 overflow: try --dtype bfloat16 or float32)" if loaded.dtype == torch.float16 else ""
            raise SdcliError(f"the model produced NaN values instead of an image{hint}")
        images = task.finish(prepared, run_pipe.numpy_to_pil(arrays))
        frames_per_image: list[list[Any]] = [[] for _ in batch]
        if s.save_trajectory:
            for x0 in recorder.x0:
                for k, frame in enumerate(decode_latents(run_pipe, x0, (prepared.width, prepared.height))):
                    frames_per_image[k].append(frame)
        # An image whose pass read no negative prompt (guidance 1 in a sweep) does not record one.
        unread = {} if negative_applies(s, kind, first["guidance"]) else {"negative_prompt": ""}
        for job, image, frames in zip(batch, images, frames_per_image):
            yield Generated(image=image, record={**base, **job.values, **unread}, job=job, trajectory=frames)


def generate(p: Plan, *, quiet: bool = False, loaded: Any = None, extra_record: dict[str, Any] | None = None,
             ) -> Iterator[Generated]:
    """This process's images of plan ``p``, each as soon as it exists; notes go to stderr.

    ``loaded`` is a pipeline already in memory (finetune's validation images); without it the
    plan's model is loaded here.
    """
    from sdcli.progress import progress_bar

    s, say = p.settings, quiet or not p.is_main
    # 1. Load the model (the slow part) and warn about prompts it cannot fully read.
    if loaded is None:
        t0 = time.perf_counter()
        loaded = prepare_pipeline(s)
        note(say, f"loaded {loaded.model} ({loaded.family}, {loaded.prediction_type}) on "
                  f"{loaded.device} in {time.perf_counter() - t0:.1f}s")
        warn_prompts(loaded, [*s.prompts, s.negative_prompt], say, s.prompt_syntax)
    if not s.seeds:
        note(say, f"seed: {p.seeds[0]}" + (f"..{p.seeds[-1]}" if len(p.seeds) > 1 else "") + " (random)")

    # 2. This process's share of the jobs.
    if p.state is not None:
        with p.state.split_between_processes(p.jobs) as share:
            mine = list(share)
    else:
        mine = p.jobs

    # 3. Denoise, handing on each image as soon as it exists.
    t0 = time.perf_counter()
    done_at = []
    with progress_bar("denoising", total=len(mine) * p.task.denoising_steps(s), disable=say) as advance:
        for item in iter_images(s, loaded, mine, on_step=advance, extra_record=extra_record):
            yield item
            done_at.append(time.perf_counter())

    # 4. How long it took; the first compiled image apart, so the steady speed is visible.
    if p.state is None and s.compile and done_at:
        text = f"first image {done_at[0] - t0:.1f}s (includes torch.compile)"
        if len(done_at) > 1:
            text += f", then {(done_at[-1] - done_at[0]) / (len(done_at) - 1):.2f}s each"
        note(quiet, text)
    elif p.state is None and len(done_at) > 1:
        seconds = done_at[-1] - t0
        note(quiet, f"{len(done_at)} images in {seconds:.1f}s ({seconds / len(done_at):.2f}s each)")


def run_generate(settings: Settings, *, out: Path | None, overwrite: bool = False, quiet: bool = False,
                 json: bool = False) -> list[Path]:
    """Plan, check the output, generate and write; returns this process's image paths.

    Under `accelerate launch`/`torchrun` each process takes its share of the
    jobs (accelerate's split), writes its own numbered files, and the main
    process prints one summary and the contact sheets.
    """
    from sdcli import distributed
    from sdcli.generation.outputs import ImageWriter

    p = plan(settings)
    writer = ImageWriter(out, p, overwrite=overwrite, json=json)
    for item in generate(p, quiet=quiet):
        writer.write(item)
    written = writer.finish(quiet)
    distributed.close(p.state)
    return written
