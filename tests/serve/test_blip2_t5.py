"""``vlmkit serve`` on a BLIP-2 Flan-T5: answers, streams and continuous batching as for the decoder-only models."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

import vlmkit
from vlmkit.runtime.generation import SamplingParams

from ..runtime.test_blip2_t5_chat import QUESTIONS, transformers_generate
from .conftest import Server, join_running_batch


def ask(question, image):
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def t5_server(blip2_t5):
    s = Server(blip2_t5["hf"], "--max-batch-size", "4", "--max-tokens", "64")
    yield OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    s.stop()


def test_answers_and_streams_as_transformers_generate(blip2_t5, t5_server):
    for question, image in QUESTIONS:
        tokens, text = transformers_generate(blip2_t5["hf"], question, image, 12)
        answer = t5_server.chat.completions.create(model="tiny-llava", messages=ask(question, image),
                                                   temperature=0, max_tokens=12)
        assert answer.choices[0].message.content == text
        assert answer.usage.completion_tokens == len(tokens)
        assert answer.choices[0].finish_reason == ("stop" if len(tokens) < 12 else "length")
        stream = t5_server.chat.completions.create(model="tiny-llava", messages=ask(question, image),
                                                   temperature=0, max_tokens=12, stream=True)
        pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == text


def test_concurrent_requests_answer_as_one_by_one(t5_server):
    def one(item):
        return t5_server.chat.completions.create(model="tiny-llava", messages=ask(*item), temperature=0,
                                                 max_tokens=12).choices[0].message.content

    sequential = [one(item) for item in QUESTIONS]
    barrier = threading.Barrier(len(QUESTIONS))

    def together(item):
        barrier.wait()
        return one(item)

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        assert list(pool.map(together, QUESTIONS)) == sequential


def test_a_request_joins_the_running_batch_and_answers_as_alone(blip2_t5):
    model = vlmkit.load(blip2_t5["hf"])
    (long_q, long_image), (short_q, short_image) = QUESTIONS[2], QUESTIONS[1]
    long = ([{"role": "user", "content": long_q, "images": [long_image]}], SamplingParams(max_new_tokens=60))
    short = ([{"role": "user", "content": short_q, "images": [short_image]}], SamplingParams(max_new_tokens=12))
    alone = [model.chat(messages, max_new_tokens=p.max_new_tokens, temperature=0) for messages, p in (long, short)]
    assert alone[0].finish_reason == "length" and alone[1].finish_reason == "stop"
    finished, long_reply, short_reply = join_running_batch(model, long, short)
    assert finished == ["short", "long"]  # it joined the running batch instead of waiting for it
    assert short_reply.tokens == alone[1].tokens and long_reply.tokens == alone[0].tokens
