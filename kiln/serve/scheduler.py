"""One continuous batch per LLM artifact, driven by one decode thread that owns its Generator.

Request handlers (on the event loop) `submit` a Job and read its events from an asyncio queue;
the decode thread admits jobs between steps, runs `Generator.step()` and posts each token back
with `loop.call_soon_threadsafe`. Nothing else touches the Generator.

Admission: while the batch has fewer than `max_batch` rows, the waiting job with the highest
effective priority joins, where effective priority = priority + seconds waited / aging
(`aging` seconds per level, default 5); ties go to the earliest arrival. A low-priority job
therefore overtakes any job of priority p that arrives (p - its priority) x aging seconds after it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable

from kiln.runtime.generate import Generator, SamplingParams
from kiln.serve.errors import APIError, internal, overloaded
from kiln.serve.metrics import Metrics

log = logging.getLogger("kiln.serve")


@dataclasses.dataclass(eq=False)
class Job:
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[tuple], None]  # thread-safe: ("token", id) | ("done", finish_reason) | ("error", APIError)
    priority: int = 0
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    deadline: float = float("inf")  # time.monotonic() by which the job must finish
    seq: int = 0  # arrival order
    rid: int | None = None
    cancelled: str | None = None  # why the job was withdrawn (set by any thread)
    generated: int = 0
    last_token_at: float | None = None
    last_token: int | None = None
    adapter: int = 0  # LoRA slot (0: the base model); rows of different slots share the batch
    model: str | None = None  # the served model id it asked for (metrics); None: the loop's own


def effective_priority(job: Job, now: float, aging: float) -> float:
    return job.priority + (now - job.arrived) / aging if aging > 0 else float(job.priority)


def pick(pending: list[Job], now: float, aging: float) -> Job:
    """The job to admit next: highest effective priority, then earliest arrival."""
    return max(pending, key=lambda j: (effective_priority(j, now, aging), -j.seq))


class DecodeLoop:
    def __init__(self, name: str, model, metrics: Metrics, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int | None = 64, aging: float = 5.0):
        self.name, self.model, self.metrics = name, model, metrics
        self.max_batch, self.max_queue, self.prefill_chunk, self.aging = max_batch, max_queue, prefill_chunk, aging
        self.gen = Generator(model, prefill_chunk=prefill_chunk)
        self.pending: list[Job] = []
        self.running: dict[int, Job] = {}
        self.cond = threading.Condition()
        self.stopping = False
        self.grace_until = float("inf")
        self._seq = itertools.count()
        self.thread = threading.Thread(target=self._run, name=f"kiln-decode-{name}", daemon=True)
        self._gauges()
        metrics.declare_histograms(model=name)

    # --- called from request handlers --------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                self.metrics.inc("kiln_rejections_total", model=self.name, reason="shutting_down")
                raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
            if len(self.pending) >= self.max_queue:
                self.metrics.inc("kiln_rejections_total", model=self.name, reason="queue_full")
                raise overloaded(self.name, retry_after=1)
            job.seq = next(self._seq)
            self.pending.append(job)
            self._gauges()
            self.cond.notify()

    def cancel(self, job: Job, reason: str) -> None:
        with self.cond:
            if job.cancelled is None:
                job.cancelled = reason
            self.cond.notify()

    def stop(self, grace: float) -> None:
        """Admit nothing more; running rows may finish for `grace` seconds, then are cancelled."""
        with self.cond:
            self.stopping, self.grace_until = True, time.monotonic() + grace
            self.cond.notify()
        self.thread.join(grace + 10)

    # --- the decode thread ---------------------------------------------------------------
    def _gauges(self) -> None:
        self.metrics.set("kiln_queue_depth", len(self.pending), model=self.name)
        self.metrics.set("kiln_running_rows", len(self.running), model=self.name)

    def _withdraw(self, job: Job, why: str) -> None:
        """End a job early: its client is gone (no event needed) or it ran out of time."""
        self.metrics.inc("kiln_cancelled_rows_total", model=self.name, reason=why)
        if why == "deadline":
            self.metrics.inc("kiln_rejections_total", model=self.name, reason="deadline")
            job.emit(("error", APIError(504, "the request's deadline passed before it finished", "timeout_error",
                                        None, "deadline_exceeded")))
        elif why == "shutdown":
            job.emit(("error", APIError(503, "the server shut down before the request finished", "server_error",
                                        None, "shutting_down")))
        else:
            job.emit(("done", why))

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.pending or self.running or self.stopping):
                    self.cond.wait()
                now = time.monotonic()
                if self.stopping and (now >= self.grace_until or not self.running):
                    for job in self.pending + list(self.running.values()):
                        self._withdraw(job, "shutdown")
                    self.pending.clear()
                    self.running.clear()
                    self._gauges()
                    return
                for job in list(self.pending):
                    if job.cancelled or now > job.deadline:
                        self.pending.remove(job)
                        self._withdraw(job, job.cancelled or "deadline")
                admit = []
                while self.pending and not self.stopping and len(self.running) + len(admit) < self.max_batch:
                    job = pick(self.pending, now, self.aging)
                    self.pending.remove(job)
                    admit.append(job)
            for job in list(self.running.values()):
                if job.cancelled or now > job.deadline:
                    self.gen.cancel(job.rid)
                    del self.running[job.rid]
                    self._withdraw(job, job.cancelled or "deadline")
            for job in admit:
                try:
                    job.rid = self.gen.submit(job.prompt, job.params, job.adapter)
                except Exception as exc:  # checked before queueing; a safety net
                    job.emit(("error", APIError(400, str(exc).splitlines()[0], param="prompt")))
                    continue
                self.running[job.rid] = job
                self.metrics.inc("kiln_prompt_tokens_total", len(job.prompt), model=job.model or self.name)
            with self.cond:
                self._gauges()
            if self.running:
                self._step()
                with self.cond:
                    self._gauges()

    def _step(self) -> None:
        start = time.monotonic()
        try:
            emitted = self.gen.step()
        except Exception as exc:  # the batch's forward failed: its rows fail, the server goes on
            log.exception("decode step of model %s failed", self.name)
            for job in self.running.values():
                job.emit(("error", internal(f"decoding failed: {type(exc).__name__}")))
            self.metrics.inc("kiln_rejections_total", len(self.running), model=self.name, reason="internal_error")
            self.running.clear()
            self.gen = Generator(self.model, prefill_chunk=self.prefill_chunk)
            return
        now = time.monotonic()
        self.metrics.observe("kiln_step_seconds", now - start, model=self.name)
        for rid, exc in self.gen.failed:  # one row's prefill or sampling raised: that request fails
            job = self.running.pop(rid, None)
            log.error("decoding request %s of model %s failed: %r", rid, self.name, exc)
            self.metrics.inc("kiln_rejections_total", model=self.name, reason="internal_error")
            if job is not None:
                job.emit(("error", internal(f"decoding failed: {type(exc).__name__}")))
        self.gen.failed.clear()
        counts: dict[str, int] = {}
        for rid, token in emitted:
            job = self.running.get(rid)
            model = (job.model if job is not None else None) or self.name
            counts[model] = counts.get(model, 0) + 1
            if job is None:
                continue
            if job.last_token_at is None:
                self.metrics.observe("kiln_time_to_first_token_seconds", now - job.arrived, model=self.name)
            else:
                self.metrics.observe("kiln_inter_token_seconds", now - job.last_token_at, model=self.name)
            job.last_token_at, job.last_token, job.generated = now, token, job.generated + 1
            job.emit(("token", token))
        for model, n in counts.items():  # by the model id asked for: an adapter's tokens under MODEL:NAME
            self.metrics.inc("kiln_generated_tokens_total", n, model=model)
        active = self.gen.active
        for rid in [r for r in self.running if r not in active]:
            job = self.running.pop(rid)
            stops = job.params.stop_token_ids if job.params.stop_token_ids is not None else self.model.eos
            job.emit(("done", "stop" if job.last_token in stops else "length"))
