"""The reference tokenizer against llama.cpp's test vectors, the converted tokenizer against the
reference, ``tokenizer_image_token`` by hand, and the converted tokenizer's save/reload."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlmkit.errors import CheckpointError
from vlmkit.runtime.templates import render, with_image
from vlmkit.runtime.tokens import OriginalTokenizer, build_converted_tokenizer, tokenizer_image_token
from vlmkit.runtime.vocab import SentencePieceVocab

TOKENIZERS = Path(__file__).parent.parent / "fixtures" / "tokenizers"
LLAMA, MISTRAL = TOKENIZERS / "llama-spm", TOKENIZERS / "mistral-spm"


def llama_cpp_vectors() -> list[tuple[str, list[int]]]:
    """llama.cpp's llama-spm vectors: inputs end with "\\n__ggml_vocab_test__\\n", one output line each."""
    inputs = (LLAMA / "llama-spm-test-vectors.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = (LLAMA / "llama-spm-test-vectors.out").read_text(encoding="utf-8").split("\n")
    assert inputs[-1] == "" and outputs[-1] == ""  # both files end with their separator
    assert len(inputs) == len(outputs)
    return [(text, [int(i) for i in line.split()]) for text, line in zip(inputs[:-1], outputs[:-1])]


VECTORS = llama_cpp_vectors()


@pytest.fixture(scope="module")
def llama():
    return OriginalTokenizer.from_folder(LLAMA)


@pytest.fixture(scope="module")
def mistral():
    return OriginalTokenizer.from_folder(MISTRAL)


@pytest.fixture(scope="module")
def llama_vocab(llama):
    return SentencePieceVocab(llama, LLAMA)


@pytest.fixture(scope="module")
def converted():
    """(model, legacy) -> converted tokenizer."""
    return {(path.name, legacy): build_converted_tokenizer(path, legacy=legacy)
            for path in (LLAMA, MISTRAL) for legacy in (False, True)}


# ------------------------------------------------------------------- the reference tokenizer
def test_vectors_are_all_read():
    assert len(VECTORS) == 46
    assert VECTORS[0] == ("ied 4 ½ months", [474, 287, 29871, 29946, 29871, 30226, 7378])
    assert ("", []) in VECTORS and (" ", [259]) in VECTORS


@pytest.mark.parametrize("text,expected", VECTORS, ids=[repr(t)[:30] for t, _ in VECTORS])
def test_original_tokenizer_reproduces_llama_cpp_vectors(llama, text, expected):
    assert llama.encode(text, add_special_tokens=False) == expected


def test_config_is_read_as_4_37_reads_it(llama, mistral):
    assert (llama.legacy, mistral.legacy) == (False, True)
    assert (llama.bos_token_id, llama.eos_token_id, llama.unk_token_id, llama.pad_token_id) == (1, 2, 0, 0)
    assert llama.vocab_size == 32000
    assert llama.encode("Hello") == [1, 15043]  # add_bos_token true, add_eos_token false


def test_legacy_flag_matches_the_transformers_docstring_example():
    """transformers' LlamaTokenizer docstring: "Hello <s>." gives '▁.' (869) legacy, '.' (29889) not."""
    assert OriginalTokenizer.from_folder(LLAMA, legacy=True).encode("Hello <s>.") == [1, 15043, 29871, 1, 869]
    assert OriginalTokenizer.from_folder(LLAMA, legacy=False).encode("Hello <s>.") == [1, 15043, 29871, 1, 29889]


def test_non_legacy_drops_the_prefix_before_a_leading_special_token(llama):
    # "▁" + "<s>Hello" -> ["▁", "<s>", "Hello"] -> the lone "▁" is dropped; no prefix after "<s>"
    assert llama.tokenize("<s>Hello") == ["<s>", "Hello"]
    assert llama.tokenize("USER: hi</s>USER: x") == ["▁US", "ER", ":", "▁hi", "</s>", "USER", ":", "▁x"]
    assert OriginalTokenizer.from_folder(LLAMA, legacy=True).tokenize("USER: hi</s>USER: x") == [
        "▁US", "ER", ":", "▁hi", "</s>", "▁US", "ER", ":", "▁x"]


def test_added_tokens_from_the_config_are_split_out(tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(LLAMA, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["32000"] = {"content": "<image>", "lstrip": False, "normalized": False,
                                              "rstrip": True, "single_word": False, "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = OriginalTokenizer.from_folder(folder)
    # rstrip=True eats the spaces after the token; the text after it gets no prefix (non-legacy)
    assert tok.tokenize("a <image>  b") == ["▁a", "▁", "<image>", "b"]
    assert tok.encode("a <image>  b") == [1, 263, 29871, 32000, 29890]


def test_decode_follows_4_37(llama):
    assert llama.decode([1, 15043, 3186], skip_special_tokens=True) == "Hello world"
    assert llama.decode([15043, 3186, 2]) == "Hello world</s>"
    # non-legacy SentencePiece decodes "▁Hello" after a special token as " Hello" (no dummy prefix)
    assert llama.decode([1, 15043, 3186]) == "<s> Hello world"
    assert llama.decode(llama.encode("USER: What is this?\nASSISTANT:"), skip_special_tokens=True) == \
        "USER: What is this?\nASSISTANT:"


def test_missing_model_file_names_the_folder(tmp_path):
    with pytest.raises(CheckpointError, match="SentencePiece model not found") as info:
        OriginalTokenizer.from_folder(tmp_path)
    assert "tokenizer.model" in info.value.hint


# --------------------------------------------------------------------- tokenizer_image_token
def test_image_token_single_bos_and_prefix_after_image(llama_vocab):
    # chunk "USER: " -> <s> ▁US ER : ▁ ; chunk "\nWhat" -> <s> ▁ \n What ; BOS kept once, -200 between
    assert tokenizer_image_token("USER: <image>\nWhat", llama_vocab) == [
        1, 3148, 1001, 29901, 29871, -200, 29871, 13, 5618]


def test_image_token_at_start_twice_and_at_end(llama_vocab):
    assert tokenizer_image_token("<image>\nHi", llama_vocab) == [1, -200, 29871, 13, 18567]
    assert tokenizer_image_token("<image>\n<image>\nHi", llama_vocab) == [
        1, -200, 29871, 13, -200, 29871, 13, 18567]
    assert tokenizer_image_token("Hi <image>", llama_vocab) == [1, 6324, 29871, -200]  # empty last chunk


def test_image_token_without_bos_keeps_every_token():
    def chars(bos_id):  # a tokenizer that adds no BOS
        return SimpleNamespace(encode=lambda text: [ord(c) for c in text], bos_id=bos_id)

    assert tokenizer_image_token("ab<image>c", chars(1)) == [97, 98, -200, 99]
    assert tokenizer_image_token("a<image>b", chars(None), image_token_index=32000) == [97, 32000, 98]


def test_image_token_legacy_mistral_prompt(mistral):
    # "[INST] " -> <s> ▁[ INST ] ▁ ; "\nHi [/INST]" -> <s> ▁ \n Hi ▁[ / INST ]
    assert tokenizer_image_token("[INST] <image>\nHi [/INST]", SentencePieceVocab(mistral, MISTRAL)) == [
        1, 733, 16289, 28793, 28705, -200, 28705, 13, 23809, 733, 28748, 16289, 28793]


# ----------------------------------------------------------------- the converted tokenizer
def test_special_tokens_are_added_after_the_vocabulary(converted):
    for tok in converted.values():
        assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
        assert tok.pad_token == "<pad>" and tok.pad_token_id == 32001
        added = tok.added_tokens_decoder[32000]
        assert (added.content, added.special, added.normalized) == ("<image>", True, False)
        assert tok("a<image>b").input_ids[2] == 32000  # never split, never normalised


@pytest.mark.parametrize("model", ["llama-spm", "mistral-spm"])
@pytest.mark.parametrize("legacy", [False, True])
def test_converted_agrees_with_original_on_vectors(converted, model, legacy):
    """All vectors agree except texts that START with a space.

    transformers 5's Metaspace pre-tokenizer only prepends "▁" when the text does not already
    start with one, so " Hello" becomes "▁Hello"; the original prepends regardless ("▁▁Hello" ->
    "▁", "▁Hello"). The converted tokenizer therefore encodes a leading-space text like the
    original encodes it without its first space (" " alone: one "▁", where "" gives nothing).
    LLaVA prompts never start with a space, and after special tokens the two agree (see the
    prompt tests).
    """
    original = OriginalTokenizer.from_folder(TOKENIZERS / model, legacy=legacy)
    tok = converted[(model, legacy)]
    differing = []
    for text, _ in VECTORS:
        if text.startswith(" "):
            differing.append(text)
            expected = original.encode(text[1:]) if text != " " else [1, original.token_to_id("▁")]
            assert tok.encode(text) == expected, text
            assert tok.encode(text) != original.encode(text), text
        else:
            assert tok.encode(text) == original.encode(text), text
    assert len(differing) == 15


def test_stock_transformers_conversion_misranks_whitespace_merges():
    """Why build_converted_tokenizer re-ranks merges: 5.23 ranks them by id, SentencePiece by score.

    If this starts failing, transformers fixed it and the re-ranking can go.
    """
    from transformers import LlamaTokenizer

    stock = LlamaTokenizer.from_pretrained(str(LLAMA), legacy=False)
    ours = build_converted_tokenizer(LLAMA, legacy=False)
    original = OriginalTokenizer.from_folder(LLAMA)
    text = "a\n    Hello"  # llama.cpp's vector "    Hello\n    Hello" has the same run of spaces
    assert original.encode(text) == [1, 263, 13, 1678, 15043]  # "▁▁▁", "▁Hello"
    assert stock.encode(text) == [1, 263, 13, 268, 10994]  # "▁▁▁▁", "Hello"
    assert ours.encode(text) == original.encode(text)


PROMPTS = [
    ("vicuna_v1", "llama-spm"), ("llava_v1", "llama-spm"), ("llava_llama_2", "llama-spm"), ("llama_2", "llama-spm"),
    ("llava_v0", "llama-spm"), ("mistral_instruct", "mistral-spm"), ("chatml_direct", "mistral-spm"),
    ("mpt", "mistral-spm"), ("vicuna_v1", "mistral-spm"),
]


@pytest.mark.parametrize("name,model", PROMPTS)
@pytest.mark.parametrize("legacy", [False, True])
def test_converted_agrees_with_original_on_llava_prompts(converted, name, model, legacy):
    """Text-only prompts (no <image>) of every template, with </s> and <s> separators."""
    original = OriginalTokenizer.from_folder(TOKENIZERS / model, legacy=legacy)
    messages = [("user", "What is  in this picture?"), ("assistant", "A cat.\nIt sleeps."), ("user", "Why?"),
                ("assistant", None)]
    prompt = render(name, messages)
    assert converted[(model, legacy)].encode(prompt) == original.encode(prompt)


def test_converted_prompt_with_image_matches_original(converted, llama_vocab):
    """With <image> as a special token the prompt is split like the original's chunks (see templates)."""
    prompt = render("llava_v1", [("user", with_image("What is this?")), ("assistant", None)])
    expected = [32000 if i == -200 else i for i in tokenizer_image_token(prompt, llama_vocab)]
    assert converted[("llama-spm", False)].encode(prompt.replace("<image>\n", "<image> \n")) == expected


@pytest.mark.parametrize("model,legacy", [("llama-spm", False), ("mistral-spm", True), ("llama-spm", True)])
def test_converted_round_trips_through_save_pretrained(tmp_path, converted, model, legacy):
    from transformers import AutoTokenizer

    tok = converted[(model, legacy)]
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["legacy"] is legacy
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlamaTokenizer"
    assert loaded.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001] and loaded.pad_token_id == 32001
    texts = [t for t, _ in VECTORS] + ["a</s>b <image>\nc", "USER: <image> \nhi</s>USER: x", "a\n    Hello"]
    assert [loaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    # legacy decides the prefix after a special token, so a reload with the wrong flag would show here
    if model == "llama-spm":
        assert loaded.encode("a</s>b") == [1, 263, 2, 289 if legacy else 29890]  # "▁b" / "b"


def test_converted_refuses_a_folder_without_sentencepiece_model(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.model"):
        build_converted_tokenizer(tmp_path, legacy=False)
