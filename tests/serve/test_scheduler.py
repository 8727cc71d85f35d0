"""Continuous batching: a request that arrives while another is generating joins it at the next step."""

from __future__ import annotations

import asyncio
import time

import vlmkit
from vlmkit.runtime.generation import SamplingParams
from vlmkit.serve.scheduler import Job, Scheduler

from .conftest import PHOTOS

CAT, ROCKET = PHOTOS / "chelsea.png", PHOTOS / "rocket.png"


def test_a_request_joins_the_running_batch_and_answers_as_alone(models):
    model = vlmkit.load(models["v15-hf"])
    long = ([{"role": "user", "content": "Tell a long story.", "images": [CAT]}],
            SamplingParams(max_new_tokens=300, stop=("never-appears",)))
    short = ([{"role": "user", "content": "What is this?", "images": [ROCKET]}], SamplingParams(max_new_tokens=4))
    alone = [model.chat(messages, max_new_tokens=p.max_new_tokens, stop=list(p.stop)) for messages, p in (long, short)]
    scheduler = Scheduler(model, max_batch_size=4)

    async def scenario():
        loop = asyncio.get_running_loop()
        finished: list[str] = []

        async def answer(name, job):
            while True:
                kind, payload = await job.events.get()
                if kind in ("done", "error", "cancelled"):
                    finished.append(name)
                    return payload

        first = Job(*long, loop, deadline=time.monotonic() + 120)
        scheduler.submit(first)
        while (await first.events.get())[0] != "delta":  # the long answer is being generated
            pass
        second = Job(*short, loop, deadline=time.monotonic() + 120)
        scheduler.submit(second)
        replies = await asyncio.gather(answer("long", first), answer("short", second))
        return finished, replies

    finished, (long_reply, short_reply) = asyncio.run(scenario())
    assert finished == ["short", "long"]  # static batching would have made the short one wait for the long one
    assert short_reply.tokens == alone[1].tokens and short_reply.completion_tokens == 4
    assert long_reply.tokens == alone[0].tokens and long_reply.completion_tokens == 300
