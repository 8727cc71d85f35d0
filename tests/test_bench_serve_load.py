"""benchmarks/serve_load.py's verdict lines (issue 22): the ratios, their targets, and when a ratio means nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def serve_load():
    sys.path.insert(0, str(BENCHMARKS))  # the benchmark imports its sibling chat_latency as a script does
    try:
        import serve_load

        yield serve_load
    finally:
        sys.path.remove(str(BENCHMARKS))


def levels(one: float, eight: float, ttft: float = 1.0, ttft99: float = 1.5, lost: int = 0) -> list[dict]:
    return [{"clients": 1, "rps": one, "ttft": ttft, "ttft99": ttft99, "lost": 0},
            {"clients": 8, "rps": eight, "ttft": ttft, "ttft99": ttft99, "lost": lost}]


def reply(text: str, prompt: int = 600, tokens: int = 64) -> dict:
    return {"status": 200, "text": text, "prompt_tokens": prompt, "tokens": tokens}


def test_ratios_and_their_targets(serve_load):
    answers = {"vllm": reply("a cat"), "vllm-alone": reply(" a cat"), "vlmkit": reply("a cat")}
    lines = serve_load.verdicts({"vlmkit": levels(1.0, 4.6, ttft=1.0, ttft99=2.5), "vllm": levels(2.0, 5.0),
                                 "vllm-alone": levels(2.08, 5.5)}, answers)
    text = "\n".join(lines)
    assert "vllm alone and behind the front, request 999: the same answer" in text
    assert "vlmkit / vllm requests/s at 8 clients = 0.92 (target >= 0.9): met" in text
    # 2.08 / 2.0 - 1 = 4 % (met); 5.5 / 5.0 - 1 = 10 % (missed)
    assert "front over vllm at 1 client: 2.08 requests/s alone, 2.00 behind the front: overhead +4.0% " \
           "(target <= 5 %): met" in text
    assert "front over vllm at 8 clients: 5.50 requests/s alone, 5.00 behind the front: overhead +10.0% " \
           "(target <= 5 %): MISSED" in text
    assert "vlmkit at 8 clients = 4.60 x 1 client (target >= 3.5): met" in text
    assert "p99 = 2.50 x p50 (target <= 2): MISSED" in text
    assert lines[-1] == "lost: 0 (target 0): met"
    assert "llama.cpp" not in text  # neither llama.cpp row ran


def test_different_answers_make_the_overhead_meaningless(serve_load):
    answers = {"llama.cpp": reply("a cat", prompt=600), "llama.cpp-alone": reply(" a cat", prompt=601)}
    lines = serve_load.verdicts({"llama.cpp": levels(2.0, 4.0, lost=1), "llama.cpp-alone": levels(2.0, 4.0)}, answers)
    text = "\n".join(lines)
    assert "llama.cpp alone and behind the front, request 999: DIFFERENT answers (prompt 601 / 600 tokens" in text
    assert text.count("not comparable (different answers)") == 2
    assert lines[-1] == "lost: 1 (target 0): MISSED"


def test_an_engine_that_answered_nothing_misses(serve_load):
    lines = serve_load.verdicts({"vlmkit": levels(1.0, 4.0), "vllm": levels(0.0, 0.0)}, {})
    assert "vlmkit / vllm requests/s at 8 clients = nan (target >= 0.9): MISSED" in lines


@pytest.mark.parametrize("alone, front, same", [
    (" a cat", "a cat", True),  # the front drops the answer's one leading space
    ("a cat", "a cat", True),
    ("  a cat", "a cat", False),  # only one
    (" a cat", "a dog", False),
])
def test_same_answer_reads_the_text_as_the_front_sends_it(serve_load, alone, front, same):
    assert serve_load.same_answer(reply(alone), reply(front)) is same
    assert serve_load.same_answer(reply(alone, tokens=63), reply(front)) is False
    assert serve_load.same_answer({"status": "lost"}, reply(front)) is False
