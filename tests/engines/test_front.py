"""The front every engine sits behind, over a scripted backend: events, errors, retries, replays, limits.

The real app (``serve.app.create_app``) runs with ``RemoteScheduler`` in place of the local
scheduler, so validation, the media policy and the error bodies are exactly those of
``vlmkit serve``; the backend is a script, so each path is forced and checked.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import pytest
from PIL import Image
from starlette.testclient import TestClient

from vlmkit.runtime.generation import ContextError, SamplingParams
from vlmkit.serve.app import ServeSettings, create_app
from vlmkit.serve.engines.front import (EngineFailed, EngineRefused, EngineReply, RemoteScheduler, openai_messages,
                                        refusal, reproducible)
from vlmkit.serve.engines.openai_backend import LeadingSpace, error_message
from vlmkit.serve.scheduler import DeadlineError


class Lost(Exception):
    """A replica went away (retryable)."""


class Script:
    """A backend that plays one scripted list of events per attempt; ``Lost`` items raise."""

    name = "script"

    def __init__(self, *attempts, hang: bool = False):
        self.attempts = list(attempts)
        self.calls: list[tuple] = []
        self.closed = 0
        self.hang = hang

    async def stream(self, messages, params, timeout):
        self.calls.append((messages, params))
        events = self.attempts.pop(0)
        try:
            for event in events:
                await asyncio.sleep(0)
                if isinstance(event, BaseException):
                    raise event
                yield event
            if self.hang:
                await asyncio.sleep(3600)
        finally:
            self.closed += 1

    def retryable(self, error):
        return isinstance(error, Lost)

    def problem(self):
        return None


def reply(text, prompt=5):
    return EngineReply(text, prompt, len(text.split()), "stop")


def answer(*pieces):
    return [("start", None), *[("delta", p) for p in pieces], ("done", reply("".join(pieces)))]


def client_for(backend, **settings) -> TestClient:
    settings = ServeSettings(model_name="fake", **settings)
    app = create_app(lambda: "engine", settings,
                     scheduler_factory=lambda _m, s, metrics: RemoteScheduler(backend, max_pending=2, metrics=metrics))
    return TestClient(app)


def ready(http: TestClient) -> TestClient:
    for _ in range(100):
        if http.get("/health").status_code == 200:
            return http
        time.sleep(0.02)
    raise AssertionError("the app never got ready")


def png(size=(8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(out, format="PNG")
    return out.getvalue()


def chat(text="hi", image: bytes | None = None, **fields) -> dict:
    content = text if image is None else [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
        {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], **fields}


def test_answer_through_the_front_with_usage_and_stream():
    backend = Script(answer("Hello", " there"), answer("Hello", " there"))
    with client_for(backend) as http:
        body = ready(http).post("/v1/chat/completions", json=chat(temperature=0, max_tokens=7)).json()
        assert body["choices"][0]["message"]["content"] == "Hello there"
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
        messages, params = backend.calls[0]
        assert messages == [{"role": "user", "content": "hi"}]
        assert params.max_new_tokens == 7 and params.temperature == 0
        lines = http.post("/v1/chat/completions", json=chat(stream=True)).text.splitlines()
        assert "".join(line for line in lines if '"content":"' in line).count("Hello") == 1
        assert lines[-2] == "data: [DONE]"


def test_images_are_checked_by_the_front_before_any_engine_sees_them():
    backend = Script()
    with client_for(backend, max_images=1) as http:
        ready(http)
        broken = http.post("/v1/chat/completions", json=chat(image=png()[:60]))
        local = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, {"type": "text", "text": "?"}]}]})
        many = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png()).decode()}}
        ] * 2}]})
    for response, words in ((broken, "truncated"), (local, "--allowed-local-media-path"), (many, "too many")):
        error = response.json()["error"]
        assert response.status_code == 400 and words in error["message"], error
        assert error["param"].startswith("messages.0.content.")
    assert backend.calls == []


@pytest.mark.parametrize("error, status, code", [
    (EngineRefused("engine refused the request: bad"), 400, None),
    (ContextError("engine: This model's maximum context length is 2048 tokens"), 400, "context_length_exceeded"),
    (EngineFailed("engine answered HTTP 500: boom"), 500, None),
    (RuntimeError("socket closed"), 500, None),
])
def test_engine_errors_become_openai_error_bodies(error, status, code):
    with client_for(Script([error])) as http:
        response = ready(http).post("/v1/chat/completions", json=chat())
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == code
    assert str(error).split(":")[-1].strip() in body["message"]
    with client_for(Script([error])) as http:  # the server stays up
        assert ready(http).get("/health").status_code == 200


def test_a_replica_lost_before_the_first_token_is_retried_elsewhere():
    backend = Script([("start", None), Lost("replica died")], answer("Fine"))
    with client_for(backend) as http:
        body = ready(http).post("/v1/chat/completions", json=chat(temperature=0.7)).json()
    assert body["choices"][0]["message"]["content"] == "Fine" and len(backend.calls) == 2


def test_a_greedy_answer_lost_midway_is_replayed_and_nothing_is_sent_twice():
    backend = Script([("start", None), ("delta", "Hel"), ("delta", "lo"), Lost("replica died")],
                     answer("He", "llo", " world"))
    with client_for(backend) as http:
        lines = ready(http).post("/v1/chat/completions", json=chat(stream=True, temperature=0)).text.splitlines()
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                   for line in lines if line.startswith("data: {") and '"choices":[{' in line)
    assert text == "Hello world"


def test_a_replay_that_differs_fails_cleanly():
    backend = Script([("start", None), ("delta", "Hello"), Lost("died")], answer("Bye"))
    with client_for(backend) as http:
        response = ready(http).post("/v1/chat/completions", json=chat(temperature=0))
    assert response.status_code == 500 and "replay differs" in response.json()["error"]["message"]


def test_a_sampled_answer_without_seed_is_not_replayed():
    backend = Script([("start", None), ("delta", "Hello"), Lost("died")], answer("Hello"))
    with client_for(backend) as http:
        response = ready(http).post("/v1/chat/completions", json=chat(temperature=0.8))
    assert response.status_code == 500 and "cannot be replayed" in response.json()["error"]["message"]
    assert len(backend.calls) == 1
    assert reproducible(SamplingParams(temperature=0.8, seed=3)) and not reproducible(SamplingParams(temperature=1))


def test_in_flight_limit_gives_429_and_the_deadline_closes_the_engine_stream():
    backend = Script([("start", None), ("delta", "x")], [("start", None)], [("start", None)], hang=True)
    with client_for(backend, request_timeout=1.0) as http:
        ready(http)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(3) as pool:
            statuses = sorted(r.status_code for r in pool.map(
                lambda _: http.post("/v1/chat/completions", json=chat()), range(3)))
    assert statuses == [429, 504, 504], statuses
    assert backend.closed == 2  # both engine streams were closed when their deadline passed


def test_refusal_table_and_error_messages():
    assert isinstance(refusal("vllm", 400, "This model's maximum context length is 2048 tokens"), ContextError)
    assert isinstance(refusal("vllm", 400, "bad image"), EngineRefused)
    assert isinstance(refusal("vllm", 503, "busy"), EngineFailed)
    assert error_message(b'{"error": {"message": "nope", "code": 400}}') == "nope"
    assert error_message(b'{"message": "flat"}') == "flat"
    assert error_message(b"<html>") == "<html>"
    assert isinstance(DeadlineError("x"), Exception)


def test_leading_space_and_openai_messages():
    strip = LeadingSpace()
    assert [strip(p) for p in ["", " cheap", " Header"]] == ["", "cheap", " Header"]
    webp = io.BytesIO()
    Image.new("RGB", (4, 4)).save(webp, format="WEBP")
    out = openai_messages([{"role": "system", "content": "be brief"},
                           {"role": "user", "content": "what?", "images": [png(), webp.getvalue()]}])
    assert out[0] == {"role": "system", "content": "be brief"}
    parts = out[1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"] and parts[2]["text"] == "what?"
    assert parts[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert parts[1]["image_url"]["url"].startswith("data:image/webp;base64,")


def test_health_reports_an_engine_that_exited():
    class Dead(Script):
        def problem(self):
            return "vllm exited with code 1; see /tmp/x/engine.log"

    with client_for(Dead()) as http:
        for _ in range(100):
            response = http.get("/health")
            if response.json().get("error"):
                break
            time.sleep(0.02)
    assert response.status_code == 503 and "exited with code 1" in response.json()["error"]


def test_the_front_refuses_an_unknown_model_and_an_out_of_range_seed_before_the_engine():
    backend = Script()
    with client_for(backend) as http:
        ready(http)
        model = http.post("/v1/chat/completions", json=chat(model="gpt-4o"))
        seed = http.post("/v1/chat/completions", json=chat(seed=2**64))
    assert model.status_code == 404 and model.json()["error"]["code"] == "model_not_found", model.text
    assert seed.status_code == 400 and seed.json()["error"]["param"] == "seed", seed.text
    assert backend.calls == []


def test_a_client_that_leaves_a_non_streamed_answer_closes_the_engine_stream():
    import threading

    import uvicorn

    from ..serve.conftest import free_port, post_and_hang_up

    class Endless(Script):
        async def stream(self, messages, params, timeout):  # a token every 10 ms for 30 s: never a pause
            self.calls.append((messages, params))
            try:
                yield "start", None
                for _ in range(3000):
                    await asyncio.sleep(0.01)
                    yield "delta", "x"
                yield "done", reply("x" * 3000)
            finally:
                self.closed += 1

    backend = Endless()
    settings = ServeSettings(model_name="fake")
    app = create_app(lambda: "engine", settings,
                     scheduler_factory=lambda _m, s, metrics: RemoteScheduler(backend, max_pending=2, metrics=metrics))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        post_and_hang_up(port, chat(), until=lambda: len(backend.calls) == 1)
        deadline = time.monotonic() + 10
        while not backend.closed:
            assert time.monotonic() < deadline, "the engine still generates for a client that left"
            time.sleep(0.05)
    finally:
        server.should_exit = True
        thread.join(10)
