"""`data tokenize` with the LLaVA-NeXT repository's templates: the ids and labels of its train.py.

The expectations come from the original algorithm written out here on the real Qwen2 and Llama-3
vocabularies (``tests/bpe_tokenizers.py``) through the ``tokenizers`` library as transformers drives it:
``preprocess_multimodal`` (LLaVA-NeXT's), then ``preprocess_qwen`` / ``preprocess_llama3`` with
``apply_chat_template`` rendered by Jinja (Qwen: the system-less ChatML the function installs, copied from
train.py; Llama 3: Meta's template, ``fixtures/templates``) and tokenised without added special tokens,
``<image>`` added to a copy of the tokenizer as a special token when the record has an image.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vlmkit.data.encoders import OriginalEncoder
from vlmkit.data.records import Record, Turn
from vlmkit.data.tokenize import RecordError, structure, tokenize


IGNORE = -100
META_LLAMA_3 = (Path(__file__).parent.parent / "fixtures" / "templates" / "meta-llama-3-8b-instruct.jinja").read_text()
# preprocess_qwen's reset template (train.py), verbatim
QWEN_RESET = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
              "{% endif %}")
LLAMA_3_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")


@pytest.fixture(scope="module")
def folders(bpe_vocabs):
    return bpe_vocabs  # (folders, ids): tests/conftest.py builds them once per run


class Original:
    """The part of a transformers fast tokenizer the original preprocessors touch, on ``tokenizers``."""

    def __init__(self, folder: Path, template: str, has_image: bool):
        from tokenizers import AddedToken, Tokenizer

        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.config = json.loads((folder / "tokenizer_config.json").read_text())
        self.template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
        if has_image:  # tokenizer.add_tokens(["<image>"], special_tokens=True) on a deep copy
            self.tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])

    def convert_tokens_to_ids(self, token):
        return self.tok.token_to_id(token)  # no unk_token on these tokenizers: a miss is None

    @property
    def additional_special_tokens_ids(self):
        return [self.tok.token_to_id(t) for t in self.config.get("additional_special_tokens", [])]

    def apply_chat_template(self, messages):
        text = self.template.render(messages=messages, bos_token=self.config.get("bos_token"),
                                    add_generation_prompt=False)
        return self.tok.encode(text, add_special_tokens=False).ids


@functools.lru_cache(maxsize=None)
def _original(folder: Path, kind: str, has_image: bool) -> Original:
    return Original(folder, QWEN_RESET if kind == "qwen" else META_LLAMA_3, has_image)  # never modified later


def nx_preprocess_multimodal(value: str) -> str:
    if len(re.findall("<image>", value)) == 1 and "<image>" in value and not value.startswith("<image>"):
        value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
    return value.replace("QA_GT_caption_based_noisy", "")


def original(folder: Path, kind: str, source: list[dict], has_image: bool) -> tuple[list[int], list[int]]:
    """preprocess_qwen / preprocess_llama3 of LLaVA-NeXT train.py, written out from the original."""
    roles = {"human": "user", "gpt": "assistant"}
    if has_image:
        source = [dict(s, value=nx_preprocess_multimodal(s["value"])) for s in source]
    tok = _original(folder, kind, has_image)
    image_token_index = tok.convert_tokens_to_ids("<image>")
    if kind == "qwen":
        im_start, im_end = tok.additional_special_tokens_ids
        unmask = [198, im_start, im_end]
        system, cut = "You are a helpful assistant.", 0
    else:
        unmask = [tok.convert_tokens_to_ids(t) for t in
                  ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "\n\n"]]
        system, cut = LLAMA_3_SYSTEM, 1
    if roles[source[0]["from"]] != roles["human"]:
        source = source[1:]
    input_id = tok.apply_chat_template([{"role": "system", "content": system}])
    target = [IGNORE] * len(input_id)
    for conv in source:
        role = roles.get(conv["from"], conv["from"])
        encode_id = tok.apply_chat_template([{"role": role, "content": conv["value"]}])[cut:]
        input_id += encode_id
        target += [IGNORE] * len(encode_id) if role in ["user", "system"] else encode_id
    for idx, encode_id in enumerate(input_id):
        if encode_id in unmask:
            target[idx] = encode_id
        if encode_id == image_token_index:
            input_id[idx] = -200
    return input_id, target


RECORDS = {
    "moved-image": (["a.jpg"], [("human", "What is shown? <image>"), ("gpt", "A cat!\n\nYes.")]),
    "multi-turn": (["a.jpg"], [("human", "<image>\nDescribe it\n\nbe short."), ("gpt", "A cat."),
                               ("human", "Colour?"), ("gpt", "Grey\nand white.")]),
    "text-only": ([], [("human", "Is <image> a tag?"), ("gpt", "Yes.")]),
    "leading-gpt": (["a.jpg"], [("gpt", "Hello."), ("human", "<image>\nWhat?"), ("gpt", "A cat.")]),
    "image-in-answer": (["a.jpg"], [("human", "Draw it."), ("gpt", "Here: <image>")]),
    "spaces": (["a.jpg"], [("human", "<image>\n  What?  \n"), ("gpt", "\n A cat.  \n")]),
    "noisy": (["a.jpg"], [("human", "<image>\nQA_GT_caption_based_noisyWhat?"), ("gpt", "A cat.")]),
}


def as_record(rid: str) -> Record:
    images, turns = RECORDS[rid]
    return Record(rid, list(images), [Turn({"human": "user", "gpt": "assistant"}[r], v) for r, v in turns])


@pytest.mark.parametrize("rid", RECORDS)
@pytest.mark.parametrize("template,tokenizer,kind", [("qwen_1_5", "qwen2", "qwen"), ("qwen_2", "qwen2", "qwen"),
                                                     ("qwen_2_5", "qwen2", "qwen"),
                                                     ("llava_llama_3", "llama-bpe", "llama3")])
def test_ids_and_labels_equal_the_originals(folders, encoders, template, tokenizer, kind, rid):
    made, _ = folders
    images, turns = RECORDS[rid]
    ids, labels = original(made[tokenizer], kind, [{"from": r, "value": v} for r, v in turns], bool(images))
    example = tokenize(as_record(rid), template, encoders[tokenizer], max_length=4096)
    assert example.input_ids == ids
    assert example.labels == labels


@pytest.fixture(scope="module")
def encoders(folders):
    made, _ = folders
    return {name: OriginalEncoder.from_folder(folder) for name, folder in made.items()}


def test_qwen_structure_tokens_are_unmasked_in_user_turns(folders, encoders):
    _, ids = folders
    newline, im_start, im_end = ids["qwen2"]["Ċ"], ids["qwen2"]["<|im_start|>"], ids["qwen2"]["<|im_end|>"]
    assert newline == 198  # the id preprocess_qwen writes into its code is "\n" in the real vocabulary
    ex = tokenize(as_record("multi-turn"), "qwen_1_5", encoders["qwen2"], max_length=4096)
    user = ex.input_ids.index(-200)  # inside the first user turn
    assert ex.labels[user] == IGNORE and ex.labels[user + 1] == newline  # "<image>\n": the "\n" is trained
    # "\n\n" is its own token ("ĊĊ"), not 198: it stays masked in the question
    double = ids["qwen2"]["ĊĊ"]
    assert double in ex.input_ids[:ex.input_ids.index(im_end, user)]
    assert all(label == IGNORE for i, label in zip(ex.input_ids, ex.labels) if i == double)
    assert ex.labels[0] == im_start and ex.input_ids.count(-200) == 1


def test_qwen_2_5_trains_with_the_default_system_message(encoders):
    """preprocess() calls preprocess_qwen without system_message: qwen_2_5's "You are Qwen..." never reaches it."""
    record = as_record("multi-turn")
    assert tokenize(record, "qwen_2_5", encoders["qwen2"], max_length=4096).input_ids == tokenize(
        record, "qwen_1_5", encoders["qwen2"], max_length=4096).input_ids


