"""The batch's KV cache is written in place; rows join and leave it; long prompts are read in chunks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.runtime import generation
from vlmkit.runtime.generation import DecodeBatch, SamplingParams, stream_tokens

PHOTOS = Path(__file__).parents[1] / "fixtures" / "images"
CAT, ROCKET, COFFEE = PHOTOS / "chelsea.png", PHOTOS / "rocket.png", PHOTOS / "coffee.png"


@pytest.fixture(scope="module")
def model(models):
    return vlmkit.load(models["v15-hf"])


def prompt(model, text, image=CAT):
    return model.prompt([{"role": "user", "content": text, "images": [image]}])


def alone(model, p, params):
    """The tokens of ``p`` generated on its own, through no batch and no cache."""
    return list(stream_tokens(model.backend, p, params))


def test_a_decode_step_concatenates_no_cache(model, monkeypatch):
    batch = DecodeBatch(model.backend)
    prompts = [prompt(model, "What is this?"), prompt(model, "Which colours do you see here?", ROCKET)]
    for p in prompts:
        batch.add(p, SamplingParams(max_new_tokens=32))
    config = model.backend.model.config.text_config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    one_layer = len(prompts) * heads * max(len(p) for p in prompts) * head_dim  # one layer's keys, at the least
    sizes = []
    cat = torch.cat

    def counting(tensors, *args, **kwargs):
        out = cat(tensors, *args, **kwargs)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch, "cat", counting)
    for _ in range(4):
        batch.advance(batch.pick())
    assert max(sizes, default=0) < one_layer  # a DynamicCache concatenates every layer's keys and values each step


def test_rows_leave_and_join_at_any_step_and_answer_as_alone(model, monkeypatch):
    monkeypatch.setattr(generation, "BLOCK", 3)  # the cache runs out of columns every few steps
    eos = model.backend.eos_token_ids
    plan = [(prompt(model, "What is this?"), 3), (prompt(model, "Describe.", ROCKET), 12),
            (prompt(model, "Which colours do you see here?", COFFEE), 6)]
    late = (prompt(model, "Tell me everything you see in this picture, in detail.", ROCKET), 7)  # joins later
    batch = DecodeBatch(model.backend)
    got = {batch.add(p, SamplingParams(max_new_tokens=n)): [] for p, n in plan}
    order = list(got)
    while batch.rows:
        if len(order) == 3 and len(batch.rows) == 2:  # the first row has left: its slot is taken
            row = batch.add(late[0], SamplingParams(max_new_tokens=late[1]))
            got[row] = []
            order.append(row)
        tokens = batch.pick()
        done = []
        for row, token in zip(batch.rows, tokens):
            got[row].append(token)
            if token in eos or row.left <= 1:
                done.append(row)
        left = [t for row, t in zip(batch.rows, tokens) if row not in done]
        batch.remove(done)
        if batch.rows:
            batch.advance(left)
    expected = [alone(model, p, SamplingParams(max_new_tokens=n)) for p, n in plan + [late]]
    assert len(order) == 4 and [got[r] for r in order] == expected


def test_a_prompt_read_in_chunks_gives_the_tokens_of_a_whole_read(model):
    p = prompt(model, "Which colours do you see here?", ROCKET)
    params = SamplingParams(max_new_tokens=8)
    read: list[int] = []
    forward = model.backend.forward

    def counting(embeds, *args):
        read.append(embeds.shape[1])
        return forward(embeds, *args)

    batch = DecodeBatch(model.backend)
    model.backend.forward = counting
    try:
        row = batch.begin(p, params, chunk=5)  # chunks that cut through the image's positions
        while batch.reading:
            batch.read()
    finally:
        model.backend.forward = forward
    assert read == [5] * (len(p) // 5) + ([len(p) % 5] if len(p) % 5 else [])
    assert len(read) == math.ceil(len(p) / 5) > 1 and batch.rows == [row]
    tokens = []
    while batch.rows:
        tokens.append(batch.pick()[0])
        if tokens[-1] in model.backend.eos_token_ids or row.left <= 1:
            batch.remove([row])
        else:
            batch.advance(tokens[-1:])
    assert tokens == alone(model, p, params)
