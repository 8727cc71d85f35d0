"""``vlmkit serve`` on the families of issue 20, original and converted: InstructBLIP (Vicuna, and Flan-T5 on the
encoder-decoder runtime) and the LLaVA-NeXT-repository rows (llama3-llava-next, llava-next-qwen).

Each model is served by the real server (the CLI a user runs, uvicorn on a free loopback port) and asked one image
question, streamed and not; the answer is the greedy answer of the original checkpoint run in-process
(``vlmkit.load(original).chat``: LAVIS's forward for InstructBLIP, the LLaVA-NeXT reference for the rows, which the
families' chat tests compare with the original code). One server at a time, a few tokens each.
"""

from __future__ import annotations

import base64
import json

import httpx2 as httpx
import pytest
from openai import OpenAI

import vlmkit

from .conftest import PHOTOS, Server

pytestmark = pytest.mark.xdist_group("serve-new-families")  # one worker builds the tiny models once

CAT = PHOTOS / "chelsea.png"
QUESTION = "What is shown in this image?"
MAX_TOKENS = 6
# (model, form served): InstructBLIP-Flan-T5's original runs the same reference as Vicuna's; its folder is what
# transformers users serve, on the runtime's encoder-decoder path
CASES = [("instructblip-vicuna", "original"), ("instructblip-vicuna", "converted"), ("instructblip-t5", "converted"),
         ("llama3", "original"), ("llama3", "converted"), ("qwen2", "original"), ("qwen2", "converted")]


def _build(name: str, tiny_instructblip, tiny_llava) -> dict:
    """The tiny original (real release layout), its conversion through the CLI (both built once per run by
    tests/conftest.py), and the original's greedy answer."""
    if name.startswith("instructblip-"):  # vlmkit convert RELEASE OUT --quiet FLAGS (exits 0)
        parts = tiny_instructblip[name.removeprefix("instructblip-")]
        original, converted, flags = parts["release"], parts["out"], parts["flags"]
        options = {"vision_tower": str(parts["eva"]), "model_base": str(parts["language_model"]),
                   "config": json.loads(parts["config"].read_text())}
    else:  # vlmkit convert ORIGINAL CONVERTED --quiet (exits 0)
        original, converted, flags, options = tiny_llava(name)["path"], tiny_llava(name).converted(), [], {}
    expected = vlmkit.load(original, **options).chat([{"role": "user", "content": QUESTION, "images": [CAT]}],
                                                     max_new_tokens=MAX_TOKENS, temperature=0)
    assert expected.text.strip(), expected  # an answer worth comparing, not an EOS at once
    return {"original": original, "converted": converted, "flags": flags, "expected": expected}


@pytest.fixture(scope="session")  # xdist interleaves other tests in the group: a module fixture would be built twice
def built(tiny_instructblip, tiny_llava):
    """name -> its models, built on first use (a -k selection builds only what it serves)."""
    cache: dict = {}

    def get(name: str) -> dict:
        if name not in cache:
            cache[name] = _build(name, tiny_instructblip, tiny_llava)
        return cache[name]

    return get


def ask(question: str) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(CAT.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


@pytest.mark.parametrize("name, form", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_served_answer_is_the_originals_greedy_answer(built, name, form):
    model = built(name)
    expected = model["expected"]
    server = Server(model[form], *(model["flags"] if form == "original" else []), "--max-tokens", "16")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="tiny-llava", messages=ask(QUESTION), temperature=0,
                                                max_tokens=MAX_TOKENS)
        assert answer.choices[0].message.content == expected.text
        assert answer.usage.completion_tokens == len(expected.tokens)
        assert answer.usage.prompt_tokens == expected.prompt_tokens
        assert answer.choices[0].finish_reason == expected.finish_reason
        chunks = list(client.chat.completions.create(model="tiny-llava", messages=ask(QUESTION), temperature=0,
                                                     max_tokens=MAX_TOKENS, stream=True,
                                                     stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        assert chunks[-1].usage.completion_tokens == len(expected.tokens)
        if (name, form) == CASES[0]:  # a generative model does not score: the error says where to go
            refused = httpx.post(server.url + "/v1/score", timeout=30, json={
                "image_url": {"url": ask(QUESTION)[0]["content"][0]["image_url"]["url"]}, "texts": ["a cat"]})
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["code"] == "not_a_scoring_model" and "/v1/chat/completions" in error["message"], error
    finally:
        server.stop()
