"""Dynamic batching on one model: a bounded queue and one worker thread.

The worker takes the first waiting request, gathers whatever else is waiting (up to
``max_batch_size``, within a few milliseconds, so a lone request is not held back),
builds the prompts and generates them as one padded batch, handing each request its
text as it comes. Prompts are read through the model's prefix cache: requests about an
image that an earlier request brought (same system prompt, same image) read only their
own words. A request whose client went away, or whose deadline passed, stops
taking part at the next step; every accepted request gets exactly one terminal event.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..errors import VlmkitError
from ..runtime.generation import SamplingParams, batch_stream, check_context
from ..runtime.model import ChatModel, ReplyBuilder

log = logging.getLogger("vlmkit.serve")


@dataclass
class Job:
    """One request in flight. Events go to ``events`` on the server's event loop:
    ("start", prompt) then ("delta", text)* then exactly one of ("done", reply) /
    ("error", exception) / ("cancelled", None)."""

    messages: list
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    deadline: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    created: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished: bool = False

    def emit(self, kind: str, payload=None) -> None:
        if self.finished:
            return
        if kind in ("done", "error", "cancelled"):
            self.finished = True
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))

    @property
    def active(self) -> bool:
        return not self.cancelled.is_set() and time.monotonic() < self.deadline


class DeadlineError(VlmkitError):
    """A request ran past ``--request-timeout``."""


class Scheduler:
    def __init__(self, model: ChatModel, *, max_batch_size: int = 8, max_queue: int = 64,
                 batch_window: float = 0.005, metrics=None):
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_window = batch_window
        self.metrics = metrics
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._work, name="vlmkit-generation", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the caller answers 429)."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            return False
        self._gauge()
        return True

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self.queue.qsize())

    def _work(self) -> None:
        while True:
            batch = [self.queue.get()]
            until = time.monotonic() + self.batch_window
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.queue.get(timeout=max(0.0, until - time.monotonic())))
                except queue.Empty:
                    break
            self._gauge()
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - an internal failure answers 500; the server stays up
                log.exception("generation failed")
                for job in batch:
                    job.emit("error", e)

    def _run(self, batch: list[Job]) -> None:
        jobs, prompts = [], []
        for job in batch:
            if not job.active:
                job.emit("cancelled" if job.cancelled.is_set() else "error",
                         None if job.cancelled.is_set() else DeadlineError("the request timed out while queued"))
                continue
            try:
                prompt = self.model.prompt(job.messages)
                check_context(self.model.backend, prompt, job.params)
            except VlmkitError as e:
                job.emit("error", e)
                continue
            job.emit("start", prompt)
            jobs.append(job)
            prompts.append(prompt)
        if not jobs:
            return
        if self.metrics:
            self.metrics.batch_size.observe(len(jobs))
        replies = [ReplyBuilder(self.model.backend, p, j.params) for p, j in zip(prompts, jobs)]
        active = lambda i: jobs[i].active and not replies[i].finish_reason  # noqa: E731
        for step in batch_stream(self.model.backend, prompts, [j.params for j in jobs], active=active,
                                 cache=self.model.prefix_cache):
            for job, reply, token in zip(jobs, replies, step):
                if token is None:
                    continue
                if job.first_token_at is None:
                    job.first_token_at = time.monotonic()
                delta = reply.push(token)
                if delta:
                    job.emit("delta", delta)
                if reply.finish_reason:
                    self._finish(job, reply)
        for job, reply in zip(jobs, replies):
            if not job.finished:
                if job.cancelled.is_set():
                    job.emit("cancelled")
                elif time.monotonic() >= job.deadline:
                    job.emit("error", DeadlineError("the request ran past the server's --request-timeout"))
                else:
                    self._finish(job, reply)

    def _finish(self, job: Job, reply: ReplyBuilder) -> None:
        tail = reply.flush()
        if tail:
            job.emit("delta", tail)
        job.emit("done", reply.result())
