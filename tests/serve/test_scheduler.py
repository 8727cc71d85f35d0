"""Continuous batching: a request that arrives while another is generating joins it at the next step."""

from __future__ import annotations

import vlmkit
from vlmkit.runtime.generation import SamplingParams

from .conftest import PHOTOS, join_running_batch

CAT, ROCKET = PHOTOS / "chelsea.png", PHOTOS / "rocket.png"


def test_a_request_joins_the_running_batch_and_answers_as_alone(models):
    model = vlmkit.load(models["v15-hf"])
    long = ([{"role": "user", "content": "Tell a long story.", "images": [CAT]}],
            SamplingParams(max_new_tokens=300, stop=("never-appears",)))
    short = ([{"role": "user", "content": "What is this?", "images": [ROCKET]}], SamplingParams(max_new_tokens=4))
    alone = [model.chat(messages, max_new_tokens=p.max_new_tokens, stop=list(p.stop)) for messages, p in (long, short)]
    finished, long_reply, short_reply = join_running_batch(model, long, short)
    assert finished == ["short", "long"]  # static batching would have made the short one wait for the long one
    assert short_reply.tokens == alone[1].tokens and short_reply.completion_tokens == 4
    assert long_reply.tokens == alone[0].tokens and long_reply.completion_tokens == 300
