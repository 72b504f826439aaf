"""The server's engine loop: one thread owns the Engine; HTTP handlers (asyncio) talk to it
through an inbox and per-request event queues. Admission (a bounded queue) and Prometheus metrics.

```
 asyncio handlers                              engine thread (owns Engine + Pipeline)
   submit(job) ── full? 503 ──►                  loop:
   inbox: ("add", job) ("abort", job) ──────────►  take every command (block only when idle)
                                                   add -> engine.add / abort -> engine.abort
                                                   engine.step() -> events per request
   job.queue ◄── call_soon_threadsafe ◄──────────  (index, "text", (piece, logprobs)) (index, "done", answer)
                                                   (index, "error", e); the n jobs of a request (its
                                                   `n` choices) share one queue, index = the choice
 a client that leaves: ("abort", job) -> its slot is free before the next step
```

A beam search request (the engine runs none) runs whole on the lock-step loop between two steps.
"""

from __future__ import annotations

import asyncio
import queue
import random
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, replace

import torch

from vlmrt.engine import Request
from vlmrt.errors import VlmrtError

_STOP = object()


class HttpError(Exception):
    """An answer other than 200: HTTP status, message, OpenAI error type and code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": None, "code": self.code}}


def http_error(e: Exception) -> HttpError:
    """A failure while running a request: bad input (VlmrtError) is a 400, anything else a 500."""
    if isinstance(e, HttpError):
        return e
    if isinstance(e, VlmrtError):
        return HttpError(400, str(e))
    traceback.print_exception(e, file=sys.stderr)
    return HttpError(500, f"internal error ({type(e).__name__}: {e}); the server is still up and its log has the "
                          "traceback", "server_error")


@dataclass
class Job:
    """One request (one choice of it) on its way through the loop. `queue` lives on the HTTP side's
    event loop; the jobs of one request's choices share it, each events tagged with its `index`."""

    prompt: object  # a question or a processor.Conversation
    image: object  # RGB PIL image or None
    config: object  # GenerationConfig
    stream: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    rid: int | None = None
    prompt_tokens: int = 0
    tokens: int = 0
    first: float | None = None
    last: float | None = None
    text: str = ""
    notes: list = field(default_factory=list)
    done: bool = False
    index: int = 0  # the choice of its request
    logprobs: list | None = None  # engine.TokenLogprob per token, when the config asks

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, kind, value))


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers per process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.running = Gauge("vlmrt_requests_running", "requests holding a KV slot", registry=r)
        self.waiting = Gauge("vlmrt_requests_waiting", "requests queued for a slot", registry=r)
        self.slots_used = Gauge("vlmrt_kv_slots_used", "KV cache slots in use", registry=r)
        self.slots_total = Gauge("vlmrt_kv_slots_total", "KV cache slots in the pool", registry=r)
        self.prompt_tokens = Counter("vlmrt_prompt_tokens", "prompt tokens prefilled (image tokens included)", registry=r)
        self.generated = Counter("vlmrt_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter("vlmrt_requests_finished", "requests finished, by reason", ["reason"], registry=r)
        self.rejected = Counter("vlmrt_requests_rejected", "requests refused with 503 (queue full)", registry=r)
        self.ttft = Histogram("vlmrt_time_to_first_token_seconds", "submit to first token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.itl = Histogram("vlmrt_inter_token_latency_seconds", "time between two tokens of a request", registry=r,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.cache_hits = Gauge("vlmrt_image_cache_hits", "vision outputs reused from the image cache", registry=r)
        self.cache_misses = Gauge("vlmrt_image_cache_misses", "images run through the vision stage", registry=r)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class EngineLoop(threading.Thread):
    """Owns the engine: adds, aborts and steps, and hands each request its events.

    Args:
        pipeline: the Pipeline (its lock-step loop runs beam search requests).
        engine: the Engine the requests run on.
        max_queue: most requests waiting for a slot; one more is refused with 503.
        cache: the engine runtime's CachedVision (for the metrics), or None.
    """

    def __init__(self, pipeline, engine, max_queue: int, cache=None):
        super().__init__(name="vlmrt-engine-loop", daemon=True)
        self.pipeline, self.engine, self.max_queue, self.cache = pipeline, engine, max_queue, cache
        self.inbox: queue.Queue = queue.Queue()
        self.jobs: dict[int, Job] = {}  # engine request id -> job
        self.metrics = Metrics()
        self.metrics.slots_total.set(engine.num_slots)
        self.lock = threading.Lock()
        self.in_flight = 0  # submitted, not finished
        self.stopping = False
        self.steps = self.served = 0

    # ---- HTTP side (event loop thread) ----
    def submit(self, *jobs: Job) -> None:
        """Queue `jobs` (a request's choices: all or none), or refuse them: 503 when the queue is
        full or the server is stopping."""
        with self.lock:
            if self.stopping:
                raise HttpError(503, "the server is shutting down; retry once it is back", "server_error")
            if len(jobs) > self.engine.num_slots + self.max_queue:
                raise HttpError(400, f"`n` = {len(jobs)} is more than this server ever holds at once ({self.engine.num_slots} "
                                     f"running + {self.max_queue} queued); ask for fewer choices")
            if self.in_flight + len(jobs) > self.engine.num_slots + self.max_queue:
                self.metrics.rejected.inc()
                raise HttpError(503, f"the server is at capacity ({self.engine.num_slots} running, {self.max_queue} "
                                     "queued); retry after a moment", "server_error", headers={"Retry-After": "1"})
            self.in_flight += len(jobs)
        for job in jobs:
            self.inbox.put(("add", job))

    def abort(self, job: Job) -> None:
        """The client left (or timed out): stop its request before the next step."""
        if not job.done:
            self.inbox.put(("abort", job))

    def stop(self, timeout: float = 10.0) -> None:
        with self.lock:
            self.stopping = True
        self.inbox.put(_STOP)
        if self.is_alive():
            self.join(timeout)

    @property
    def waiting(self) -> int:
        return max(self.in_flight - len(self.engine.running), 0)

    # ---- engine thread ----
    def run(self) -> None:
        with torch.inference_mode():  # the engine's tensors (KV pool, masks) are inference tensors
            self._run()

    def _run(self) -> None:
        while True:
            if not self._commands(block=not self.engine.has_work()):
                break
            if self.engine.has_work():
                self._step()
            self._gauges()
        for job in list(self.jobs.values()):
            self.engine.abort(job.rid)
            self._fail(job, HttpError(503, "the server shut down before this request finished; send it again",
                                      "server_error"))

    def _commands(self, block: bool) -> bool:
        """Apply every queued command; False once stop() was called."""
        try:
            cmd = self.inbox.get() if block else self.inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd is _STOP:
                return False
            kind, job = cmd
            try:
                self._add(job) if kind == "add" else self._abort(job)
            except Exception as e:  # a bug: this request fails, the loop goes on
                if kind == "add" and not job.done:
                    self._fail(job, http_error(e))
            try:
                cmd = self.inbox.get_nowait()
            except queue.Empty:
                return True

    def _add(self, job: Job) -> None:
        cfg = job.config
        if cfg.do_sample and cfg.seed is None:
            cfg = job.config = replace(cfg, seed=random.randrange(2**31))  # unseeded sampling varies, as OpenAI's does
        if cfg.num_beams > 1:
            return self._beam(job)
        try:
            job.rid = self.engine.add(Request(job.prompt, job.image, cfg))
        except Exception as e:  # a prompt too long, an unreadable image: this request only
            return self._fail(job, http_error(e))
        job.prompt_tokens, job.notes = self.engine.prompt_tokens(job.rid), self.engine.notes(job.rid)
        self.jobs[job.rid] = job

    def _abort(self, job: Job) -> None:
        if job.rid is not None and self.jobs.get(job.rid) is job:
            self.engine.abort(job.rid)  # its slot is free now; the "abort" event comes with the next step

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # the server outlives a failed step: its requests get the error
            error = http_error(e)
            for job in list(self.jobs.values()):
                self.engine.abort(job.rid)
                self._fail(job, error)
            self.engine.step()  # collect the abort events
            return
        self.steps += 1
        for ev in events:
            job = self.jobs.get(ev.request_id)
            if job is not None:
                self._event(job, ev)

    def _event(self, job: Job, ev) -> None:
        m = self.metrics
        if ev.token_ids:
            if job.first is None:
                job.first = ev.time
                m.ttft.observe(ev.time - job.submitted)
                m.prompt_tokens.inc(job.prompt_tokens)
            else:
                m.itl.observe(ev.time - job.last)
            job.last = ev.time
            job.tokens += len(ev.token_ids)
            m.generated.inc(len(ev.token_ids))
        job.text += ev.text
        if ev.logprobs is not None:
            job.logprobs = (job.logprobs or []) + ev.logprobs
        if job.stream and (ev.text or ev.logprobs):
            job.emit("text", (ev.text, ev.logprobs))
        if ev.finished is None:
            return
        del self.jobs[job.rid]
        m.finished.labels(ev.finished).inc()
        if ev.finished == "abort":
            job.emit("error", HttpError(499, "the request was cancelled", "cancelled"))
        elif ev.finished == "error":  # a stage failed for this request (the engine logged nothing)
            job.emit("error", HttpError(500, "internal error while running this request; the server is still up",
                                        "server_error"))
        else:
            job.emit("done", self._answer(job, ev.finished, job.notes))
        self._release(job)

    def _answer(self, job: Job, reason: str, notes: list[str]) -> dict:
        t0, first, last = job.submitted, job.first or job.submitted, job.last or job.submitted
        timings = {"queue_and_ttft_ms": (first - t0) * 1e3, "decode_ms": (last - first) * 1e3,
                   "ms_per_token": (last - first) * 1e3 / max(job.tokens - 1, 1)}
        usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.tokens,
                 "total_tokens": job.prompt_tokens + job.tokens}
        return {"finish_reason": reason, "usage": usage, "text": job.text, "logprobs": job.logprobs,
                "vlmrt": {"timings": timings, "notes": notes}}

    def _beam(self, job: Job) -> None:
        """Beam search: the whole request on the Pipeline's lock-step loop, here, between two steps."""
        try:
            result = self.pipeline([job.image], [job.prompt], job.config)
        except Exception as e:
            return self._fail(job, http_error(e))
        job.prompt_tokens, job.tokens = result.row_prompt_tokens[0], len(result.token_ids[0])
        job.first = job.last = time.perf_counter()
        job.text = result.texts[0]
        if job.stream and job.text:
            job.emit("text", (job.text, None))
        job.emit("done", self._answer(job, result.finish_reasons[0], result.notes))
        self._release(job)

    def _fail(self, job: Job, error: HttpError) -> None:
        self.jobs.pop(job.rid, None)
        job.emit("error", error)
        self._release(job)

    def _release(self, job: Job) -> None:
        job.done = True
        with self.lock:
            self.in_flight -= 1
        self.served += 1

    def _gauges(self) -> None:
        m, e = self.metrics, self.engine
        m.running.set(len(e.running))
        m.slots_used.set(len(e.running))
        m.waiting.set(self.waiting)
        if self.cache is not None:
            m.cache_hits.set(self.cache.hits)
            m.cache_misses.set(self.cache.misses)
