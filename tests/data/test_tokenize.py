"""Ids and labels of short conversations, written by hand from the rules of the ORIGINAL training code
(haotian-liu/LLaVA llava/train/train.py at its latest commit), for every template it has.

How the expectations are made: the prompt is written out literally as ``Conversation.get_prompt()`` lays it
out; the ids of the whole prompt are the tokenizer's (the original tokenises the same text with the same
tokenizer); WHICH positions are trained is derived by hand from the preprocess function's arithmetic (see the
comment of each test) and written as the literal list of trained pieces, or as literal ids for the shortest
cases. Nothing here is copied from vlmkit's output.
"""

from __future__ import annotations

import pytest

from vlmkit.data.tokenize import IGNORE_INDEX, RecordError, tokenize
from vlmkit.runtime.tokens import tokenizer_image_token

from .conftest import record

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")
LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")
IMAGE = ("cat.png",)


def trained(example, encoder) -> list[str]:
    """The pieces whose label is their id (and check that every label is either its id or -100)."""
    pieces = encoder.pieces(example.input_ids)
    for token, label in zip(example.input_ids, example.labels):
        assert label in (token, IGNORE_INDEX)
    return [p for p, label in zip(pieces, example.labels) if label != IGNORE_INDEX]


def tii(prompt, encoder):
    return tokenizer_image_token(prompt, encoder)


# --------------------------------------------------------------------------------------------- plain
def test_plain_literal_ids(llama):
    # preprocess_plain: conversation = "<image>" + answer + "\n"; the human text is thrown away.
    # tokenizer_image_token: [BOS] + [-200] + ids of "A cat.\n" without their BOS = ▁A ▁cat . <0x0A>
    # labels: the first len(tokenizer_image_token("<image>")) = 2 positions masked.
    ex = tokenize(record("<image>\nDescribe the image briefly.", "A cat.", images=IMAGE), "plain", llama,
                  max_length=2048)
    assert ex.input_ids == [1, -200, 319, 6635, 29889, 13]
    assert ex.labels == [-100, -100, 319, 6635, 29889, 13]


def test_plain_chinese_caption_literal_ids(llama):
    # "一只猫。\n": ▁ 一 只 (猫 by byte fallback: <0xE7><0x8C><0xAB>) 。 <0x0A>; the instruction is dropped
    ex = tokenize(record("<image>\n为该图片生成标注。", "一只猫。", images=IMAGE), "plain", llama, max_length=2048)
    assert ex.input_ids == [1, -200, 29871, 30287, 31557, 234, 143, 174, 30267, 13]
    assert ex.labels == [-100, -100, 29871, 30287, 31557, 234, 143, 174, 30267, 13]


def test_plain_placeholder_after_the_prompt_is_the_same(llama):
    before = tokenize(record("<image>\nWhat?", "A cat.", images=IMAGE), "plain", llama, max_length=2048)
    after = tokenize(record("What?\n<image>", "A cat.", images=IMAGE), "plain", llama, max_length=2048)
    assert before == after


@pytest.mark.parametrize("texts,reason", [
    (("<image>\nA?", "B.", "C?", "D."), "exactly one human and one gpt turn"),
    (("A?", "B."), "needs <image>"),
])
def test_plain_refuses_what_the_original_asserts(llama, texts, reason):
    images = IMAGE if len(texts) == 4 else ()
    with pytest.raises(RecordError, match=reason) as e:
        tokenize(record(*texts, images=images), "plain", llama, max_length=2048)
    assert e.value.template == "plain" and e.value.record_id == "r1"


# --------------------------------------------------------------------------------------------- v1
def test_v1_single_turn_text_only(llama):
    # conversation "SYSTEM USER: Hi ASSISTANT: Hello</s>"; rounds = split("</s>") = [round, ""].
    # round_len = len(tok(round)) = BOS + pieces = the pieces + "</s>" in the whole prompt;
    # instruction_len = len(tok("SYSTEM USER: Hi ASSISTANT: ")) - 2: BOS and the trailing "▁" of ": " go.
    # So everything through "ASSISTANT:" is masked (BOS by cur_len = 1), "▁Hello" and "</s>" are trained.
    ex = tokenize(record("Hi", "Hello"), "vicuna_v1", llama, max_length=2048)
    assert ex.input_ids == llama.encode(f"{VICUNA_V1_SYSTEM} USER: Hi ASSISTANT: Hello</s>")
    assert trained(ex, llama) == ["▁Hello", "</s>"]
    assert ex.labels[:-2] == [IGNORE_INDEX] * (len(ex.input_ids) - 2)


