"""Records the ORIGINAL training (haotian-liu/LLaVA llava/train/train.py) trains on in its own way.

vlmkit trains each of them as the original does; ``strict=True`` (``--strict``) refuses them. The expected ids
and labels are derived by hand from the original's code, and the tokenizer is the real one:

* ``__getitem__``: ``preprocess_multimodal`` runs on every turn of a record with an ``'image'`` (answers too):
  ``"<image>\\n" + value.replace("<image>", "").strip()``; a text-only record is not touched.
* ``preprocess_v1`` / ``_llama_2`` / ``_mpt``: ``if roles[source[0]["from"]] != conv.roles[0]: source =
  source[1:]``, then ``assert role == conv.roles[j % 2]``; ``tokenizer_image_token`` when ``has_image`` (the
  record has an ``'image'``), ``tokenizer()`` otherwise (a literal "<image>" is then text).
* ``preprocess_plain`` reads no roles: ``"<image>" + source[1]['value'] + "\\n"`` through
  ``tokenizer_image_token``, image or not.
* ``prepare_inputs_labels_for_multimodal``: a sequence without -200 takes its image's features as ``[0:0]``
  (the image is never seen); each -200 takes the next image's features.
"""

from __future__ import annotations

import pytest

from vlmkit.data.tokenize import IGNORE_INDEX, RecordError, tokenize
from vlmkit.runtime.tokens import tokenizer_image_token

from .conftest import record
from .test_tokenize import LLAVA_LLAMA_2_SYSTEM, LLAVA_V1_SYSTEM, trained

IMAGE = ("cat.png",)
IMAGE_ID = -200  # IMAGE_TOKEN_INDEX of llava/constants.py


def turns(*pairs, images=()):
    """A record from (role, text) pairs."""
    rec = record(*(text for _, text in pairs), images=images)
    for turn, (role, _) in zip(rec.turns, pairs):
        turn.role = role
    return rec


def tii(prompt, encoder):
    return tokenizer_image_token(prompt, encoder)


def refused(rec, template, encoder, code):
    with pytest.raises(RecordError) as e:
        tokenize(rec, template, encoder, max_length=2048, strict=True)
    assert e.value.code == code
    assert "record 'r1'" in str(e.value) and "--strict" in str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------------------------- leading gpt turn
@pytest.mark.parametrize("template,prompt,answer", [
    ("llava_v1", f"{LLAVA_V1_SYSTEM} USER: Hi ASSISTANT: Hello</s>", ["▁Hello", "</s>"]),
    ("llava_llama_2", f"[INST] <<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\nHi [/INST] Hello </s>",
     ["▁Hello", "▁", "</s>"]),
])
def test_leading_gpt_turn_is_dropped(llama, template, prompt, answer):
    # source = source[1:]: the prompt is the one of the human / gpt turns after it
    rec = turns(("assistant", "Welcome!"), ("user", "Hi"), ("assistant", "Hello"))
    ex = tokenize(rec, template, llama, max_length=2048)
    assert ex.input_ids == llama.encode(prompt)
    assert trained(ex, llama) == answer
    assert "drops it" in refused(rec, template, llama, "leading_gpt")


def test_leading_gpt_turn_with_the_placeholder_leaves_the_image_unseen(llama):
    # preprocess_multimodal first (the placeholder stays in turn 1), then turn 1 is dropped: no -200 in the ids
    rec = turns(("assistant", "Look: <image>"), ("user", "What is it?"), ("assistant", "A cat."), images=IMAGE)
    ex = tokenize(rec, "llava_v1", llama, max_length=2048)
    assert ex.input_ids == tii(f"{LLAVA_V1_SYSTEM} USER: What is it? ASSISTANT: A cat.</s>", llama)
    assert IMAGE_ID not in ex.input_ids and ex.marks == 0
    assert trained(ex, llama) == ["▁A", "▁cat", ".", "</s>"]


@pytest.mark.parametrize("roles,message", [
    (("user", "user", "assistant"), "turn 2 is 'user' where 'assistant' is due"),  # two human turns in a row
    (("assistant", "assistant", "user", "assistant"), "turn 2 is 'assistant' where 'user' is due"),  # after the drop
    (("user", "assistant", "assistant"), "turn 3 is 'assistant' where 'user' is due"),
])
def test_roles_the_original_asserts_on_are_refused(llama, roles, message):
    rec = turns(*((r, f"text {j}") for j, r in enumerate(roles)))
    with pytest.raises(RecordError, match=message) as e:
        tokenize(rec, "llava_v1", llama, max_length=2048)
    assert e.value.code == "roles" and "record 'r1'" in str(e.value) and "asserts" in str(e.value)


