"""The engine: one pipeline loaded once, serving many requests.

What is decided at load (the model, device, dtype, VAE, offload, compile, threads: the settings declared
``at_load``) lives as long as the `Engine`; what a request brings (prompts, seeds, size, steps, sampler,
guidance, LoRAs and their scales, embeddings, input images) lives as long as the request, and the
pipeline is left as the request found it: the scheduler is the loaded one again, the request's LoRA
adapters are removed, its embeddings' tokens are gone from the tokenizer and text encoder. So request B's
image never depends on request A, and equals what a fresh `sdcli generate` makes.

Every denoising step reaches the caller through one callback shape, `Step` (k-diffusion's
``callback({'i', 'sigma', 'x', 'denoised'})``): the progress bar, trajectories and a server's progress
all read it. A request stops cleanly between two steps when its ``cancel`` is set.

    engine = Engine.load(Settings(model="bundled:shapes"))
    for made in engine.generate(Settings(prompts=["a red circle"], seeds=[1])):
        made.image.save("circle.png")          # made.record is what its PNG metadata holds

Nothing here prints: notes go to the ``say`` a front-end passes, errors are `SdcliError`s naming the setting.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from sdcli.errors import ModelError, SdcliError, UsageError
from sdcli.generation.denoise import Cancelled, Step


def _listener(on_step: Callable[[Step], None] | None) -> Callable[[Step], None]:
    return on_step or (lambda step: None)


# 1. What a request does to the pipeline, and how it is undone ---------------------------------------------


def _tapped(scheduler: Any) -> Any:
    """A copy of ``scheduler`` that keeps the model's x̂0 of its last step (``sdcli_x0``) for the step callback.

    Most schedulers return it as ``pred_original_sample``; for the rest (DPM-Solver, UniPC, PNDM, flow
    matching's Euler) it follows in closed form (`sdcli.generation.trajectory.closed_form_x0`). The copy is
    the request's own: the loaded scheduler is never changed.
    """
    from sdcli.generation.trajectory import closed_form_x0

    cls = type(scheduler)

    # wraps: a pipeline passes `generator` (and `eta`) to step only if step's signature names them, so the tap
    # keeps the original's signature; without it an ancestral sampler drew its noise off the seed.
    @functools.wraps(cls.step)
    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        out = cls.step(self, model_output, timestep, sample, *args, return_dict=True, **kwargs)
        x0 = getattr(out, "pred_original_sample", None)
        self.sdcli_x0 = x0 if x0 is not None else closed_form_x0(self, model_output, timestep, sample)
        return out if return_dict else (out.prev_sample,)

    tapped = copy.copy(scheduler)
    tapped.__class__ = type(cls.__name__, (cls,), {"step": step, "sdcli_x0": None})
    return tapped


def load_loras(pipe: Any, loras: list[tuple[str, float]], allow_pickle: bool = False) -> list[str]:
    """Load each LoRA as its own adapter (safetensors only, unless ``allow_pickle``) and set their scales;
    returns the adapter names. Adapters the pipeline had already stay, and stay active."""
    from sdcli.adapters import load_lycoris
    from sdcli.families import pipe_family
    from sdcli.generation.settings import lora_files

    had = _adapters(pipe)
    active = list(pipe.get_active_adapters()) if had else []
    names = []
    for i, (path, _scale) in enumerate(loras):
        name = f"sdcli-request-lora{i}"
        # A file by its folder and name, so diffusers reads it in the format its suffix says.
        where, weight_name = (str(Path(path).parent), Path(path).name) if Path(path).is_file() else (path, None)
        if weight_name is None and not lora_files(path):
            raise ModelError(f"--lora {path}: the folder holds no LoRA weights")
        try:
            # LoHa, LoKr and kohya's DoRA, which diffusers' pipeline loaders refuse or drop, go in through peft.
            if not load_lycoris(pipe, pipe_family(pipe), path, name):
                pipe.load_lora_weights(where, weight_name=weight_name, adapter_name=name,
                                       use_safetensors=None if allow_pickle else True)
        except Exception as exc:  # noqa: BLE001 - any failure here means the LoRA does not fit
            msg = " ".join(str(exc).split())[:300]
            raise ModelError(f"LoRA {path} does not fit this model: {msg}") from exc
        names.append(name)
        # diffusers skips a LoRA none of whose layers match (another family's) with only a warning.
        if not any(name in adapters for adapters in pipe.get_list_adapters().values()):
            raise ModelError(f"LoRA {path} does not fit this model: none of its layers match "
                             f"{type(pipe).__name__}'s (a LoRA for another model family?)")
    pipe.set_adapters([*active, *names], adapter_weights=[1.0] * len(active) + [scale for _path, scale in loras])
    return names


def _adapters(pipe: Any) -> bool:
    """Whether the pipeline carries LoRA adapters (a fine-tuning run's own, or a request's)."""
    try:
        return any(pipe.get_list_adapters().values())
    except Exception:  # noqa: BLE001 - a pipeline without peft support has none
        return False


def remove_loras(pipe: Any, names: list[str], had: bool, active: list[str]) -> None:
    """Undo `load_loras`: the request's adapters deleted; with none there before, the LoRA layers removed
    altogether (so the model is the loaded one again, module for module); else the old ones active again."""
    if not names:
        return
    if not had:
        pipe.unload_lora_weights()
        return
    pipe.delete_adapters(names)
    if active:
        pipe.set_adapters(active)


_TEXT = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


@contextlib.contextmanager
def _own_text_encoders(pipe: Any) -> Iterator[None]:
    """The request's embeddings go into copies of the tokenizers and new rows of the token tables; after it, the
    loaded tokenizers and tables are put back (resizing makes a new tensor: the old one is intact)."""
    saved = []
    for tok_name, enc_name in _TEXT:
        tokenizer, encoder = getattr(pipe, tok_name, None), getattr(pipe, enc_name, None)
        if tokenizer is None or encoder is None:
            continue
        table = encoder.get_input_embeddings()
        saved.append((tok_name, tokenizer, encoder, table, table.weight.data, encoder.config.vocab_size))
        setattr(pipe, tok_name, copy.deepcopy(tokenizer))
    try:
        yield
    finally:
        # transformers resizes a table in place (a new tensor in the same module): both are put back.
        for tok_name, tokenizer, encoder, table, rows, vocab in saved:
            setattr(pipe, tok_name, tokenizer)
            encoder.set_input_embeddings(table)
            table.weight.data, table.num_embeddings = rows, rows.shape[0]
            encoder.config.vocab_size = vocab


# 2. The engine ------------------------------------------------------------------------------------------------


class Engine:
    """A loaded pipeline and what was decided at load; `run`/`generate` serve requests against it, one at a time.

    ``baked`` lists LoRAs the pipeline already carries as (path, scale): a fine-tuning run's own adapter, which
    its validation images record but must not load a second time.
    """

    def __init__(self, loaded: Any, load: dict[str, Any], *, fused: bool = False,
                 baked: list[tuple[str, float]] | None = None, on_disk: bool = True):
        from sdcli.families import facts_of

        self.loaded = loaded
        self.load_values = load  # the at-load settings, as the engine was loaded with them
        self.fused = fused  # attention projections fused (--compile without LoRAs): a LoRA has nowhere to go
        self.baked = list(baked or [])
        self.on_disk = on_disk  # False: fine-tuning's pipeline, whose weights are not written yet
        self.facts = facts_of(loaded.pipe)
        self._lock = threading.Lock()  # a pipeline runs one request at a time

    # Loading --------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, settings: Any = None, *, fuse_qkv: bool | None = None, **values: Any) -> "Engine":
        """Load the model with the at-load settings of ``settings`` (or of ``values``, as `Settings` fields).

        ``fuse_qkv``: with --compile, fuse the attention's q, k and v projections into one matmul (faster, but a
        LoRA has no separate projections to attach to); default: only when ``settings`` asks for no LoRA.
        """
        from sdcli import threads
        from sdcli.generation.guidance import use_formula_guidance
        from sdcli.generation.settings import Settings, at_load
        from sdcli.pipeline import apply_runtime_options, load_pipeline, replace_vae
        from sdcli.quantize import canonical

        s = settings if settings is not None else Settings(**values)
        fuse = (not s.loras) if fuse_qkv is None else fuse_qkv
        loaded = load_pipeline(s.model, revision=s.revision, variant=s.variant, allow_pickle=s.allow_pickle,
                               device=s.device, dtype=s.dtype, cpu_offload=s.cpu_offload, quantize=s.quantize,
                               quantize_text_encoder=s.quantize_text_encoder, denoiser_file=s.denoiser_file,
                               storage_dtype=s.storage_dtype, offload=s.offload)
        pipe = loaded.pipe
        threads.apply(s.threads, loaded.device)
        if s.vae:
            replace_vae(loaded, s.vae, cpu_offload=s.cpu_offload)
        apply_runtime_options(
            pipe, device=loaded.device, vae_tiling=s.vae_tiling, attention_slicing=s.attention_slicing,
            compile=s.compile, compile_mode=s.compile_mode, channels_last=s.channels_last, has_lora=not fuse,
            cpu_offload=s.cpu_offload,
        )
        use_formula_guidance(pipe)
        values = {name: getattr(s, name) for name in at_load()}
        values.update(model=loaded.model, device=loaded.device, quantize=canonical(s.quantize, loaded.device))
        return cls(loaded, values, fused=bool(s.compile and fuse and hasattr(pipe, "fuse_qkv_projections")))

    @classmethod
    def around(cls, pipe: Any, settings: Any, *, family: str, baked: list[tuple[str, float]] | None = None
               ) -> "Engine":
        """An engine over a pipeline already in memory (fine-tuning's, whose weights are still being written),
        as if loaded with the at-load values of ``settings`` (the model it names, the device it runs on)."""
        import torch

        from sdcli.generation.guidance import use_formula_guidance
        from sdcli.generation.settings import at_load
        from sdcli.pipeline import Loaded

        use_formula_guidance(pipe)
        loaded = Loaded(pipe=pipe, model=settings.model, family=family, device=str(settings.device),
                        dtype=torch.float32)
        values = {name: getattr(settings, name) for name in at_load()}
        return cls(loaded, values, baked=baked, on_disk=False)

    # What a caller may read ------------------------------------------------------------------------------

    @property
    def pipe(self) -> Any:
        return self.loaded.pipe

    @property
    def model(self) -> str:
        return self.loaded.model

    @property
    def device(self) -> str:
        return self.loaded.device

    @property
    def dtype(self) -> Any:
        return self.loaded.dtype

    @property
    def family(self) -> str:
        return self.loaded.family

    def describe(self) -> str:
        lo = self.loaded
        return f"{lo.model} ({lo.family}, {lo.prediction_type}) on {lo.device}"

    # Requests --------------------------------------------------------------------------------------------

    def plan(self, s: Any) -> Any:
        """Check a request against this engine and plan it (`sdcli.generation.run.plan`): the at-load settings
        it leaves unset are the engine's, and one it sets otherwise is refused in one line."""
        from sdcli.generation.run import plan
        from sdcli.declare import declared
        from sdcli.generation.settings import Settings, at_load

        fresh = Settings()
        for name in at_load():
            mine, asked = self.load_values.get(name, getattr(fresh, name)), getattr(s, name)
            if asked == getattr(fresh, name) or asked == mine or name in ("device",):
                setattr(s, name, mine)
                continue
            if name == "model" and _same_model(asked, mine):
                setattr(s, name, mine)
                continue
            if name == "quantize" and _same_quantization(asked, mine, self.device):
                setattr(s, name, mine)
                continue
            flag = next(d.flag for d in declared(Settings) if d.name == name)
            raise UsageError(f"{flag} {asked}: this engine was loaded with {mine!r}; load another engine for it",
                             setting=name)
        if s.loras and self.fused:
            raise UsageError("--lora: this engine was loaded with --compile and fused attention projections, "
                             "which LoRAs cannot attach to; load it with fuse_qkv=False to serve LoRAs", setting="loras")
        return plan(s, distributed=False, model_on_disk=self.on_disk, facts=self.facts)

    @contextlib.contextmanager
    def request(self, s: Any, *, x0: bool = False) -> Iterator[Any]:
        """The pipeline as request ``s`` needs it (sampler, LoRAs, embeddings), put back as it was afterwards."""
        from sdcli.generation.prompts import prepare_text_encoders
        from sdcli.schedule.samplers import takes_eta

        pipe = self.pipe
        loaded_scheduler = pipe.scheduler
        names: list[str] = []
        cached = None
        had = _adapters(pipe)
        active = list(pipe.get_active_adapters()) if had else []
        with self._lock, (_own_text_encoders(pipe) if s.embeddings else contextlib.nullcontext()):
            try:
                # 1. The sampler: a copy of the loaded one, or the one asked for, built from the loaded config.
                scheduler = self.sampler(s)
                pipe.scheduler = _tapped(scheduler) if x0 else scheduler
                if s.eta and not takes_eta(type(scheduler).__name__):  # a single file's sampler, known only now
                    raise UsageError(f"--eta: this model's {type(scheduler).__name__} has no η (it belongs to DDIM: "
                                     "add --scheduler ddim)", setting="eta")
                trained = scheduler.config.get("num_train_timesteps", 1000)
                if s.steps is not None and s.steps > trained:  # None: a request not yet planned
                    raise UsageError(f"--steps {s.steps}: this model was trained on {trained} timesteps, so a "
                                     f"sampler can take at most {trained} steps", setting="steps")
                # 2. LoRAs the pipeline does not already carry, each its own adapter at its scale.
                wanted = [lo for lo in s.loras if lo not in self.baked]
                if wanted:
                    names = load_loras(pipe, wanted, allow_pickle=s.allow_pickle)
                # 3. Embeddings into the request's own tokenizers; clip skip checked against the encoders.
                prepare_text_encoders(pipe, s)
                # 4. The step cache: hooks on the denoiser for this request only.
                cached = _enable_cache(pipe, s, self.facts.family)
                yield pipe
            finally:
                if cached is not None:
                    cached.disable_cache()
                remove_loras(pipe, names, had, active)
                pipe.scheduler = loaded_scheduler

    def sampler(self, s: Any) -> Any:
        """Request ``s``'s own scheduler: a copy of the loaded one, or the one it asks for, from the loaded config."""
        from sdcli.schedule.samplers import make_scheduler

        loaded = self.pipe.scheduler
        if s.scheduler is not None or s.timestep_spacing is not None or s.sigmas != "default":
            return make_scheduler(s.scheduler, loaded.config, s.timestep_spacing, s.sigmas)
        return copy.deepcopy(loaded)

    def denoising_steps(self, s: Any) -> int:
        """The denoiser steps one batch of planned request ``s`` runs on its sampler (what `Step.total` says): more
        than --steps on PNDM (its warm-up) and second-order samplers (Heun, DPM2), fewer in an img2img pass."""
        from sdcli.generation.tasks import task_for

        return task_for(s).denoising_steps(s, self.sampler(s))

    def images(self, s: Any, jobs: list[Any], *, on_step: Callable[[Step], None] | None = None,
               cancel: threading.Event | None = None, extra_record: dict[str, Any] | None = None,
               x0: bool = False, say: Callable[[str], None] | None = None,
               on_ready: Callable[[], None] | None = None) -> Iterator[Any]:
        """Run ``jobs`` of request ``s`` in batches and yield each image (`Generated`) as soon as it exists.

        ``x0``: give every `Step` the model's x̂0 (trajectories ask for it themselves). A set ``cancel``
        stops the request after the step under way; the images finished before it have been yielded.
        ``say`` gets the warnings about the prompts on this model (words it will drop or never saw), after
        ``on_ready`` is called: the request's sampler, LoRAs and embeddings are in place.
        """
        from sdcli.generation.denoise import denoise_jobs
        from sdcli.generation.run import prompt_notes

        with self.request(s, x0=x0 or s.save_trajectory) as pipe:
            if on_ready is not None:
                on_ready()
            for warning in prompt_notes(pipe, self.loaded.model, [*s.prompts, s.negative_prompt], s.prompt_syntax):
                (say or (lambda text: None))(warning)
            try:
                yield from denoise_jobs(self, s, jobs, _listener(on_step), cancel, extra_record)
            except Cancelled:
                return

    def run(self, p: Any, *, on_step: Callable[[Step], None] | None = None, cancel: threading.Event | None = None,
            extra_record: dict[str, Any] | None = None, say: Callable[[str], None] | None = None,
            on_ready: Callable[[], None] | None = None) -> Iterator[Any]:
        """This process's share of plan ``p``'s images (all of them in one process)."""
        yield from self.images(p.settings, p.share(), on_step=on_step, cancel=cancel, extra_record=extra_record,
                               say=say, on_ready=on_ready)

    def generate(self, request: Any = None, *, on_step: Callable[[Step], None] | None = None,
                 cancel: threading.Event | None = None, **values: Any) -> list[Any]:
        """The Python API: one request's images (`Generated`: ``.image``, a PIL image, and ``.record``).

        ``request`` is a `Settings`, or a prompt (or list of prompts) with any other settings as keywords:
        ``engine.generate("a red circle", seeds=[1, 2], steps=20, loras=[("style.safetensors", 0.8)])``.
        """
        from sdcli.declare import Role, declared
        from sdcli.generation.settings import Settings

        # A sweep axis takes one value as well as a list (guidance=7.5, seeds=3).
        for d in declared(Settings):
            if d.opt.role is Role.SWEEP and d.name in values and not isinstance(values[d.name], (list, tuple)):
                values[d.name] = [values[d.name]]
        if request is None or isinstance(request, (str, list)):
            prompts = [request] if isinstance(request, str) else list(request or values.pop("prompts", []))
            request = Settings(prompts=prompts, **values)
        elif values:
            request = dataclasses.replace(request, **values)
        p = self.plan(request)
        return list(self.run(p, on_step=on_step, cancel=cancel))


def _enable_cache(pipe: Any, s: Any, family: Any) -> Any:
    """Turn on the request's --cache on the denoiser (`sdcli.quantize.cache_config`); the denoiser, to turn it off
    after, or None. A cache's state is per image: diffusers' pipelines reset it after each call."""
    if not s.step_cache:
        return None
    from sdcli.generation.tasks import task_for
    from sdcli.quantize import cache_config

    model = getattr(pipe, family.denoiser)
    model.enable_cache(cache_config(s.step_cache, family, max(s.steps, *task_for(s).passes(s))))
    return model


def _same_quantization(asked: str | None, mine: str | None, device: str) -> bool:
    from sdcli.quantize import canonical

    try:
        return canonical(asked, device) == mine
    except SdcliError:
        return False


def _same_model(asked: str, mine: str) -> bool:
    from sdcli.pipeline import absolute_if_local, resolve_model

    try:
        return absolute_if_local(resolve_model(asked)) == absolute_if_local(resolve_model(mine))
    except SdcliError:
        return False