def test_llama_3_double_newline_lookup_misses(folders, encoders):
    """convert_tokens_to_ids("\\n\\n") on the byte-level vocabulary: the token is spelled "ĊĊ", so the lookup
    finds nothing (None: no unk token) and the "\\n\\n" after each header stays masked outside answers."""
    _, ids = folders
    vocab = encoders["llama-bpe"].vocab
    assert vocab.token_id("\n\n") is None and vocab.unk_id is None
    double = ids["llama-bpe"]["ĊĊ"]
    assert double == 271
    ex = tokenize(as_record("multi-turn"), "llava_llama_3", encoders["llama-bpe"], max_length=4096)
    headers = [k for k, i in enumerate(ex.input_ids) if i == ids["llama-bpe"]["<|end_header_id|>"]]
    assert len(headers) == 5  # system + 4 turns
    assert [ex.labels[k + 1] for k in headers] == [IGNORE, IGNORE, double, IGNORE, double]
    assert [ex.labels[k] for k in headers] == [ids["llama-bpe"]["<|end_header_id|>"]] * 5


def test_llama_3_training_ids_have_one_bos(folders, encoders):
    """Each turn's own BOS is cut ([1:]): one <|begin_of_text|>, from the system block (inference has two)."""
    _, ids = folders
    ex = tokenize(as_record("moved-image"), "llava_llama_3", encoders["llama-bpe"], max_length=4096)
    bos = ids["llama-bpe"]["<|begin_of_text|>"]
    assert ex.input_ids[0] == bos and ex.input_ids.count(bos) == 1 and ex.labels[0] == bos