def test_an_unknown_role_is_refused(llama):
    rec = turns(("narrator", "Once"), ("assistant", "Hi"))
    with pytest.raises(RecordError, match="role 'narrator'.*KeyError") as e:
        tokenize(rec, "llava_v1", llama, max_length=2048)
    assert e.value.code == "roles"


# --------------------------------------------------------------------------------------------- <image> in an answer
@pytest.mark.parametrize("answer", ["<image>\nA cat.", "A cat. <image>", "A cat.\n<image>"])
def test_placeholder_in_an_answer_moves_to_its_front(llama, answer):
    # the answer becomes "<image>\nA cat." (the turn's text without placeholders, stripped, after "<image>\n").
    # Whole prompt "SYSTEM USER: What is it? ASSISTANT: <image>\nA cat.</s>" through tokenizer_image_token:
    # chunk 1 ends with the "▁" of "ASSISTANT: ", then -200, then chunk 2 "\nA cat.</s>" without its BOS:
    # "▁ <0x0A> A ▁cat . </s>". instruction_len = len(tii("SYSTEM USER: What is it? ASSISTANT: ")) - 2 masks BOS
    # + everything through ":", so "▁", the image position and the whole answer carry labels (the label of the
    # -200 is -200: targets = input_ids.clone(); the model drops it when it inserts the features).
    rec = record("What is it?", answer, images=IMAGE)
    ex = tokenize(rec, "llava_v1", llama, max_length=2048)
    assert ex.input_ids == tii(f"{LLAVA_V1_SYSTEM} USER: What is it? ASSISTANT: <image>\nA cat.</s>", llama)
    assert trained(ex, llama) == ["▁", "<image>", "▁", "<0x0A>", "A", "▁cat", ".", "</s>"]
    assert ex.labels[ex.input_ids.index(IMAGE_ID)] == IMAGE_ID
    assert ex.marks == 1
    assert "moves it to the front of that answer" in refused(rec, "llava_v1", llama, "image_in_answer")


def test_placeholder_in_a_question_and_an_answer_is_refused(llama):
    # two -200 for one image: the model takes the next record's features, and the batch runs out of them
    with pytest.raises(RecordError, match=r"<image> in turns \[1, 2\] for one image") as e:
        tokenize(record("<image>\nWhat?", "<image> A cat.", images=IMAGE), "llava_v1", llama, max_length=2048)
    assert e.value.code == "images"


# --------------------------------------------------------------------------------------------- image, no placeholder
def test_image_without_placeholder_trains_as_text(llama):
    # has_image: tokenizer_image_token of a prompt without "<image>" = tokenizer(prompt) (one chunk, its BOS
    # kept); no -200, so the model concatenates the image's features as [0:0]: the record is text only.
    rec = record("What is it?", "A cat.", images=IMAGE)
    ex = tokenize(rec, "llava_v1", llama, max_length=2048, image_tokens=576)
    prompt = f"{LLAVA_V1_SYSTEM} USER: What is it? ASSISTANT: A cat.</s>"
    assert ex.input_ids == llama.encode(prompt)
    assert trained(ex, llama) == ["▁A", "▁cat", ".", "</s>"]
    assert ex.images == IMAGE and ex.marks == 0
    assert ex.expanded_length == len(ex.input_ids)  # no features are inserted
    assert "never sees it" in refused(rec, "llava_v1", llama, "image_unplaced")


# --------------------------------------------------------------------------------------------- <image> without image
@pytest.mark.parametrize("question", ["<image>\nWhat is it?", "What is it? <image>"])
def test_placeholder_in_a_text_only_record_is_text(llama, question):
    # no 'image': no preprocess_multimodal (nothing moves) and tokenizer(), which has no "<image>" token
    rec = record(question, "A cat.")
    ex = tokenize(rec, "llava_v1", llama, max_length=2048)
    assert ex.input_ids == llama.encode(f"{LLAVA_V1_SYSTEM} USER: {question} ASSISTANT: A cat.</s>")
    pieces = llama.pieces(ex.input_ids)
    assert IMAGE_ID not in ex.input_ids and "image" in pieces and ">" in pieces
    assert trained(ex, llama) == ["▁A", "▁cat", ".", "</s>"]
    assert "as the text '<image>'" in refused(rec, "llava_v1", llama, "text_placeholder")


