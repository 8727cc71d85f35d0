"""``vlmkit serve``: an OpenAI-compatible HTTP API and a chat page over one model.

Routes: ``POST /v1/chat/completions`` (streamed as server-sent events when asked),
``POST /v1/score`` (a scoring model: one image against texts; the model a server holds either
chats or scores, and the other route says so), ``GET /v1/models``, ``GET /health`` (503 until
the model is loaded), ``GET /metrics`` (Prometheus), ``GET /openapi.json`` (generated from the
very models that validate), and the web page at ``/`` (no ``/docs``: FastAPI's pages load scripts
from a CDN). Every error is a 4xx/5xx with the OpenAI error body ``{"error": {"message", "type",
"param", "code"}}``; bad input never gives a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..errors import VlmkitError
from ..runtime.generation import DEFAULT_PREFIX_CACHE_BYTES, ContextError, SamplingParams
from ..runtime.images import DEFAULT_MAX_PIXELS, load_image
from ..runtime.messages import MessageError, normalise
from ..runtime.scoring import Scorer
from . import protocol as p
from .media import MediaError, MediaPolicy, fetch_image
from .metrics import Metrics
from .scheduler import DeadlineError, Job, Scheduler

STATIC = Path(__file__).parent / "static"
# pydantic puts union members in error locations ("temperature.float"); the field is what users need
UNION_TAG = re.compile(r"^(float|int|str|bool|none|function-.*|.*\[.*\])$")
ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")  # "<_io.BytesIO object at 0x7f...>" in a library's message
DISCONNECT_POLL = 0.25  # seconds between checks that a client is still there
log = logging.getLogger("vlmkit.serve")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and policies of one server (each has a ``vlmkit serve`` flag)."""

    model_name: str
    model_aliases: tuple[str, ...] = ()  # other names a request's "model" may use (the model's folder name)
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    prefix_cache_size: int = DEFAULT_PREFIX_CACHE_BYTES
    request_timeout: float = 300.0
    max_body_size: int = 32 * 1024 * 1024
    max_images: int = 4
    max_tokens: int = 2048
    default_max_tokens: int = 256
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    media: MediaPolicy = field(default_factory=MediaPolicy)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}


