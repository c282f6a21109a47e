"""One worker thread runs the engine, one job at a time, from a bounded queue.

The event loop never runs a model: a request becomes a `Job` (a function of the job) put on the queue,
and the handler awaits its future. So /progress and /interrupt answer at once while an image denoises,
jobs run in the order they came (per client as well), and a switch of model is a job like the others,
never overlapping a generation. A full queue refuses at once (`Busy`: a 503 with Retry-After) rather
than letting clients pile up behind a slow model.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from sdcli.errors import SdcliError


class Busy(SdcliError):
    """The queue is full: try again in ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Job:
    """One queued piece of work and what /progress reports about it while it runs."""

    work: Callable[["Job"], Any]
    label: str
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    stop: threading.Event = field(default_factory=threading.Event)  # interrupt: stop the job
    skip: threading.Event = field(default_factory=threading.Event)  # skip (and stop): end the batch under way
    total: int = 0  # denoising steps of the whole job
    done: int = 0
    started: float = 0.0
    step_started: float = 0.0
    preview: Optional[str] = None  # base64 PNG of the last decoded x̂0
    preview_at: str = ""  # which step of its image that x̂0 is from, and its noise level σ
    timestamp: str = ""


_STOP = object()


class Worker:
    """The thread that owns the models (`sdcli.serve.models.Models`) and runs every job on them."""

    def __init__(self, models: Any, max_queue: int = 16):
        self.models = models
        self.max_queue = max_queue
        self._queue: collections.deque = collections.deque()  # waiting jobs, first in first out
        self._changed = threading.Condition()
        self.current: Optional[Job] = None
        self.finished = 0  # jobs run so far (A1111's job_no)
        self.want_preview = threading.Event()  # someone watches /progress: decode x̂0 at the next step
        self.seconds_per_job = 1.0  # a running average, for Retry-After and ETAs
        self._thread = threading.Thread(target=self._loop, name="sdcli-serve-worker", daemon=True)
        self._thread.start()

    # The event loop's side ------------------------------------------------------------------------------

    def submit(self, work: Callable[[Job], Any], label: str) -> Job:
        """Queue ``work``; `Busy` at once when --max-queue jobs are already waiting."""
        job = Job(work, label, timestamp=time.strftime("%Y%m%d%H%M%S"))
        with self._changed:
            self._drop_abandoned()
            if len(self._queue) >= self.max_queue:
                waiting = len(self._queue) + (self.current is not None)
                raise Busy(f"the server is busy: {self.max_queue} requests are waiting already; try again shortly",
                           retry_after=max(1, round(waiting * self.seconds_per_job)))
            self._queue.append(job)
            self._changed.notify()
        return job

    def _drop_abandoned(self) -> None:
        """Forget the waiting jobs whose clients left: they hold no place in the queue."""
        kept = [job for job in self._queue if job is _STOP or not job.stop.is_set()]
        if len(kept) != len(self._queue):
            self._queue.clear()
            self._queue.extend(kept)

    def call(self, work: Callable[[Job], Any], label: str, timeout: float | None = None) -> Any:
        """Run ``work`` on the worker and wait for it (start-up, from a thread that is not the event loop)."""
        return self.submit(work, label).future.result(timeout)

    @property
    def waiting(self) -> int:
        with self._changed:
            self._drop_abandoned()
            return len(self._queue)

    def interrupt(self, skip: bool = False) -> None:
        """Stop the running job at its next step (skip: only its batch under way; the next batch runs)."""
        job = self.current
        if job is not None:
            job.skip.set()
            if not skip:
                job.stop.set()

    def close(self) -> None:
        job = self.current
        if job is not None:
            job.stop.set()
            job.skip.set()
        with self._changed:
            self._queue.append(_STOP)
            self._changed.notify()
        self._thread.join(timeout=30)

    # The worker's side ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._queue))
                job = self._queue.popleft()
            if job is _STOP:
                return
            if job.stop.is_set() or not job.future.set_running_or_notify_cancel():
                continue  # its client left while it waited
            self.current, job.started = job, time.monotonic()
            result, error = None, None
            try:
                result = job.work(job)
            except BaseException as exc:  # noqa: BLE001 - the handler awaiting the future words it
                error = exc
            # Idle again before the answer goes out: a client that asks /progress right after sees no job.
            self.seconds_per_job = 0.7 * self.seconds_per_job + 0.3 * (time.monotonic() - job.started)
            self.current = None
            self.finished += 1
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    def on_step(self, job: Job, step: Any, offset: int, size: tuple[int, int]) -> None:
        """A denoising step of ``job`` (its ``offset`` steps before this batch): progress, and a preview of
        x̂0 when someone asked for one since the last (decoding every step would slow the job for nobody)."""
        job.done, job.step_started = offset + step.index + 1, time.monotonic()
        if step.x0 is not None and self.want_preview.is_set():
            self.want_preview.clear()
            job.preview = preview_png(self.models.engine.pipe, step.x0[:1], size)
            sigma = noise_level(self.models.engine.pipe.scheduler, step)
            sigma = "" if sigma is None else f", σ {sigma:.3g}"
            job.preview_at = f"x̂0 at step {step.index + 1}/{step.total}{sigma}"

    # What /progress says ------------------------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        job = self.current
        if job is None or not job.total:
            return {"progress": 0.0, "eta_relative": 0.0, "job": None, "step": 0, "steps": 0, "preview": None,
                    "preview_at": None, "interrupted": False, "skipped": False, "timestamp": ""}
        fraction = min(1.0, job.done / job.total)
        elapsed = time.monotonic() - job.started
        eta = elapsed / fraction - elapsed if fraction > 0 else self.seconds_per_job
        return {"progress": fraction, "eta_relative": max(0.0, eta), "job": job.label, "step": job.done,
                "steps": job.total, "preview": job.preview, "preview_at": job.preview_at or None,
                "interrupted": job.stop.is_set(),
                "skipped": job.skip.is_set() and not job.stop.is_set(), "timestamp": job.timestamp}


def noise_level(scheduler: Any, step: Any) -> Optional[float]:
    """σ of a step: the scheduler's own, else that of its timestep from ᾱ_t, √((1 − ᾱ)/ᾱ), for schedulers
    that keep ᾱ's rather than σ's (DDIM, PNDM): the same scale, so a preview reads alike under any sampler."""
    if step.sigma is not None:
        return float(step.sigma)
    alpha_bar = getattr(scheduler, "alphas_cumprod", None)
    if alpha_bar is None or not 0 <= int(step.timestep) < len(alpha_bar):
        return None
    a = float(alpha_bar[int(step.timestep)])
    return ((1 - a) / a) ** 0.5


def preview_png(pipe: Any, x0: Any, size: tuple[int, int]) -> Optional[str]:
    """x̂0 of the first image, decoded through the VAE, as a base64 PNG."""
    import base64
    import io

    from sdcli.generation.trajectory import decode_latents

    (image,) = decode_latents(pipe, x0, size)[:1]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
