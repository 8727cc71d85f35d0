"""``vlmkit serve`` on a converted LLaVA-OneVision folder: a streamed answer is the original checkpoint's."""

from __future__ import annotations

import base64
import json

from openai import OpenAI

import vlmkit

from .conftest import PHOTOS, Server

CAT = PHOTOS / "chelsea.png"  # 451 x 300: anyres_max tiles, unpadding and a newline per row
QUESTION = "What is in the picture?"


def test_a_streamed_answer_is_the_originals(tiny_llava):
    ov = tiny_llava("onevision")  # built once per run, with its `vlmkit convert --to hf --config HEADS` (exits 0)
    original, heads, converted = ov["path"], ov["heads"], ov.converted()
    # the original checkpoint, run by the reference of its forward pass
    want = vlmkit.load(original, config=json.loads(heads.read_text())).chat(
        [{"role": "user", "content": QUESTION, "images": [CAT]}], temperature=0, max_new_tokens=8)
    assert want.text

    server = Server(converted, "--max-tokens", "64")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        url = "data:image/png;base64," + base64.b64encode(CAT.read_bytes()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": QUESTION}]}]
        chunks = list(client.chat.completions.create(model="tiny-llava", messages=messages, temperature=0,
                                                     max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))
    finally:
        server.stop()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = next(c.usage for c in chunks if c.usage)
    assert text == want.text
    assert (usage.completion_tokens, usage.prompt_tokens) == (len(want.tokens), want.prompt_tokens)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [want.finish_reason]