@pytest.mark.parametrize("fixture", ["llama", "llama_legacy"])
def test_v1_multi_turn_with_image(request, fixture):
    # llava_v1: "SYSTEM USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Sure? ASSISTANT: Yes.</s>"
    # Round 2 standalone starts "▁US ER" (2 tokens); in the whole prompt after "</s>" a NON-legacy tokenizer
    # writes "USER" (1 token): the i != 0 correction (-1 on both lengths) makes the counts meet. A legacy
    # tokenizer writes "▁US ER" in both places and gets no correction. Trained either way: each answer and
    # its "</s>".
    enc = request.getfixturevalue(fixture)
    ex = tokenize(record("<image>\nWhat is it?", "A cat.", "Sure?", "Yes.", images=IMAGE), "llava_v1", enc,
                  max_length=2048)
    prompt = f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Sure? ASSISTANT: Yes.</s>"
    assert ex.input_ids == tii(prompt, enc)
    assert ex.input_ids.count(-200) == 1
    assert trained(ex, enc) == ["▁A", "▁cat", ".", "</s>", "▁Yes", ".", "</s>"]


def test_v1_non_legacy_tokenizer_pieces_behind_the_correction(llama, llama_legacy):
    # the fact the -1 rests on, shown on the tokenizer itself
    assert llama.pieces(llama.encode("A.</s>USER:")[-3:]) == ["</s>", "USER", ":"]
    assert llama_legacy.pieces(llama_legacy.encode("A.</s>USER:")[-4:]) == ["</s>", "▁US", "ER", ":"]


def test_v1_image_after_the_question_is_moved_to_the_front(llama):
    # preprocess_multimodal: "<image>\n" + text.replace("<image>", "").strip()
    before = tokenize(record("<image>\nWhat is it?", "A cat.", images=IMAGE), "llava_v1", llama, max_length=2048)
    after = tokenize(record("What is it?  <image>", "A cat.", images=IMAGE), "llava_v1", llama, max_length=2048)
    doubled = tokenize(record("<image> What is it? <image>", "A cat.", images=IMAGE), "llava_v1", llama,
                       max_length=2048)
    assert before.input_ids == after.input_ids == doubled.input_ids
    assert before.labels == after.labels == doubled.labels


def test_v1_chinese_answer_trains_the_space_piece(llama):
    # "ASSISTANT: 一只猫。</s>": after ":" the answer starts with a lone "▁" (no "▁一" piece); the -2 drops
    # the instruction's own trailing "▁", so that "▁" is the first trained token.
    ex = tokenize(record("<image>\n为该图片生成标注。", "一只猫。", images=IMAGE), "llava_v1", llama, max_length=2048)
    assert trained(ex, llama) == ["▁", "一", "只", "<0xE7>", "<0x8C>", "<0xAB>", "。", "</s>"]


def test_v1_answer_holding_the_separator_is_a_mismatch(llama):
    # The answer contains " ASSISTANT: ", so round 1 splits into 3 parts: the loop breaks with cur_len = 1,
    # the sequence has more tokens: the original masks every label ("tokenization mismatch: 1 vs. N").
    rec = record("Say it.", "USER: hi ASSISTANT: done")
    n = len(llama.encode(f"{VICUNA_V1_SYSTEM} USER: Say it. ASSISTANT: USER: hi ASSISTANT: done</s>"))
    with pytest.raises(RecordError, match=rf"tokenization mismatch: 1 vs\. {n}") as e:
        tokenize(rec, "vicuna_v1", llama, max_length=2048)
    assert e.value.code == "mismatch" and "record 'r1'" in str(e.value) and "'vicuna_v1'" in str(e.value)


def test_v1_empty_answer_merges_two_rounds(llama):
    # get_prompt writes an empty answer as "ASSISTANT:" (no space, no "</s>"), so the prompt has ONE round,
    # "... USER: A? ASSISTANT:USER: B? ASSISTANT: C.", which splits at " ASSISTANT: " into exactly two parts:
    # the original trains "▁C . </s>" and masks the rest, silently (`data check` reports the empty turn).
    ex = tokenize(record("A?", "", "B?", "C."), "vicuna_v1", llama, max_length=2048)
    assert ex.input_ids == llama.encode(f"{VICUNA_V1_SYSTEM} USER: A? ASSISTANT:USER: B? ASSISTANT: C.</s>")
    assert trained(ex, llama) == ["▁C", ".", "</s>"]