def error_response(status: int, message: str, *, param=None, type="invalid_request_error", code=None,
                   headers=None) -> JSONResponse:
    message = ADDRESS.sub("", message)  # a memory address tells a client nothing and an attacker something
    body = p.ErrorBody(error=p.ErrorDetail(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse bodies above ``limit`` bytes with 413, by header or while reading.

    A body without Content-Length (chunked) is read here, up to the limit, before the app sees it:
    an error raised from inside ``receive`` would reach FastAPI's body parser, which answers 400.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"the request body is larger than {self.limit} bytes (--max-body-size)",
                                   code="body_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                return await too_large(scope, receive, send)
            return await self.app(scope, receive, send)  # the server reads no more than Content-Length
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                return await self.app(scope, _replay([message], receive), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await too_large(scope, receive, send)
        return await self.app(scope, _replay([{"type": "http.request", "body": bytes(body)}], receive), send)


class Guard:
    """ASGI middleware: the API key on ``/v1/*`` and ``/metrics``, and requests counted by route.

    Plain ASGI, not Starlette's ``BaseHTTPMiddleware``: that one hides a client's disconnect from
    the endpoint, so a non-streamed answer went on being generated for nobody.
    """

    def __init__(self, app, *, router, metrics: Metrics, api_key: str | None):
        self.app, self.router, self.metrics = app, router, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = self.route(scope)
        if self.expected and (path.startswith("/v1/") or path == "/metrics"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: the key cannot be guessed bytewise
                self.metrics.requests.labels(route, "401").inc()
                return await error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                            type="authentication_error", code="invalid_api_key")(scope, receive, send)
        status = ["500"]  # what the client gets when the app raises

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if path.startswith("/v1/") or path in ("/health", "/metrics"):
                self.metrics.requests.labels(route, status[0]).inc()

    def route(self, scope) -> str:
        """The route a request is for, as its template; every unknown path is "unknown" (raw paths as
        labels would let any client grow /metrics without bound)."""
        for candidate in self.router.routes:
            if candidate.matches(scope)[0] != Match.NONE:  # PARTIAL: the route, with another method (405)
                return candidate.path
        return "unknown"


def _replay(messages: list[dict], receive):
    """A ``receive`` giving ``messages`` first, then the server's own (disconnects)."""

    async def replay():
        return messages.pop(0) if messages else await receive()

    return replay


def local_scheduler(model, settings: ServeSettings, metrics: Metrics) -> Scheduler:
    """Dynamic batching on a model loaded in this process (``--engine vlmkit``)."""
    model.prefix_cache.max_bytes = settings.prefix_cache_size
    return Scheduler(model, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue, metrics=metrics)


def create_app(load_model: Callable[[], object], settings: ServeSettings, *,
               scheduler_factory: Callable[[object, ServeSettings, Metrics], object] = local_scheduler) -> FastAPI:
    """The server. ``load_model`` runs in a background thread; ``/health`` says 503 until it returns.

    Args:
        scheduler_factory: ``(what load_model returned, settings, metrics)`` -> an object with
            ``submit(job) -> bool`` answering jobs with ``Job`` events (``scheduler.Scheduler`` here; an
            engine's front elsewhere: ``serve.engines``), optionally ``problem() -> str | None`` for ``/health``.
    """
    metrics = Metrics()
    state: dict = {"model": None, "scheduler": None, "scorer": None, "error": None, "settled": threading.Event()}

    def loader():
        try:
            model = load_model()
            if isinstance(model, Scorer):  # a retrieval model: /v1/score, no generation
                state["scorer"] = ScoreQueue(model, max_queue=settings.max_queue)
            else:
                state["scheduler"] = scheduler_factory(model, settings, metrics)
            state["model"] = model
        except Exception as e:  # noqa: BLE001 - reported by /health; ``serve`` ends the process with it
            if not isinstance(e, VlmkitError):
                log.exception("loading the model failed")
            state["error"] = e
        finally:
            state["settled"].set()

    # no /docs or /redoc: FastAPI's pages load their scripts from a CDN (the chat page works offline)
    app = FastAPI(title="vlmkit", version=_version(), description="OpenAI-compatible chat completions with images",
                  docs_url=None, redoc_url=None)
    threading.Thread(target=loader, name="vlmkit-load", daemon=True).start()
    app.state.vlmkit = state
    app.add_middleware(BodyLimit, limit=settings.max_body_size)
    app.add_middleware(Guard, router=app.router, metrics=metrics, api_key=settings.api_key)  # runs before BodyLimit

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not UNION_TAG.match(str(x))]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
        param = ".".join(loc) or None
        got = repr(first.get("input"))
        shown = f" (got {got})" if "input" in first and len(got) <= 60 and not isinstance(first["input"], dict) else ""
        return error_response(400, f"{param or 'body'}: {first.get('msg')}{shown}", param=param,
                              code=first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), type="not_found_error" if exc.status_code == 404
                              else "invalid_request_error")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, param=exc.param, type=exc.type, code=exc.code,
                              headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.exception("internal error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")

    def served(engine: str):
        """The loaded engine a route needs ("scheduler": chat, "scorer": score), or why the server cannot use it:
        the model is the other kind (400, naming the route that answers it) or is still loading (503)."""
        if state[engine] is None and state[OTHER_ENGINE[engine]] is not None:
            raise ApiError(400, WRONG_ROUTE[engine].format(name=settings.model_name), code=WRONG_ROUTE_CODE[engine])
        if state[engine] is None:
            raise _loading()
        return state[engine]

    @app.get("/health", include_in_schema=True, responses={503: {"description": "the model is still loading"}})
    async def health():
        problem = getattr(state["scheduler"], "problem", lambda: None)()
        if problem:  # an engine behind the front exited
            return JSONResponse({"status": "failed", "error": problem}, status_code=503)
        if state["model"] is not None:
            return {"status": "ok", "model": settings.model_name}
        if state["error"] is not None:
            return JSONResponse({"status": "failed", "error": str(state["error"])}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models():
        return p.ModelList(data=[p.ModelCard(id=settings.model_name, created=int(time.time()))])

    @app.get("/metrics", response_class=Response)
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions", response_model=p.ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "a chat.completion, or chat.completion.chunk events when stream=true"},
                         400: {"model": p.ErrorBody}, 401: {"model": p.ErrorBody}, 404: {"model": p.ErrorBody},
                         413: {"model": p.ErrorBody},
                         429: {"model": p.ErrorBody}, 503: {"model": p.ErrorBody}, 504: {"model": p.ErrorBody}})
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        deadline = time.monotonic() + settings.request_timeout  # image downloads included
        _check_model(body.model, settings)
        scheduler: Scheduler = served("scheduler")
        messages = await _messages(body, settings, deadline)
        params = _params(body, settings)
        loop = asyncio.get_running_loop()
        job = Job(messages, params, loop, deadline=deadline)
        if not scheduler.submit(job):
            raise ApiError(429, "the server is busy: its queue is full (--max-queue); retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        watch = loop.create_task(_watch_client(job, request))
        try:
            kind, payload = await _next_event(job)
            if kind != "start":
                raise _terminal_error(kind, payload, metrics)
            rid, created = p.new_id(), p.now()
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(_sse(job, watch, rid, created, settings.model_name, include_usage, metrics),
                                         media_type="text/event-stream")
            text = []
            while True:
                kind, payload = await _next_event(job)
                if kind == "delta":
                    text.append(payload)
                    continue
                if kind != "done":
                    raise _terminal_error(kind, payload, metrics)
                reply = payload
                _observe(metrics, job, reply)
                usage = p.Usage(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                                total_tokens=reply.prompt_tokens + reply.completion_tokens)
                return p.ChatCompletion(id=rid, created=created, model=settings.model_name, usage=usage,
                                        choices=[p.Choice(message=p.AssistantMessage(content=reply.text),
                                                          finish_reason=reply.finish_reason)])
        finally:
            if not body.stream or job.finished:  # a stream's watch ends with the stream
                watch.cancel()

    @app.post("/v1/score", response_model=p.ScoreList,
              responses={400: {"model": p.ErrorBody}, 401: {"model": p.ErrorBody}, 404: {"model": p.ErrorBody},
                         413: {"model": p.ErrorBody}, 429: {"model": p.ErrorBody}, 503: {"model": p.ErrorBody},
                         504: {"model": p.ErrorBody}})
    async def score(body: p.ScoreRequest):
        """A scoring model (image-text matching): the image against each text, as ``vlmkit score`` gives it."""
        deadline = time.monotonic() + settings.request_timeout  # the image download included
        _check_model(body.model, settings)
        scorer: ScoreQueue = served("scorer")
        _, image = await _image(body.image_url.url, "image_url", settings, deadline)
        rows = await scorer.score(image, body.texts, deadline)
        return p.ScoreList(id=p.new_id("score"), created=p.now(), model=settings.model_name,
                           data=[p.Score(index=i, text=r["text"], itm=r["itm"], itc=r["itc"])
                                 for i, r in enumerate(rows)])

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _version() -> str:
    from .._version import __version__

    return __version__


def serve(app: FastAPI, *, host: str, port: int) -> None:
    """Run ``app`` (from ``create_app``) with uvicorn until interrupted.

    Raises:
        the error that loading the model raised: the server stops at once (a server that can never
        answer must not sit there saying "still loading"), and the CLI reports it as ``chat`` does.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    state = app.state.vlmkit

    def watch():
        state["settled"].wait()
        if state["error"] is not None:
            server.should_exit = True

    threading.Thread(target=watch, name="vlmkit-load-watch", daemon=True).start()
    server.run()
    if state["error"] is not None:
        raise state["error"]


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to tell someone who binds beyond this machine without an API key (None when loopback or keyed)."""
    if api_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback:
        return None
    return (f"warning: --host {host} accepts requests from other machines and no API key is set: anyone who "
            "reaches this port can use the model; set VLMKIT_API_KEY (or --api-key)")


class ScoreQueue:
    """A ``Scorer`` behind the server: one request scored at a time (in a worker thread, so the server keeps
    answering), at most ``max_queue`` waiting (429 beyond), each within its deadline (504)."""

    def __init__(self, scorer: Scorer, *, max_queue: int):
        self.scorer, self.max_queue = scorer, max_queue
        self.lock = asyncio.Lock()
        self.waiting = 0

    async def score(self, image, texts: list[str], deadline: float) -> list[dict]:
        if self.waiting >= self.max_queue:
            raise ApiError(429, "the server is busy: its queue is full (--max-queue); retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            async with self.lock:
                if time.monotonic() > deadline:
                    raise ApiError(504, "the request timed out while queued (--request-timeout)",
                                   type="timeout_error", code="timeout")
                return await asyncio.to_thread(self.scorer.score, image, texts)
        except VlmkitError as e:
            raise ApiError(400, e.message) from None
        finally:
            self.waiting -= 1


def _check_model(model: str | None, settings: ServeSettings) -> None:
    """A request's ``model`` must be the served one (or its folder's name): else 404, as OpenAI answers."""
    if model is not None and model not in (settings.model_name, *settings.model_aliases):
        raise ApiError(404, f"the model {_shown(model)} does not exist: this server serves "
                            f"{settings.model_name!r} (GET /v1/models)", param="model", code="model_not_found")


# a request on the route of the other kind of model: chat on a scoring model, a score from a chat model
OTHER_ENGINE = {"scheduler": "scorer", "scorer": "scheduler"}
WRONG_ROUTE = {"scheduler": "{name!r} is a scoring model (image-text matching): it does not generate text; "
                            "POST /v1/score with an image_url and texts",
               "scorer": "{name!r} generates text: it does not score image-text pairs; POST /v1/chat/completions"}
WRONG_ROUTE_CODE = {"scheduler": "scoring_model", "scorer": "not_a_scoring_model"}


def _loading() -> ApiError:
    return ApiError(503, "the model is still loading; retry when /health says ok", type="server_error",
                    code="model_loading", headers={"Retry-After": "5"})


def _shown(value) -> str:
    """A client's value in a message: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


async def _messages(body: p.ChatCompletionRequest, settings: ServeSettings, deadline: float) -> list[dict]:
    """Request messages -> runtime messages, with every image fetched under the policy (by ``deadline``) and
    checked."""
    out = []
    count = 0
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        texts, images = [], []
        for j, part in enumerate(message.content):
            if isinstance(part, p.TextPart):
                texts.append(part.text)
                continue
            count += 1
            param = f"messages.{i}.content.{j}.image_url"
            if count > settings.max_images:
                raise ApiError(400, f"too many images: at most {settings.max_images} per request (--max-images)",
                               param=param, code="too_many_images")
            data, _ = await _image(part.image_url.url, param, settings, deadline)
            images.append(data)
        out.append({"role": message.role, "content": " ".join(texts), "images": images})
    try:
        normalise(out)
    except MessageError as e:
        raise ApiError(400, e.message, param="messages") from None
    return out


async def _image(url: str, param: str, settings: ServeSettings, deadline: float):
    """(bytes, decoded image) of an image URL, fetched under the media policy by ``deadline`` and checked
    (``--max-image-pixels``, integrity); an ``ApiError`` naming ``param`` when refused."""
    try:
        data = await fetch_image(url, settings.media, param, deadline)
        return data, await asyncio.to_thread(load_image, data, max_pixels=settings.max_image_pixels)
    except MediaError as e:
        raise ApiError(e.status, e.message, param=e.param, code=e.code,
                       type="timeout_error" if e.status == 504 else "invalid_request_error") from None
    except VlmkitError as e:
        raise ApiError(400, e.message.replace("image bytes", "the image"), param=param, code="invalid_image") from None


def _params(body: p.ChatCompletionRequest, settings: ServeSettings) -> SamplingParams:
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > settings.max_tokens:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{param} is {asked}; this server generates at most {settings.max_tokens} tokens",
                       param=param)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(max_new_tokens=asked or min(settings.default_max_tokens, settings.max_tokens),
                          temperature=1.0 if body.temperature is None else float(body.temperature),
                          top_p=1.0 if body.top_p is None else float(body.top_p), seed=body.seed, stop=stop)


async def _next_event(job: Job):
    """The job's next event (a client that went away is ``_watch_client``'s business)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if time.monotonic() > job.deadline + 5:  # the worker should have answered; never hang
                job.cancelled.set()
                return "error", DeadlineError("the request ran past the server's --request-timeout")


async def _watch_client(job: Job, request: Request) -> None:
    """Cancel ``job`` when its client hangs up, streamed or not, however fast its tokens come (checking
    only in pauses between events missed every hang-up of a non-streamed answer)."""
    while not job.finished:
        if await request.is_disconnected():
            job.cancelled.set()
            return
        await asyncio.sleep(DISCONNECT_POLL)


def _terminal_error(kind: str, payload, metrics: Metrics) -> ApiError:
    if kind == "cancelled":
        metrics.cancelled.inc()
        return ApiError(499, "the client closed the request", code="client_closed")
    if isinstance(payload, DeadlineError):
        return ApiError(504, payload.message, type="timeout_error", code="timeout")
    if isinstance(payload, ContextError):
        return ApiError(400, payload.message, param="messages", code="context_length_exceeded")
    if isinstance(payload, VlmkitError):
        return ApiError(400, payload.message, param="messages")
    return ApiError(500, f"internal error: {type(payload).__name__}: {payload}", type="server_error")


def _observe(metrics: Metrics, job: Job, reply) -> None:
    metrics.latency.observe(time.monotonic() - job.created)
    if job.first_token_at is not None:
        metrics.ttft.observe(job.first_token_at - job.created)
    metrics.prompt_tokens.inc(reply.prompt_tokens)
    metrics.completion_tokens.inc(reply.completion_tokens)


async def _sse(job: Job, watch: asyncio.Task, rid: str, created: int, model: str, include_usage: bool,
               metrics: Metrics):
    def event(choices, usage=None) -> str:
        chunk = p.ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage)
        return f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"

    try:
        yield event([p.ChunkChoice(delta=p.Delta(role="assistant", content=""))])
        while True:
            kind, payload = await _next_event(job)
            if kind == "delta":
                yield event([p.ChunkChoice(delta=p.Delta(content=payload))])
                continue
            if kind == "done":
                _observe(metrics, job, payload)
                yield event([p.ChunkChoice(delta=p.Delta(), finish_reason=payload.finish_reason)])
                if include_usage:
                    yield event([], p.Usage(prompt_tokens=payload.prompt_tokens,
                                            completion_tokens=payload.completion_tokens,
                                            total_tokens=payload.prompt_tokens + payload.completion_tokens))
            else:
                error = _terminal_error(kind, payload, metrics)
                body = p.ErrorBody(error=p.ErrorDetail(message=error.message, type=error.type, code=error.code))
                yield f"data: {json.dumps(body.model_dump())}\n\n"
            yield "data: [DONE]\n\n"
            return
    finally:
        watch.cancel()
        if not job.finished:  # the client went away mid-stream: free its slot
            job.cancelled.set()
            metrics.cancelled.inc()
