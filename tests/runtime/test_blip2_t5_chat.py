"""BLIP-2 Flan-T5 chats: the greedy tokens of transformers' ``generate`` on the converted folder and of LAVIS's
``generate(num_beams=1)`` on the original checkpoint (vlmkit's reference of it), streamed, batched, cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vlmkit
from vlmkit.runtime.images import load_image

from ..conftest import run_cli

PHOTOS = Path(__file__).parents[1] / "fixtures" / "images"
CAT, ROCKET = PHOTOS / "chelsea.png", PHOTOS / "rocket.png"
# LAVIS's Flan-T5 question prompt (lavis/projects/blip2/eval/vqav2_zeroshot_flant5xl_eval.yaml)
LAVIS_PROMPT = "Question: {} Short answer:"
# with these weights, the second answer ends at EOS within 12 tokens and the others run to the limit
QUESTIONS = [("what is this?", CAT), ("describe the colours of the sofa", ROCKET), ("a", CAT)]


def ask(question, image):
    return [{"role": "user", "content": question, "images": [image]}]


def until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def transformers_generate(folder: Path, question: str, image: Path, max_new_tokens: int) -> tuple[list[int], str]:
    """transformers alone: ``Blip2ForConditionalGeneration.generate`` greedy; (new tokens to EOS, their text)."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    inputs = processor(images=[load_image(image)], text=[LAVIS_PROMPT.format(question)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    tokens = until_eos(out[0, 1:].tolist(), model.generation_config.eos_token_id)  # after the decoder start token
    return tokens, processor.tokenizer.decode(tokens, skip_special_tokens=True)


def lavis_generate(blip2_t5: dict, max_new_tokens: int) -> list[list[int]]:
    """vlmkit's reference of LAVIS's ``Blip2T5.generate(num_beams=1)`` on the original checkpoint, per question."""
    from vlmkit.families.blip2 import hf_output
    from vlmkit.families.blip2.checkpoint import open_original
    from vlmkit.families.blip2.reference import OriginalBlip2Model, lavis_eval_pixels
    from vlmkit.options import LoadOptions

    options = LoadOptions(**blip2_t5["options"])
    ckpt = open_original(blip2_t5["lavis"], options)
    cfg = hf_output.target_for(ckpt, options).hf_config
    reference = OriginalBlip2Model.load(ckpt, cfg.vision_config.to_dict(), cfg.qformer_config.to_dict(),
                                        cfg.text_config)
    return [reference.greedy(lavis_eval_pixels(load_image(image), reference.image_size),
                             LAVIS_PROMPT.format(question), max_new_tokens) for question, image in QUESTIONS]


@pytest.fixture(scope="module")
def converted(blip2_t5):
    return vlmkit.load(blip2_t5["hf"])


def test_converted_folder_answers_as_transformers_generate(blip2_t5, converted):
    reasons = set()
    for question, image in QUESTIONS:
        reply = converted.chat(ask(question, image), temperature=0, max_new_tokens=12)
        tokens, text = transformers_generate(blip2_t5["hf"], question, image, 12)
        assert reply.tokens == tokens and reply.text == text
        assert reply.image_tokens == 4  # the tiny model's query tokens
        streamed = "".join(converted.stream(ask(question, image), temperature=0, max_new_tokens=12))
        assert streamed == reply.text
        reasons.add(reply.finish_reason)
    assert reasons == {"stop", "length"}  # an answer that ends at EOS, and answers cut at the limit
    assert converted.template == "blip2_t5_qa"


def test_original_checkpoint_answers_as_lavis_generate(blip2_t5, converted):
    original = vlmkit.load(blip2_t5["lavis"], **blip2_t5["options"])
    expected = lavis_generate(blip2_t5, 12)
    for (question, image), tokens in zip(QUESTIONS, expected):
        assert original.chat(ask(question, image), temperature=0, max_new_tokens=12).tokens == tokens
        assert converted.chat(ask(question, image), temperature=0, max_new_tokens=12).tokens == tokens


def test_a_padded_batch_answers_as_one_by_one(converted):
    alone = [converted.chat(ask(q, image), temperature=0, max_new_tokens=12) for q, image in QUESTIONS]
    assert len({len(converted.prompt(ask(q, image))) for q, image in QUESTIONS}) == 3  # padding is needed
    converted.prefix_cache.clear()
    batched = converted.generate([ask(q, image) for q, image in QUESTIONS], temperature=0, max_new_tokens=12)
    assert [r.tokens for r in batched] == [r.tokens for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]


def test_the_same_question_reuses_the_encoder_output(converted, monkeypatch):
    encoded = []
    encode = converted.backend.encode
    monkeypatch.setattr(converted.backend, "encode", lambda embeds: encoded.append(1) or encode(embeds))
    converted.prefix_cache.clear()
    first = converted.chat(ask(*QUESTIONS[0]), temperature=0, max_new_tokens=12)
    again = converted.chat(ask(*QUESTIONS[0]), temperature=0, max_new_tokens=12)
    assert len(encoded) == 1 and again.tokens == first.tokens
    converted.chat(ask(*QUESTIONS[2]), temperature=0, max_new_tokens=12)  # a longer-or-other prompt: read anew
    assert len(encoded) == 2


def test_a_longer_prompt_keeps_the_shorter_ones_encoder_output(converted, monkeypatch):
    """P, then P extended, then P again: the third reads no encoder, and every answer is the uncached one."""
    from vlmkit.runtime.generation import Prompt, SamplingParams, batch_stream

    short = converted.prompt(ask(*QUESTIONS[0]))
    extra = converted.prompt(ask(*QUESTIONS[1])).ids[-3:]  # a few more words after the same prompt
    long = Prompt(short.ids + extra, short.keys + extra, short.images)
    params = [SamplingParams(temperature=0, max_new_tokens=12)]

    def answer(prompt, cache):
        return [step[0] for step in batch_stream(converted.backend, [prompt], params, cache=cache)]

    uncached = [answer(p, None) for p in (short, long, short)]
    encoded = []
    encode = converted.backend.encode
    monkeypatch.setattr(converted.backend, "encode", lambda embeds: encoded.append(1) or encode(embeds))
    converted.prefix_cache.clear()
    cached = [answer(p, converted.prefix_cache) for p in (short, long, short)]
    assert len(encoded) == 2  # the short prompt and the long one; the short one again reads its own entry
    assert cached == uncached and cached[0] != cached[1]


def test_cli_chat_on_the_converted_folder_and_the_lavis_checkpoint(blip2_t5):
    question, image = QUESTIONS[0]
    _, text = transformers_generate(blip2_t5["hf"], question, image, 12)
    for model, extra in ((blip2_t5["hf"], []), (blip2_t5["lavis"], blip2_t5["args"])):
        r = run_cli("chat", model, "--image", image, "--prompt", question, "--temperature", "0",
                    "--max-new-tokens", "12", *extra)
        assert r.code == 0, r.err
        assert r.out.strip() == text.strip()


def test_an_original_checkpoint_in_half_precision_is_refused_by_name(blip2_t5):
    r = run_cli("chat", blip2_t5["lavis"], "--image", CAT, "--prompt", "what is this?", "--dtype", "float16",
                *blip2_t5["args"])
    assert r.code != 0 and r.out == ""
    assert "blip2_pretrained_flant5xl.pth" in r.err and "float32" in r.err and "Traceback" not in r.err
