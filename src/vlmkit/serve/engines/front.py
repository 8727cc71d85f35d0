"""The front every engine sits behind: vlmkit's API, limits, media policy and error bodies, whatever generates.

``serve.app.create_app`` validates a request, fetches and checks its images under the media
policy and turns it into a ``Job`` (runtime messages + ``SamplingParams``). A scheduler answers
the job with events: ("start", info), ("delta", text)*, then exactly one terminal event.
``RemoteScheduler`` is that scheduler for a generator in another process — an engine's own
server (vLLM, llama-server) or Ray Serve replicas of vlmkit's worker — reached through a
``Backend``:

* bounded: at most ``max_pending`` requests in flight, else ``submit`` says no (the app answers 429);
* a client that goes away, or a deadline that passes, closes the engine's stream (the engine
  stops generating);
* an engine's refusal becomes a 400 naming the field, its failure a 500 with a message;
* a lost replica (``Backend.retryable``) is retried on another one: at once when nothing was
  sent yet; when text was already sent, only for a reproducible request (greedy or seeded),
  replayed and checked against what was sent, so nothing is answered twice.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import time
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from ...errors import VlmkitError
from ...runtime.generation import ContextError, SamplingParams
from ..scheduler import DeadlineError, Job

log = logging.getLogger("vlmkit.serve")
RETRY_PAUSE = 0.25  # seconds before a retry, times the attempt


@dataclass(frozen=True)
class EngineReply:
    """What the app needs of a finished answer (the runtime's ``Reply`` has the same fields)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class EngineError(VlmkitError):
    """An engine cannot be started: not installed, refuses the model, or exited."""


class EngineRefused(VlmkitError):
    """The engine refused a request as bad input (answered as 400, naming ``messages``)."""


class EngineFailed(Exception):
    """The engine failed a request it accepted (answered as 500 with this message)."""


class Backend(Protocol):
    """A generator in another process. ``stream`` yields ("start", info) once the request is
    accepted, then ("delta", text)*, then ("done", EngineReply); it raises ``ContextError`` /
    ``EngineRefused`` for bad input and anything else for a failure."""

    name: str

    def stream(self, messages: list[dict], params: SamplingParams, timeout: float) -> AsyncIterator[tuple]: ...

    def retryable(self, error: BaseException) -> bool: ...

    def problem(self) -> str | None: ...


# An engine's 400 body -> the error vlmkit answers with (first match wins; the rest are EngineRefused).
REFUSALS = (
    (re.compile(r"context length|context size|maximum context|exceeds the available context|too long", re.I),
     ContextError),
)


def refusal(engine: str, status: int, message: str) -> Exception:
    """The exception for an engine's error answer: 4xx are the request's fault, the rest the engine's."""
    if 400 <= status < 500:
        for pattern, kind in REFUSALS:
            if pattern.search(message):
                return kind(f"{engine}: {message}")
        return EngineRefused(f"{engine} refused the request: {message}")
    return EngineFailed(f"{engine} answered HTTP {status}: {message}")


def reproducible(params: SamplingParams) -> bool:
    """Greedy or seeded: the same request gives the same tokens again (so it may be replayed)."""
    return params.temperature == 0 or params.seed is not None


class RemoteScheduler:
    """``serve.scheduler.Scheduler``'s interface (``submit(job) -> bool``) over a ``Backend``.

    Args:
        backend: where the tokens come from.
        max_pending: requests in flight (queued in the engine or generating) before 429.
        metrics: the app's ``Metrics`` (queue depth = requests in flight here).
        retries: how often a lost replica's request is tried again elsewhere.
    """

    def __init__(self, backend: Backend, *, max_pending: int, metrics=None, retries: int = 2):
        self.backend = backend
        self.max_pending = max_pending
        self.metrics = metrics
        self.retries = retries
        self.pending = 0
        self.tasks: set[asyncio.Task] = set()
        self.retried = None
        if metrics is not None:
            from prometheus_client import Counter

            self.retried = Counter("vlmkit_retried_requests", "requests tried again after a lost replica",
                                   ["replayed"], registry=metrics.registry)

    def submit(self, job: Job) -> bool:
        """Start answering ``job`` on its event loop; False when ``max_pending`` are in flight."""
        if self.pending >= self.max_pending:
            return False
        self.pending += 1
        self._gauge()
        task = job.loop.create_task(self._answer(job))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    def problem(self) -> str | None:
        """Why the engine cannot answer now (shown by ``/health``), or None."""
        return self.backend.problem()

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self.pending)

    async def _answer(self, job: Job) -> None:
        watch = asyncio.get_running_loop().create_task(_watch(job, asyncio.current_task()))
        try:
            await self._attempts(job)
        except asyncio.CancelledError:
            job.emit("cancelled" if job.cancelled.is_set() else "error",
                     None if job.cancelled.is_set() else DeadlineError("the request ran past the server's "
                                                                       "--request-timeout"))
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's one terminal event
            if not isinstance(e, (VlmkitError, EngineFailed)):
                log.exception("%s failed a request", self.backend.name)
                e = EngineFailed(f"{self.backend.name}: {type(e).__name__}: {e}")
            job.emit("error", e)
        finally:
            watch.cancel()
            self.pending -= 1
            self._gauge()

    async def _attempts(self, job: Job) -> None:
        sent, started = "", False  # text the client already has; whether the app heard "start"
        for attempt in range(self.retries + 1):
            replay = sent
            try:
                async for kind, payload in self.backend.stream(job.messages, job.params,
                                                               max(0.1, job.deadline - time.monotonic())):
                    if kind == "start":
                        if not started:
                            started = True
                            job.emit("start", payload)
                    elif kind == "delta":
                        if replay:  # a replayed answer: what the client has must come again, first
                            if not (replay.startswith(payload) or payload.startswith(replay)):
                                raise EngineFailed(f"{self.backend.name}: a replica was lost mid-answer and the "
                                                   "replay differs from what was sent; retry the request")
                            payload, replay = payload[len(replay):], replay[len(payload):]
                            if not payload:
                                continue
                        if job.first_token_at is None:
                            job.first_token_at = time.monotonic()
                        sent += payload
                        job.emit("delta", payload)
                    elif kind == "done":
                        job.emit("done", payload)
                        return
                raise EngineFailed(f"{self.backend.name} closed the answer before it was done")
            except (VlmkitError, EngineFailed, asyncio.CancelledError):
                raise
            except Exception as e:  # noqa: BLE001 - decided by the backend
                if attempt == self.retries or not self.backend.retryable(e):
                    raise
                if sent and not reproducible(job.params):
                    raise EngineFailed(f"{self.backend.name}: the replica answering was lost after part of the "
                                       "answer was sent; a sampled request without a seed cannot be replayed, "
                                       "retry it") from None
                log.warning("%s: %s; retrying the request (attempt %d)", self.backend.name, e, attempt + 2)
                if self.retried is not None:
                    self.retried.labels(str(bool(sent)).lower()).inc()
                await asyncio.sleep(RETRY_PAUSE * (attempt + 1))  # let the router notice the lost replica


