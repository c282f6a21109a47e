"""Planning `generate`: what a request will make (prompts × sweep values × seeds), settled before any weights load.

`plan` checks every setting a request gives against the model's family and the task, and lays out its
jobs; `sdcli.generation.engine.Engine` runs them on a loaded pipeline (`sdcli.generation.denoise`).
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcli import defaults
from sdcli.generation.settings import Settings, check_positions, check_settings, check_size, sweep_axes
from sdcli.generation.guidance import settle_guidance
from sdcli.generation.tasks import Task, task_for


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

    def share(self) -> list[Job]:
        """This process's jobs: accelerate's split when several processes share the plan, else all of them."""
        if self.state is None:
            return self.jobs
        with self.state.split_between_processes(self.jobs) as share:
            return list(share)

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

    ``facts`` (`sdcli.families.facts_of(pipe)`) says what kind of model a loaded engine holds; without it
    they are read from the model's configs. ``model_on_disk=False`` is for a pipeline already in memory
    whose weights are still to be written (finetune's validation images): its model is recorded as
    named, not looked up.
    """
    from sdcli import distributed as dist
    from sdcli.families import model_facts
    from sdcli.pipeline import absolute_if_local, resolve_model
    from sdcli.generation.applies import check_eta, check_family, check_rescale, check_task
    from sdcli.generation.settings import check_lora_tensors
    from sdcli.generation.prompts import check_prompt_editing

    check_settings(s)
    task = task_for(s)
    unsettled = s.steps is None
    task.check(s)  # without --steps, what counts steps is checked again below, at the model's default
    check_task(s, task)
    if model_on_disk:
        s.model = absolute_if_local(resolve_model(s.model))
        facts = facts or model_facts(s.model, s.revision)
    settle_defaults(s, facts)
    if unsettled:
        task.check(s)
    if facts is not None:
        check_size(s, facts.size_multiple)
        check_positions(s, facts)
    if model_on_disk:
        from sdcli.families import gguf_family, model_arch
        from sdcli.memory import check_generation
        from sdcli.pipeline import resolve_device
        from sdcli.quantize import check_cache, check_load

        # The at-load modes (quantization, GGUF, storage, offload) refused here, before the memory estimate that
        # counts them; --quantize recorded with its backend named, as it runs on this device.
        s.quantize = check_load(vars(s), resolve_device(s.device), facts.family, s.model, gguf_family)
        check_cache(s.step_cache, facts.family, s.model)

        # Refuses, in one line, a size that would outgrow memory once the weights load.
        check_generation(s, model_arch(s.model, s.revision, s.vae), facts.family)
    if facts is not None:
        check_prompt_editing([*s.prompts, s.negative_prompt], s.prompt_syntax, facts.class_name)
        check_family(s, facts, task.name)
        check_rescale(s, facts, task)
        check_eta(s, facts)
        settle_guidance(s, facts)
        from sdcli.generation.embeddings import check_embeddings_fit

        check_embeddings_fit(s.embeddings, s.allow_pickle, s.model if model_on_disk else None, facts.class_name,
                             s.revision)
    for path, _scale in s.loras:
        check_lora_tensors(path)
    if isinstance(s.init_image, (str, Path)):  # a PIL image given in memory has no path
        s.init_image = absolute_if_local(s.init_image)
    st = dist.state() if distributed else None
    seeds = dist.broadcast(resolve_seeds(s), st)  # a random seed is the main process's
    if st is not None and s.device == "auto":
        s.device = str(st.device)
    return Plan(settings=s, task=task, seeds=seeds, jobs=plan_jobs(s, seeds), state=st)


def settle_defaults(s: Settings, facts: Any) -> None:
    """Fill in --steps: the model card's (its family's ``defaults``), else sdcli's; and hires fix's second pass's."""
    if s.steps is None:
        s.steps = int((facts.defaults if facts is not None else {}).get("steps", defaults.STEPS))
    if s.hires_scale is not None and s.hires_steps is None:
        # The second pass runs --steps unless told otherwise; recorded as the number it runs, as A1111 writes it.
        s.hires_steps = s.steps


# 2. What the prompts lose on this model ---------------------------------------------------------------


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


def prompt_notes(pipe: Any, model: str, prompts: list[str], syntax: str = "plain") -> list[str]:
    """Warnings about ``prompts`` on this pipeline (as a request has it, embeddings loaded): unbalanced brackets,
    words the text encoder will drop, and words the bundled toy model has never seen."""
    from sdcli.generation.prompts import prompt_warnings, reads_whole, visible_text

    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return []
    out = []
    bundled = Path(model).expanduser().resolve() == defaults.BUNDLED_MODEL.resolve()
    for p in dict.fromkeys(prompts):
        out += prompt_warnings(p, syntax)
        lost = None if reads_whole(pipe, syntax) else dropped_words(tokenizer, p)
        if lost:
            out.append(f"warning: prompt longer than the text encoder's {tokenizer.model_max_length} tokens; "
                       f"ignored: {lost!r}")
        unknown = unknown_words(tokenizer, visible_text(p, syntax)) if bundled else []
        if unknown:
            out.append(f"warning: the bundled shapes model has never seen {', '.join(map(repr, unknown))}; it knows "
                       "only colours, shapes, sizes, positions and backgrounds (use --model for a real model)")
    return out