def test_v1_text_only_truncation(llama):
    # Text-only: tokenizer(..., truncation=True, max_length) cuts the ids; cur_len >= max_length skips the check.
    full = llama.encode(f"{VICUNA_V1_SYSTEM} USER: Hi ASSISTANT: Hello</s>")
    ex = tokenize(record("Hi", "Hello"), "vicuna_v1", llama, max_length=len(full) - 1)
    assert ex.input_ids == full[:-1] and trained(ex, llama) == ["▁Hello"] and ex.length == len(full)
    with pytest.raises(RecordError, match="every label is masked") as e:
        tokenize(record("Hi", "Hello"), "vicuna_v1", llama, max_length=len(full) - 2)
    assert e.value.code == "masked"


def test_v1_image_features_push_the_answer_out(llama):
    # With an image, the ids are not cut by the tokenizer; the model inserts the features and cuts the
    # sequence at max_length: an answer starting at id position k sits at k + (features - 1).
    rec = record("<image>\nWhat is it?", "A cat.", images=IMAGE)
    ids = tokenize(rec, "llava_v1", llama, max_length=2048).input_ids
    k = len(tii(f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:", llama))  # first answer position
    assert tokenize(rec, "llava_v1", llama, max_length=k + 16, image_tokens=16).trained == len(ids) - k
    with pytest.raises(RecordError, match="once the image's 16 features are inserted"):
        tokenize(rec, "llava_v1", llama, max_length=k + 15, image_tokens=16)


# --------------------------------------------------------------------------------------------- llama_2
def test_llava_llama_2_multi_turn(llama):
    # "[INST] <<SYS>>\nSYS\n<</SYS>>\n\n<image>\nWhat is it? [/INST] A cat. </s><s>[INST] Sure? [/INST] Yes. </s>"
    # sep "[/INST] "; round_len = tok(round) incl. BOS; instruction - 2 (BOS and the "▁" of "] ").
    # The space before "</s>" is its own "▁" token, inside the round: trained with the answer and "</s>".
    # Round 2 starts with the literal "<s>" (the BOS id), masked with its instruction.
    ex = tokenize(record("<image>\nWhat is it?", "A cat.", "Sure?", "Yes.", images=IMAGE), "llava_llama_2", llama,
                  max_length=2048)
    prompt = (f"[INST] <<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat is it? [/INST] A cat. </s>"
              "<s>[INST] Sure? [/INST] Yes. </s>")
    assert ex.input_ids == tii(prompt, llama)
    assert trained(ex, llama) == ["▁A", "▁cat", ".", "▁", "</s>", "▁Yes", ".", "▁", "</s>"]
    assert ex.input_ids.count(1) == 2  # BOS, and the "<s>" of round 2


def test_llama_2_single_turn_text_only(llama):
    ex = tokenize(record("Hi", "Hello"), "llama_2", llama, max_length=2048)
    assert trained(ex, llama) == ["▁Hello", "▁", "</s>"]
    assert ex.input_ids[-3:] == [15043, 29871, 2]  # ▁Hello ▁ </s>


def test_mistral_instruct(mistral):
    # sep "" and no system: "[INST] <image>\nWhat is it? [/INST] A cat. </s>[INST] Sure? [/INST] Yes. </s>"
    # Mistral's tokenizer is legacy: the text after "</s>" starts with "▁[" in context and standalone.
    ex = tokenize(record("<image>\nWhat is it?", "A cat.", "Sure?", "Yes.", images=IMAGE), "mistral_instruct",
                  mistral, max_length=2048)
    assert ex.input_ids == tii("[INST] <image>\nWhat is it? [/INST] A cat. </s>[INST] Sure? [/INST] Yes. </s>",
                               mistral)
    assert trained(ex, mistral) == ["▁A", "▁cat", ".", "▁", "</s>", "▁Yes", ".", "▁", "</s>"]


def test_llama_2_empty_first_question_is_refused(llama):
    # get_prompt asserts "first message should not be none"
    with pytest.raises(RecordError, match="cannot render"):
        tokenize(record("", "Hello"), "llama_2", llama, max_length=2048)


# --------------------------------------------------------------------------------------------- mpt / chatml
CHATML_PROMPT = ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nWhat is it?<|im_end|>"
                 "<|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nSure?<|im_end|>"
                 "<|im_start|>assistant\nYes.<|im_end|>")


def test_chatml_two_rounds_bos_legacy(chatml):
    # split("<|im_end|>") regrouped as [system+user+assistant] [user+assistant] ..., cur_len starts at 0.
    # Round 1: round_len = BOS + its pieces, ending before its "<|im_end|>" (the BOS stands in for it);
    #   instruction = tok("...<|im_start|>assistant\n") - 1: BOS + pieces up to "\n" minus one, so the "\n"
    #   after "assistant" is NOT masked.
    # Round 2 (i = 1, legacy tokenizer): +1 on both: the instruction mask covers round 1's "<|im_end|>" up to
    #   and including this round's "\n"; the round now reaches the final "<|im_end|>", which is trained.
    enc = chatml(True, True)
    ex = tokenize(record("What is it?", "A cat.", "Sure?", "Yes."), "chatml_direct", enc, max_length=2048)
    assert ex.input_ids == enc.encode(CHATML_PROMPT)
    assert trained(ex, enc) == ["<0x0A>", "A", "▁cat", ".", "Yes", ".", "<|im_end|>"]


def test_chatml_with_image_trains_the_same_pieces(chatml):
    enc = chatml(True, True)
    ex = tokenize(record("<image>\nWhat is it?", "A cat.", "Sure?", "Yes.", images=IMAGE), "chatml_direct", enc,
                  max_length=2048)
    assert ex.input_ids == tii(CHATML_PROMPT.replace("user\nWhat", "user\n<image>\nWhat"), enc)
    assert trained(ex, enc) == ["<0x0A>", "A", "▁cat", ".", "Yes", ".", "<|im_end|>"]


@pytest.mark.parametrize("add_bos,legacy,turns,cur,total", [
    # one round: the final "<|im_end|>" is never counted: 23 vs 24 (BOS + 22 pieces + "<|im_end|>")
    (True, True, ("What is it?", "A cat."), 23, 24),
    # non-legacy: no +1 for round 2, so round 2 stops one short of the end: 38 vs 39 (without the "▁" of a
    # legacy tokenizer, "assistant" is two pieces, "ass istant": BOS + 38 pieces)
    (True, False, ("What is it?", "A cat.", "Sure?", "Yes."), 38, 39),
    # no BOS (Yi's tokenizer): nothing stands in for round 1's "<|im_end|>": 35 vs 36 (36 legacy pieces)
    (False, True, ("What is it?", "A cat.", "Sure?", "Yes."), 35, 36),
])
def test_chatml_mismatches_of_the_original(chatml, add_bos, legacy, turns, cur, total):
    # haotian-liu/LLaVA#1706: LLaVA-1.6-34B fine-tuning with chatml_direct: every sample masked, loss 0.
    with pytest.raises(RecordError, match=rf"tokenization mismatch: {cur} vs\. {total}") as e:
        tokenize(record(*turns), "chatml_direct", chatml(add_bos, legacy), max_length=2048)
    assert e.value.code == "mismatch"


def test_mpt_template_uses_its_own_system_prompt(chatml):
    enc = chatml(True, True)
    ex = tokenize(record("What is it?", "A cat.", "Sure?", "Yes."), "mpt", enc, max_length=2048)
    system = ("A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest "
              "answers.")
    assert ex.input_ids == enc.encode(CHATML_PROMPT.replace("Answer the questions.", system))
    assert trained(ex, enc) == ["<0x0A>", "A", "▁cat", ".", "Yes", ".", "<|im_end|>"]


# --------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("texts,images,match", [
    # the model takes one image's features per -200: a second placeholder turn runs the batch out of them
    (("<image>\nA?", "B.", "<image>\nC?", "D."), ("x.png",), r"<image> in turns \[1, 3\] for one image"),
    (("<image>\nA?", "B."), ("x.png", "y.png"), "one image per record"),
    (("<image>\nA?", "<image> B."), ("x.png",), r"<image> in turns \[1, 2\] for one image"),
])
def test_image_placeholders(llama, texts, images, match):
    # (what the original trains on in its own way: tests/data/test_original_records.py)
    with pytest.raises(RecordError, match=match) as e:
        tokenize(record(*texts, images=images), "llava_v1", llama, max_length=2048)
    assert e.value.code == "images"


def test_roles(llama):
    rec = record("Hi", "Hello", "More")
    rec.turns[2].role = "assistant"
    with pytest.raises(RecordError, match="turn 3 is 'assistant' where 'user' is due"):
        tokenize(rec, "llava_v1", llama, max_length=2048)


def test_unk_in_text_is_refused(llama):
    # pad_token = unk_token: the model's attention mask drops every <unk> from the sequence
    with pytest.raises(RecordError) as e:
        tokenize(record("<image>\nA?", "an <unk> token", images=IMAGE), "plain", llama, max_length=2048)
    assert e.value.code == "unk"


def test_unsupported_template(llama):
    with pytest.raises(RecordError, match="no training preprocessing for template 'llava_v0'"):
        tokenize(record("Hi", "Hello"), "llava_v0", llama, max_length=2048)