async def _watch(job: Job, task: asyncio.Task) -> None:
    """Cancel ``task`` when the client goes away or the deadline passes (closing the engine's stream)."""
    while job.active:
        await asyncio.sleep(0.1)
    task.cancel()


# ----------------------------------------------------------------------- request parts


MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "BMP": "image/bmp", "WEBP": "image/webp"}


def image_payload(data: bytes, formats: tuple[str, ...] = tuple(MIME)) -> tuple[str, bytes]:
    """``(mime type, bytes)`` of an image the front already checked, re-encoded as PNG when the
    engine does not read its format (llama.cpp's stb_image reads no WebP, for one)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format in formats:
            return MIME[image.format], data
        out = io.BytesIO()
        image.convert("RGB").save(out, format="PNG")
        return "image/png", out.getvalue()


def data_url(data: bytes, formats: tuple[str, ...] = tuple(MIME)) -> str:
    mime, raw = image_payload(data, formats)
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def openai_messages(messages: list[dict]) -> list[dict]:
    """Runtime messages (text + image bytes) -> OpenAI chat messages, images before the text.

    The order is vlmkit's (LLaVA's ``<image>\\n`` + question); the chat templates vlmkit writes
    count a message's images and put them first whatever their order.
    """
    out = []
    for message in messages:
        images = message.get("images") or []
        if not images:
            out.append({"role": message["role"], "content": message["content"]})
            continue
        parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
        out.append({"role": message["role"], "content": parts + [{"type": "text", "text": message["content"]}]})
    return out