def test_image_in_an_answer_keeps_the_added_tokens_id_as_label(encoders):
    for name, template, added in (("qwen2", "qwen_1_5", 151646), ("llama-bpe", "llava_llama_3", 128256)):
        ex = tokenize(as_record("image-in-answer"), template, encoders[name], max_length=4096)
        k = ex.input_ids.index(-200)
        assert ex.labels[k] == added  # len(tokenizer): the id add_tokens gave <image>


def test_leading_gpt_turn_is_dropped_and_reported(encoders):
    assert structure(as_record("leading-gpt"), "qwen_1_5")[0][0] == "leading_gpt"
    with pytest.raises(RecordError, match="refused by --strict"):
        tokenize(as_record("leading-gpt"), "qwen_1_5", encoders["qwen2"], max_length=4096, strict=True)


def test_what_the_original_fails_on_is_refused(folders, encoders, tmp_path):
    two = Record("two", ["a.jpg"], [Turn("user", "<image> and <image>?"), Turn("assistant", "Same.")])
    with pytest.raises(RecordError) as e:
        tokenize(two, "llava_llama_3", encoders["llama-bpe"], max_length=4096)
    assert e.value.code == "images" and "runs out of image features" in e.value.reason
    first = Record("sys", [], [Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello.")])
    with pytest.raises(RecordError, match="KeyError") as e:
        tokenize(first, "qwen_1_5", encoders["qwen2"], max_length=4096)
    assert e.value.code == "roles"
    # a tokenizer with more additional special tokens than <|im_start|>, <|im_end|> (Qwen2.5 lists 13)
    made, _ = folders
    folder = tmp_path / "qwen-more"
    shutil.copytree(made["qwen2"], folder, ignore=shutil.ignore_patterns("source"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RecordError, match=r"unpacks them into \(im_start, im_end\)") as e:
        tokenize(as_record("multi-turn"), "qwen_1_5", OriginalEncoder.from_folder(folder), max_length=4096)
    assert e.value.code == "unsupported"


def test_collator_cut_applies(encoders):
    ex = tokenize(as_record("multi-turn"), "qwen_1_5", encoders["qwen2"], max_length=40)
    assert len(ex.input_ids) == len(ex.labels) == 40 and ex.length > 40
