"""Continuous batching on one model: a bounded queue and one worker thread.

The worker decodes the running requests together, one token each per step
(``runtime.generation.new_batch``). Between steps it admits what is waiting, up to
``max_batch_size`` rows: each new prompt is read on its own (through the model's prefix
cache, so requests about an image an earlier request brought read only their own words),
``prefill_chunk`` positions between two steps so that a long prompt does not stall the
running requests, and joins the batch; a finished request leaves it at once. When nothing
runs, the worker waits for a request, and gathers what else arrives within a few
milliseconds. A request whose client went away, or whose deadline passed, leaves at the
next step; every accepted request gets exactly one terminal event.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from ..errors import VlmkitError
from ..runtime.generation import DecodeBatch, Row, SamplingParams, new_batch
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
                 batch_window: float = 0.005, prefill_chunk: int | None = 128, metrics=None):
        self.model = model
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
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
        batch = new_batch(self.model.backend, self.model.prefix_cache)
        running: dict[Row, tuple[Job, ReplyBuilder]] = {}  # row -> its request
        while True:
            try:
                self._admit(batch, running)
                if batch.reading:
                    self._read(batch, running)
                if batch.rows:
                    self._step(batch, running)
                if self.metrics:
                    self.metrics.running.set(len(batch.rows))
            except Exception as e:  # noqa: BLE001 - an internal failure answers 500; the server stays up
                log.exception("generation failed")
                for job, _ in running.values():
                    job.emit("error", e)
                running.clear()
                batch = new_batch(self.model.backend, self.model.prefix_cache)
                if self.metrics:
                    self.metrics.running.set(0)

    def _waiting(self, room: int, block: bool) -> list[Job]:
        """Up to ``room`` queued jobs; with ``block``, wait for one and what follows within the window."""
        jobs = []
        if block:
            jobs.append(self.queue.get())
            until = time.monotonic() + self.batch_window
            while len(jobs) < room:
                try:
                    jobs.append(self.queue.get(timeout=max(0.0, until - time.monotonic())))
                except queue.Empty:
                    break
        while len(jobs) < room:
            try:
                jobs.append(self.queue.get_nowait())
            except queue.Empty:
                break
        self._gauge()
        return jobs

    def _admit(self, batch: DecodeBatch, running: dict) -> None:
        busy = len(batch.rows) + len(batch.reading)
        for job in self._waiting(self.max_batch_size - busy, block=not busy):
            if not job.active:
                job.emit("cancelled" if job.cancelled.is_set() else "error",
                         None if job.cancelled.is_set() else DeadlineError("the request timed out while queued"))
                continue
            try:
                prompt = self.model.prompt(job.messages)
                row = batch.begin(prompt, job.params, self.prefill_chunk)  # read by ``_read``, chunk by chunk
            except VlmkitError as e:  # a bad image, a prompt longer than the context: the request's fault
                job.emit("error", e)
                continue
            except Exception as e:  # noqa: BLE001 - an internal failure answers 500; the others keep going
                log.exception("reading a prompt failed")
                job.emit("error", e)
                continue
            job.emit("start", prompt)
            running[row] = (job, ReplyBuilder(self.model.backend, prompt, job.params))

    def _read(self, batch: DecodeBatch, running: dict) -> None:
        """Read the next chunk of the first prompt waiting to join; it joins once read whole."""
        row = batch.reading[0].row
        job, _ = running[row]
        if not job.active:
            job.emit("cancelled" if job.cancelled.is_set() else "error",
                     None if job.cancelled.is_set() else DeadlineError("the request timed out while its prompt was read"))
            batch.remove([row])
            running.pop(row)
            return
        try:
            batch.read()  # a failure drops this prompt only
        except Exception as e:  # noqa: BLE001 - an internal failure answers 500; the others keep going
            log.exception("reading a prompt failed")
            job.emit("error", e)
            running.pop(row)
            return
        if row in batch.rows and self.metrics:
            self.metrics.batch_size.observe(len(batch.rows))

    def _step(self, batch: DecodeBatch, running: dict) -> None:
        tokens = batch.pick()
        done = []
        for row, token in zip(batch.rows, tokens):
            job, reply = running[row]
            if not job.active:
                job.emit("cancelled" if job.cancelled.is_set() else "error", None if job.cancelled.is_set() else
                         DeadlineError("the request ran past the server's --request-timeout"))
                done.append(row)
                continue
            if job.first_token_at is None:
                job.first_token_at = time.monotonic()
            delta = reply.push(token)
            if delta:
                job.emit("delta", delta)
            if reply.finish_reason:
                self._finish(job, reply)
                done.append(row)
        left = [t for row, t in zip(batch.rows, tokens) if row not in done]
        batch.remove(done)
        for row in done:
            running.pop(row)
        if batch.rows:
            batch.advance(left)

    def _finish(self, job: Job, reply: ReplyBuilder) -> None:
        tail = reply.flush()
        if tail:
            job.emit("delta", tail)
        job.emit("done", reply.result())