def test_plain_placeholder_in_a_text_only_record_takes_the_dummy_image(llama):
    # preprocess_plain uses tokenizer_image_token whatever the record: "<image>A cat.\n" -> BOS, -200, ▁A ▁cat . \n;
    # the first len(tii("<image>")) = 2 labels masked. The dataset gives a text-only record a zero image, whose
    # features the model inserts at the -200.
    rec = record("<image>\nDescribe.", "A cat.")
    ex = tokenize(rec, "plain", llama, max_length=2048, image_tokens=576)
    assert ex.input_ids == [1, -200, 319, 6635, 29889, 13]
    assert ex.labels == [-100, -100, 319, 6635, 29889, 13]
    assert ex.images == () and ex.marks == 1 and ex.expanded_length == 6 + 575
    assert "all-zero dummy image" in refused(rec, "plain", llama, "text_placeholder")


# --------------------------------------------------------------------------------------------- plain: roles unread
def test_plain_reads_no_roles(llama):
    # assert len(source) == 2 and "<image>" in source[0]['value']: nothing about "from"; turn 2 is the caption
    rec = turns(("assistant", "<image>\nDescribe."), ("user", "A cat."), images=IMAGE)
    ex = tokenize(rec, "plain", llama, max_length=2048)
    assert ex.input_ids == [1, -200, 319, 6635, 29889, 13]
    assert ex.labels == [IGNORE_INDEX, IGNORE_INDEX, 319, 6635, 29889, 13]
    assert "plain ignores them" in refused(rec, "plain", llama, "roles_ignored")


def test_plain_placeholder_in_the_caption_is_refused(llama):
    # "<image>" + "<image>\nA cat." + "\n": two -200 for one image
    with pytest.raises(RecordError, match="in the caption as well") as e:
        tokenize(record("<image>\nDescribe.", "A cat. <image>", images=IMAGE), "plain", llama, max_length=2048)
    assert e.value.code == "images"


# --------------------------------------------------------------------------------------------- merged placeholders
def test_placeholders_of_one_turn_merge_and_strict_refuses_them(llama):
    rec = record("<image> What is it? <image>", "A cat.", images=IMAGE)
    ex = tokenize(rec, "llava_v1", llama, max_length=2048)
    assert ex.input_ids == tii(f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>", llama)
    assert "holds 2 <image> for one image" in refused(rec, "llava_v1", llama, "image_merged")


def test_ordinary_records_pass_strict(llama):
    for rec, template in [(record("What is it? <image>", "A cat.", images=IMAGE), "llava_v1"),
                          (record("<image>\nDescribe.", "A cat.", images=IMAGE), "plain"),
                          (record("Hi", "Hello", "More?", "No."), "llava_llama_2")]:
        assert tokenize(rec, template, llama, max_length=2048, strict=True).trained > 0


# --------------------------------------------------------------------------------------------- the command
def test_tokenize_command_trains_them_and_strict_refuses_them(tmp_path, tiny_models, vlmkit_data):
    import json

    rows = [{"id": "gpt-first", "conversations": [{"from": "gpt", "value": "Welcome!"},
                                                  {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"id": "text-placeholder", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                         {"from": "gpt", "value": "Hello"}]}]
    source = tmp_path / "r.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "t.jsonl"
    result = vlmkit_data("tokenize", source, "--model", tiny_models["v15"], "--out", out)
    assert result.code == 0, result.err
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(line) == {"id", "input_ids", "labels"} for line in lines)
    strict = vlmkit_data("tokenize", source, "--model", tiny_models["v15"], "--out", out, "--force", "--strict")
    assert strict.code == 3 and "0 example(s), 2 refused" in strict.err
    errors = [json.loads(line) for line in out.read_text().splitlines()]
    assert errors[0]["id"] == "gpt-first" and "record 'gpt-first'" in errors[0]["error"]
    assert "turn 1 is gpt's: the original drops it" in errors[0]["error"] and "--strict" in errors[0]["error"]
    assert "record 'text-placeholder'" in errors[1]["error"] and "as the text '<image>'" in errors[1]["error"]
