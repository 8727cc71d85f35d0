"""``vlmkit serve GGUF_FOLDER --engine llama.cpp`` (llama-server) on the GGUF pair ``vlmkit convert --to gguf`` wrote.

The answers are checked against llama.cpp called directly (``parity.llamacpp.LlamaCpp``) with
the same prompt: llama.cpp's LLaVA graph differs from the original (ggml-org/llama.cpp#25814,
see ``vlmkit verify``), so llama.cpp, not vlmkit's runtime, is the reference here. Slow; never
skipped: without llama-server (``make llama-server``) the server fails to start and these fail.
"""

from __future__ import annotations

import ctypes

import httpx2 as httpx
import pytest
from openai import OpenAI

from vlmkit.serve.engines import llamacpp

from .conftest import ASTRONAUT, BROKEN_IMAGE, CAT, COFFEE, ROCKET, Served, ask, assert_image_refused

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("llama.cpp")]


@pytest.fixture(scope="module")
def llama_server(gguf_folder):
    server = Served(gguf_folder, "--engine", "llama.cpp", "--max-batch-size", "4", "--max-tokens", "64",
                    "--max-image-pixels", "1000000", timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def direct(gguf_folder):
    """llama.cpp through its C API, the pair loaded once: ``(question, image, max_tokens) -> (text with vlmkit's
    leading-space convention, prompt tokens, generated)``; each answer starts from an empty KV cache."""
    from vlmkit.parity.llamacpp import LlamaCpp

    model, mmproj = llamacpp.gguf_pair(gguf_folder, None)
    chat = llamacpp.GGUFChat(model)
    with LlamaCpp(model, mmproj, n_ctx=4096, exact=False) as llm:
        def answer(question, image, max_tokens) -> tuple[str, int, int]:
            prompt = chat.render([{"role": "user", "content": question, "images": [image]}])
            run = llm.generate(prompt, [image], max_new_tokens=max_tokens)  # clears the KV cache first
            buf, pieces = ctypes.create_string_buffer(256), []
            for token in run.tokens:
                if token != llm.eos:
                    n = llm.lib.llama_token_to_piece(llm.vocab, token, buf, 256, 0, False)
                    pieces.append(buf.raw[:n])
            text = b"".join(pieces).decode()
            prompt_tokens = sum(len(c.ids) if c.kind == "text" else len(c.embeddings) for c in run.chunks)
            return (text[1:] if text.startswith(" ") else text), prompt_tokens, len(run.tokens)

        yield answer


def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_image_question_has_llama_cpps_own_greedy_tokens(llama_server, direct):
    answer = client(llama_server).chat.completions.create(model="tiny-llava", messages=ask("What is this?"),
                                                          temperature=0, max_tokens=12)
    text, prompt_tokens, generated = direct("What is this?", CAT, 12)
    assert answer.choices[0].message.content == text
    assert answer.usage.prompt_tokens == prompt_tokens and answer.usage.completion_tokens == generated == 12
    pieces = [c.choices[0].delta.content or "" for c in client(llama_server).chat.completions.create(
        model="tiny-llava", messages=ask("What is this?"), temperature=0, max_tokens=12, stream=True) if c.choices]
    assert "".join(pieces) == text


def test_concurrent_requests_share_the_slots_and_answer_as_alone(llama_server, direct):
    from concurrent.futures import ThreadPoolExecutor

    questions = [("Which colours?", ROCKET), ("Describe.", COFFEE), ("Who?", ASTRONAUT), ("What?", CAT)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda q: client(llama_server).chat.completions.create(
            model="tiny-llava", messages=ask(*q), temperature=0, max_tokens=16).choices[0].message.content, questions))
    assert answers == [direct(q, i, 16)[0] for q, i in questions]


@pytest.mark.parametrize("url, words", [(BROKEN_IMAGE, "truncated"),
                                        ("file:///etc/passwd", "--allowed-local-media-path")])
def test_broken_image_and_file_url_are_refused_with_400(llama_server, url, words):
    assert_image_refused(llama_server, url, words)


def test_metrics_pass_llama_servers_through(llama_server):
    text = httpx.get(llama_server.url + "/metrics", timeout=30).text
    assert "vlmkit_request_latency_seconds_bucket" in text and "llamacpp:" in text


def test_layers_on_an_rpc_server_answer_as_llama_cpp_directly(gguf_folder, direct, tmp_path):
    """The README's multi-host recipe on one machine: llama.cpp's ggml-rpc-server (built by ``make llama-server``)
    on a loopback port holds the model's layers, ``--rpc`` points llama-server at it."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    from vlmkit.serve.engines.process import free_port

    port = free_port()
    log = tmp_path / "rpc-server.log"
    with open(log, "wb") as out:
        binary = Path(sys.executable).parent / "ggml-rpc-server"
        rpc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert rpc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        # verbosity 4 makes llama-server log where each buffer lives
        server = Served(gguf_folder, "--engine", "llama.cpp", "--rpc", f"127.0.0.1:{port}", "--max-batch-size", "2",
                        "--max-tokens", "64", timeout=300, env={"LLAMA_ARG_LOG_VERBOSITY": "4"})
        try:
            answer = client(server).chat.completions.create(model="tiny-llava", messages=ask("Which colours?", ROCKET),
                                                            temperature=0, max_tokens=12)
            engine_log = Path(server.tail(200).split("(log: ", 1)[1].split(")", 1)[0]).read_text()
        finally:
            server.stop()
    finally:
        rpc.terminate()
        rpc.wait(30)
    assert answer.choices[0].message.content == direct("Which colours?", ROCKET, 12)[0]
    assert f"RPC0[127.0.0.1:{port}] model buffer size" in engine_log, engine_log[-3000:]  # its layers lived there
