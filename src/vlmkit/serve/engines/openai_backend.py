"""A ``Backend`` over an OpenAI-compatible chat server (vLLM's): streamed chat completions with usage."""

from __future__ import annotations

import json
from typing import AsyncIterator

from ...runtime.generation import SamplingParams
from .front import EngineFailed, EngineReply, openai_messages, refusal

FINISH = {"stop": "stop", "length": "length"}  # anything else an engine says (abort, ...) ends as "stop"


def error_message(body: bytes) -> str:
    """The message of an OpenAI error body (or the body itself, shortened)."""
    try:
        error = json.loads(body)
        error = error.get("error", error) if isinstance(error, dict) else error
        return str(error.get("message", error) if isinstance(error, dict) else error)
    except ValueError:
        return body.decode("utf-8", "replace")[:500]


class LeadingSpace:
    """vlmkit's answers start without the word-start space of their first token (SentencePiece
    decoding, as the original LLaVA and ``vlmkit.load().chat``); engines that detokenise in the
    prompt's context keep it. Drops exactly one leading space from the start of the answer."""

    def __init__(self):
        self.pending = True

    def __call__(self, text: str) -> str:
        if self.pending and text:
            self.pending = False
            return text[1:] if text.startswith(" ") else text
        return text


class EngineServer:
    """What every backend over an engine's HTTP server shares: one pooled client, the process's state.

    Args:
        url: the server, e.g. ``http://127.0.0.1:PORT``.
        process: the ``EngineProcess``, for ``problem()``.
    """

    def __init__(self, url: str, process=None):
        self.url, self.process = url, process
        self._client = None

    def client(self):
        import httpx2 as httpx

        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(None, connect=10),
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return self._client

    def retryable(self, error: BaseException) -> bool:
        return False  # one engine: nowhere else to go

    def problem(self) -> str | None:
        return self.process.problem() if self.process is not None else None


class OpenAIChatBackend(EngineServer):
    """Streams ``POST /v1/chat/completions`` of an engine's server.

    Args:
        name: the engine's name in messages.
        url: the server, e.g. ``http://127.0.0.1:PORT``.
        model: the model id the engine serves.
        extra: fields added to every request (engine options such as vLLM's ``add_special_tokens``).
        process: the ``EngineProcess``, for ``problem()``.
    """

    def __init__(self, name: str, url: str, model: str, *, extra: dict | None = None, process=None):
        super().__init__(url, process)
        self.name, self.model, self.extra = name, model, extra or {}

    def body(self, messages: list[dict], params: SamplingParams) -> dict:
        body = {"model": self.model, "messages": openai_messages(messages), "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, **self.extra}
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    async def stream(self, messages: list[dict], params: SamplingParams, timeout: float) -> AsyncIterator[tuple]:
        strip, text, finish, usage = LeadingSpace(), [], None, None
        async with self.client().stream("POST", "/v1/chat/completions", json=self.body(messages, params)) as response:
            if response.status_code != 200:
                raise refusal(self.name, response.status_code, error_message(await response.aread()))
            yield "start", None
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise EngineFailed(f"{self.name}: {error_message(line[6:].encode())}")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or []:
                    piece = strip((choice.get("delta") or {}).get("content") or "")
                    if piece:
                        text.append(piece)
                        yield "delta", piece
                    finish = choice.get("finish_reason") or finish
        if usage is None:
            raise EngineFailed(f"{self.name} ended the stream without its usage")
        yield "done", EngineReply("".join(text), usage["prompt_tokens"], usage["completion_tokens"],
                                  FINISH.get(finish, "stop"))
