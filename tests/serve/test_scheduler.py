"""Continuous batching: a request that arrives while another is generating joins it at the next step."""

from __future__ import annotations

import asyncio
import time

import vlmkit
from vlmkit.runtime.generation import DecodeBatch, SamplingParams
from vlmkit.serve.scheduler import Job, Scheduler

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


def test_a_long_prompt_is_read_in_chunks_while_the_batch_decodes(models, monkeypatch):
    model = vlmkit.load(models["v15-hf"])
    running = ([{"role": "user", "content": "Tell a long story.", "images": [CAT]}],
               SamplingParams(max_new_tokens=300, stop=("never-appears",)))
    new = ([{"role": "user", "content": "Describe every colour you can see here.", "images": [ROCKET]}],
           SamplingParams(max_new_tokens=6))
    alone = model.chat(new[0], max_new_tokens=6)
    model.prefix_cache.clear()
    events: list[tuple[str, int]] = []  # ("read" / "step", rows decoding then)
    read, advance = DecodeBatch.read, DecodeBatch.advance
    monkeypatch.setattr(DecodeBatch, "read", lambda self: (events.append(("read", len(self.rows))), read(self))[1])
    monkeypatch.setattr(DecodeBatch, "advance",
                        lambda self, tokens: (events.append(("step", len(self.rows))), advance(self, tokens))[1])
    scheduler = Scheduler(model, max_batch_size=4, prefill_chunk=8)

    async def scenario():
        loop = asyncio.get_running_loop()
        first = Job(*running, loop, deadline=time.monotonic() + 120)
        scheduler.submit(first)
        while (await first.events.get())[0] != "delta":
            pass
        second = Job(*new, loop, deadline=time.monotonic() + 120)
        scheduler.submit(second)
        while True:
            kind, payload = await second.events.get()
            if kind in ("done", "error", "cancelled"):
                break
        first.cancelled.set()
        while (await first.events.get())[0] != "cancelled":
            pass
        return payload

    reply = asyncio.run(scenario())
    assert reply.tokens == alone.tokens  # read in chunks, the prompt gives the tokens of a whole read
    # the new prompt's reads (while one row decodes) come one per step of the running row, never two in a row
    span = [e for e in events if e != ("read", 0)]
    first, last = span.index(("read", 1)), len(span) - 1 - span[::-1].index(("read", 1))
    reads = span[first:last + 1]
    assert reads.count(("read", 1)) > 2
    assert reads == [("read", 1), ("step", 1)] * (len(reads) // 2) + [("read", 1)]
