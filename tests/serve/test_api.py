"""The OpenAI-compatible API with the official openai client, concurrency, disconnects and every bad input."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2 as httpx
import pytest
from openai import OpenAI
from PIL import Image

import vlmkit

from .conftest import PHOTOS, Server, post_and_hang_up

CAT, ROCKET, COFFEE, ASTRONAUT = (PHOTOS / n for n in ("chelsea.png", "rocket.png", "coffee.png", "astronaut.png"))


def data_url(raw: bytes, kind="png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


def ask(text, image=CAT):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image.read_bytes())}},
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="session")  # not module: xdist interleaving would set it up again
def reference(models):
    return vlmkit.load(models["v15-hf"])


def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def test_one_image_question_equals_chat(server, reference):
    answer = client(server).chat.completions.create(model="tiny-llava", messages=ask("What is this?"),
                                                    temperature=0, max_tokens=12)
    expected = reference.chat([{"role": "user", "content": "What is this?", "images": [CAT]}], temperature=0,
                              max_new_tokens=12)
    assert answer.choices[0].message.content == expected.text
    assert answer.usage.completion_tokens == expected.completion_tokens
    assert answer.usage.prompt_tokens == expected.prompt_tokens and expected.image_tokens == 16
    assert answer.choices[0].finish_reason == expected.finish_reason


def test_streaming_equals_non_streaming(server):
    c = client(server)
    full = c.chat.completions.create(model="tiny-llava", messages=ask("Describe it."), temperature=0, max_tokens=12)
    pieces = [chunk.choices[0].delta.content or "" for chunk in
              c.chat.completions.create(model="tiny-llava", messages=ask("Describe it."), temperature=0,
                                        max_tokens=12, stream=True) if chunk.choices]
    assert len([x for x in pieces if x]) > 1 and "".join(pieces) == full.choices[0].message.content


def test_stream_with_usage(server):
    chunks = list(client(server).chat.completions.create(model="tiny-llava", messages=ask("Hi?"), temperature=0,
                                                         max_tokens=4, stream=True,
                                                         stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []


def test_concurrent_requests_are_batched_and_equal_sequential(server):
    c = client(server)
    questions = [("What is this?", CAT), ("Which colours?", ROCKET), ("Describe.", COFFEE), ("Who?", ASTRONAUT)]
    sequential = [c.chat.completions.create(model="tiny-llava", messages=ask(q, i), temperature=0,
                                            max_tokens=16).choices[0].message.content for q, i in questions]
    batches_before = metric(server, "vlmkit_batch_size_count") - metric(server, 'vlmkit_batch_size_bucket{le="1.0"}')
    barrier = threading.Barrier(len(questions))

    def one(item):
        barrier.wait()
        return c.chat.completions.create(model="tiny-llava", messages=ask(*item), temperature=0,
                                         max_tokens=16).choices[0].message.content

    with ThreadPoolExecutor(len(questions)) as pool:
        concurrent = list(pool.map(one, questions))
    assert concurrent == sequential
    batched = metric(server, "vlmkit_batch_size_count") - metric(server, 'vlmkit_batch_size_bucket{le="1.0"}')
    assert batched > batches_before  # at least one batch held more than one request


def test_disconnect_mid_stream_frees_the_slot(server):
    before = metric(server, "vlmkit_cancelled_requests_total")
    body = {"messages": ask("Tell a long story."), "stream": True, "temperature": 0, "max_tokens": 64,
            "stop": ["never-appears"]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if '"content"' in line and '"content":""' not in line:
                break  # one real token arrived: hang up
    deadline = __import__("time").monotonic() + 15
    while metric(server, "vlmkit_cancelled_requests_total") <= before:
        assert __import__("time").monotonic() < deadline, "the cancelled stream was never freed"
        __import__("time").sleep(0.1)
    ok = client(server).chat.completions.create(model="tiny-llava", messages=ask("Still there?"), temperature=0,
                                                max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_models_health_metrics_openapi(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client(server).models.list().data] == ["tiny-llava"]
    text = httpx.get(server.url + "/metrics").text
    for name in ("vlmkit_requests_total", "vlmkit_request_latency_seconds_bucket",
                 "vlmkit_time_to_first_token_seconds_bucket", "vlmkit_prompt_tokens_total",
                 "vlmkit_completion_tokens_total", "vlmkit_queue_depth", "vlmkit_batch_size_bucket"):
        assert name in text, name
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]
    request = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "stream", "max_tokens", "temperature", "top_p", "seed", "stop"} <= set(request)


def _post(server, body, **kwargs):
    return httpx.post(server.url + "/v1/chat/completions", timeout=30, **kwargs,
                      **({"content": body} if isinstance(body, (bytes, str)) else {"json": body}))


def _truncated_png() -> bytes:
    return CAT.read_bytes()[:4000]


def _png(width, height) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(out, format="PNG")
    return out.getvalue()


def image_message(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "?"}]}]


BAD = [
    ("malformed JSON", b'{"messages": [', 400, None, "not valid JSON"),
    ("temperature false", {"messages": [{"role": "user", "content": "hi"}], "temperature": False}, 400,
     "temperature", "valid number"),
    ("max_tokens a string", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "12"}, 400,
     "max_tokens", "integer"),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "robot"),
    ("no messages", {"messages": []}, 400, "messages", "at least 1"),
    ("assistant last", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     400, "messages", "last message"),
    ("broken image", {"messages": image_message(data_url(_truncated_png()))}, 400,
     "messages.0.content.0.image_url", "truncated"),
    ("not base64", {"messages": image_message("data:image/png;base64,@@@")}, 400,
     "messages.0.content.0.image_url", "base64"),
    ("above pixel limit", {"messages": image_message(data_url(_png(1200, 1200)))}, 400,
     "messages.0.content.0.image_url", "pixel"),
    ("too many images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(_png(8, 8))}}] * 5 + [{"type": "text", "text": "?"}]}]},
     400, "messages.0.content.4.image_url", "too many images"),
    ("prompt longer than the context", {"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 8},
     400, "messages", "exceeds the model's context"),
    ("max_tokens above the limit", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400,
     "max_tokens", "at most 64"),
    ("n = 2", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", "less than or equal"),
    ("file:// outside the allowed folder", {"messages": image_message("file:///etc/passwd")}, 400,
     "messages.0.content.0.image_url", "only allowed under"),
    ("http from a domain not allowed", {"messages": image_message("http://127.0.0.1:9/cat.png")}, 400,
     "messages.0.content.0.image_url", "refused"),
    ("unknown scheme", {"messages": image_message("ftp://x/cat.png")}, 400, "messages.0.content.0.image_url",
     "unsupported"),
    ("body above --max-body-size", {"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}, 413, None,
     "larger than"),
    ("seed above int64", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, 400, "seed",
     "less than or equal to 9223372036854775807 (got 18446744073709551616)"),
    ("seed below int64", {"messages": [{"role": "user", "content": "hi"}], "seed": -(2**63) - 1}, 400, "seed",
     "greater than or equal to -9223372036854775808"),
    ("not an image", {"messages": image_message(data_url(b"hello, not an image"))}, 400,
     "messages.0.content.0.image_url", "begins with b'hello, n'"),
    ("a model this server does not serve", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"},
     404, "model", "'gpt-4o' does not exist"),
]


@pytest.mark.parametrize("name, body, status, param, words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx(server, name, body, status, param, words):
    response = _post(server, body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words.lower() in error["message"].lower(), error
    assert not re.search(r"0x[0-9a-fA-F]{6,}", error["message"]), error  # the field and the value, no address
    if param:
        assert error["param"] == param, error


def test_file_url_inside_the_allowed_folder(server, media_dir, reference):
    answer = _post(server, {"messages": image_message((media_dir / "cat.png").as_uri()), "temperature": 0,
                            "max_tokens": 6}).json()
    expected = reference.chat([{"role": "user", "content": "?", "images": [CAT]}], temperature=0, max_new_tokens=6)
    assert answer["choices"][0]["message"]["content"] == expected.text


def test_server_stays_up_after_bad_input(server):
    for _ in range(3):
        _post(server, b"{nope", headers={"Content-Type": "application/json"})
    assert httpx.get(server.url + "/health").status_code == 200


def test_api_key_and_full_queue(models):
    s = Server(models["v15-hf"], "--api-key", "sesame", "--max-queue", "1", "--max-batch-size", "1",
               "--max-tokens", "64")
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        denied = httpx.get(s.url + "/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer sesame"}
        assert httpx.get(s.url + "/v1/models", headers=auth).status_code == 200
        body = {"messages": ask("Tell a long story."), "temperature": 0, "max_tokens": 64, "stop": ["never-appears"]}
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda _: httpx.post(s.url + "/v1/chat/completions", json=body, headers=auth,
                                                           timeout=120), range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert 429 in statuses and 200 in statuses, statuses
        busy = next(r for r in responses if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
        answers = {r.json()["choices"][0]["message"]["content"] for r in responses if r.status_code == 200}
        assert len(answers) == 1  # every accepted request answered, once, with the same greedy text
    finally:
        s.stop()


def test_health_is_503_until_the_model_is_loaded():
    import time

    from starlette.testclient import TestClient

    from vlmkit.serve.app import ServeSettings, create_app

    gate = threading.Event()

    def slow_load():
        gate.wait(10)
        raise RuntimeError("no model in this test")

    app = create_app(slow_load, ServeSettings(model_name="x"))
    with TestClient(app) as http:
        assert http.get("/health").status_code == 503 and http.get("/health").json()["status"] == "loading"
        refused = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_loading"
        gate.set()
        time.sleep(0.2)
        assert http.get("/health").json()["status"] == "failed"


def test_unknown_model_is_404_and_the_served_and_folder_names_are_answered(server, models):
    refused = _post(server, {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"})
    assert refused.status_code == 404, refused.text
    assert refused.json()["error"]["code"] == "model_not_found"
    for name in ("tiny-llava", models["v15-hf"].name):  # --served-model-name, and the model's folder
        answer = _post(server, {"messages": [{"role": "user", "content": "hi"}], "model": name, "max_tokens": 1})
        assert answer.status_code == 200, (name, answer.text)
        assert answer.json()["model"] == "tiny-llava"


def test_chunked_body_above_the_limit_is_413(server):
    def chunks():  # no Content-Length: sent chunked, 5 MB against --max-body-size 4MB
        for _ in range(5):
            yield b" " * (1024 * 1024)

    response = httpx.post(server.url + "/v1/chat/completions", content=chunks(),
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "body_too_large"


def test_no_pages_that_load_scripts_from_a_cdn(server):
    for path in ("/docs", "/redoc"):
        assert httpx.get(server.url + path).status_code == 404, path
    assert httpx.get(server.url + "/openapi.json").status_code == 200


ROUTES = {"/v1/chat/completions", "/v1/score", "/v1/models", "/health", "/metrics", "unknown"}


def routes_in_metrics(url: str, headers: dict | None = None) -> set[str]:
    text = httpx.get(url + "/metrics", headers=headers).text
    return set(re.findall(r'^vlmkit_requests_total\{route="([^"]*)"', text, re.M))


def test_metrics_label_requests_by_route_not_by_raw_path(server):
    with httpx.Client(base_url=server.url) as http:
        for i in range(200):
            assert http.get(f"/v1/random-{i}/x{i}").status_code == 404
        assert http.post("/v1/models").status_code == 405
    routes = routes_in_metrics(server.url)
    assert "unknown" in routes and routes <= ROUTES, routes  # 200 paths, one label: no client grows /metrics


@pytest.fixture(scope="session")  # not module: xdist interleaving would set it up again
def keyed(models):
    """The key from the environment (not the command line, which ps shows), a short request timeout and
    image URLs allowed from this machine (for a server that trickles)."""
    s = Server(models["v15-hf"], "--request-timeout", "3", "--allowed-media-domains", "127.0.0.1",
               env={"VLMKIT_API_KEY": "from-the-env"})
    yield s
    s.stop()


AUTH = {"Authorization": "Bearer from-the-env"}


def test_api_key_from_the_environment_and_401s_counted_by_route(keyed):
    assert httpx.get(keyed.url + "/v1/models").status_code == 401
    assert httpx.get(keyed.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(keyed.url + "/v1/models", headers=AUTH).status_code == 200
    with httpx.Client(base_url=keyed.url) as http:
        for i in range(100):
            assert http.get(f"/v1/guess-{i}").status_code == 401
    routes = routes_in_metrics(keyed.url, AUTH)
    assert "unknown" in routes and routes <= ROUTES, routes


class Trickle(BaseHTTPRequestHandler):
    """An image server that sends a PNG one byte every 0.2 s (a read never waits long; the whole never ends)."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        try:
            for byte in CAT.read_bytes()[:150]:  # bounded: 30 s at most
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:  # the server under test hung up
            pass

    def log_message(self, *args):
        pass


