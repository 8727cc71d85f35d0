"""The converted (transformers) tokenizer, through ``TransformersEncoder``, gives the original slow tokenizer's ids."""

from __future__ import annotations

import random

import pytest

from vlmkit.data.encoders import OriginalEncoder, TransformersEncoder
from vlmkit.runtime.tokens import build_converted_tokenizer

from .conftest import TOKENIZERS

PIECES = [" ", "  ", "a", "b", "猫", "\n", "</s>", "<s>", "x.", "ASSISTANT:", "\t", "🐱", "[INST]"]


@pytest.fixture(scope="module")
def fast():
    """(folder name, legacy) -> the converted fast tokenizer (building one takes a few seconds)."""
    return {(name, legacy): build_converted_tokenizer(TOKENIZERS / name, legacy=legacy)
            for name, legacy in [("llama-spm", False), ("llama-spm", True), ("mistral-spm", True)]}


@pytest.mark.parametrize("name,legacy", [("llama-spm", False), ("llama-spm", True), ("mistral-spm", True)])
def test_random_texts_agree(fast, name, legacy):
    original = OriginalEncoder.from_folder(TOKENIZERS / name, legacy=legacy)
    converted = TransformersEncoder(fast[name, legacy], legacy)
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choices(PIECES, k=rng.randint(0, 8)))
        assert converted.encode(text) == original.encode(text), repr(text)


def test_the_whitespace_the_plain_fast_tokenizer_gets_wrong(fast, llama):
    # what the correction is for: the fast tokenizer alone drops the slow tokenizer's "▁" before a leading space
    plain = fast["llama-spm", False]
    assert plain(" ASSISTANT:").input_ids != llama.encode(" ASSISTANT:")
    assert TransformersEncoder(plain, False).encode(" ASSISTANT:") == llama.encode(" ASSISTANT:")
    assert llama.pieces(llama.encode(" ASSISTANT:"))[:3] == ["<s>", "▁", "▁A"]


@pytest.mark.parametrize("legacy", [False, True])
def test_a_literal_image_placeholder_is_text_as_in_the_original(fast, legacy):
    # The conversion adds "<image>" (id 32000) to the tokenizer; LLaVA's own tokenizer has no such token, so a
    # text-only record's literal "<image>" reaches the original training as text ("▁<" "image" ">").
    tokenizer = fast["llama-spm", legacy]
    assert tokenizer.convert_tokens_to_ids("<image>") == 32000
    original = OriginalEncoder.from_folder(TOKENIZERS / "llama-spm", legacy=legacy)
    converted = TransformersEncoder(tokenizer, legacy)
    for text in ("USER: <image>\nWhat is it? ASSISTANT:", "<image>", "a</s><image> b"):
        assert converted.encode(text) == original.encode(text), repr(text)
    assert original.pieces(original.encode("USER: <image>"))[-3:] == ["▁<", "image", ">"]


def test_original_encoder_over_a_byte_level_bpe_vocabulary(tmp_path):
    """Qwen2's tokenizer (no BOS, no unk): nothing to keep at the start, padding with its own pad token."""
    from ..bpe_tokenizers import bpe_folder

    encoder = OriginalEncoder.from_folder(bpe_folder("qwen2", tmp_path / "qwen2"))
    assert (encoder.bos_id, encoder.pad_token_id, encoder.legacy) == (None, 151643, None)
    assert encoder.encode("Hello world") == [9707, 1879]  # llama.cpp's vector for "Hello world"
    assert encoder.pieces([-200, 9707, 1879, 151645]) == ["<image>", "Hello", "Ġworld", "<|im_end|>"]