def test_an_image_url_that_trickles_ends_with_the_request_deadline(keyed):
    images = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    images.daemon_threads = True
    threading.Thread(target=images.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{images.server_address[1]}/cat.png"
        start = time.monotonic()
        response = _post(keyed, {"messages": image_message(url), "max_tokens": 4}, headers=AUTH)
        took = time.monotonic() - start
    finally:
        images.shutdown()
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "timeout" and error["param"] == "messages.0.content.0.image_url", error
    assert took < 3 + 3, took  # --request-timeout 3, not the 30 s the download would take


def test_a_client_that_leaves_a_non_streamed_answer_stops_its_generation(models):
    s = Server(models["v15-hf"], "--max-tokens", "4000", "--max-batch-size", "1")
    try:
        tokens, cancelled = metric(s, "vlmkit_completion_tokens_total"), metric(s, "vlmkit_cancelled_requests_total")
        body = {"messages": ask("Tell a long story."), "temperature": 0, "max_tokens": 4000,
                "stop": ["never-appears"]}
        post_and_hang_up(s.port, body, until=lambda: metric(s, "vlmkit_running_requests") == 1)
        left = time.monotonic()
        while metric(s, "vlmkit_running_requests") != 0:
            assert time.monotonic() - left < 10, "the answer is still being generated for nobody"
            time.sleep(0.05)
        assert metric(s, "vlmkit_cancelled_requests_total") == cancelled + 1
        assert metric(s, "vlmkit_completion_tokens_total") == tokens  # it never finished its 4,000 tokens
        text = httpx.get(s.url + "/metrics").text
        assert 'vlmkit_requests_total{route="/v1/chat/completions",status="499"} 1.0' in text, text
    finally:
        s.stop()
