"""``backbone_of`` picks the backbone row from config.json fields as the released checkpoints have them.

The (architectures, model_type) pairs are the released ``config.json`` files' (and, for the
model_type-only case, what ``llava/model/language_model/llava_llama.py``'s ``LlavaConfig`` writes),
not what vlmkit's tiny models write.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vlmkit.errors import ConfigError
from vlmkit.families.llava.backbones import backbone_of

FOLDER = Path("/models/some-llava")


@pytest.mark.parametrize("release,architectures,model_type,row,hf_model_type", [
    ("liuhaotian/llava-v1.5-7b", ["LlavaLlamaForCausalLM"], "llava", "llama", "llama"),
    ("liuhaotian/llava-v1.6-vicuna-7b", ["LlavaLlamaForCausalLM"], "llava", "llama", "llama"),
    ("liuhaotian/llava-v1.6-mistral-7b", ["LlavaMistralForCausalLM"], "llava_mistral", "mistral", "mistral"),
    # LLaVA-NeXT's Qwen2 models say model_type "llava": the architecture decides
    ("lmms-lab/llava-onevision-qwen2-7b-ov", ["LlavaQwenForCausalLM"], "llava", "qwen2", "qwen2"),
    # a training run's config without architectures: the current code's LlavaConfig.model_type
    ("a training run", None, "llava_llama", "llama", "llama"),
])
def test_backbone_of_picks_the_row_of_each_release(release, architectures, model_type, row, hf_model_type):
    config = {"model_type": model_type, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}
    if architectures is not None:
        config["architectures"] = architectures
    picked = backbone_of(config, FOLDER)
    assert (picked.name, picked.hf_model_type) == (row, hf_model_type), release


def test_backbone_of_refuses_an_unknown_language_model():
    # LLaVA-Lightning-MPT-7B-preview: the original code's MPT class, which vlmkit has no row for
    config = {"architectures": ["LlavaMPTForCausalLM"], "model_type": "llava_mpt"}
    with pytest.raises(ConfigError) as e:
        backbone_of(config, FOLDER)
    message = e.value.message
    assert f"{FOLDER}/config.json" in message
    assert "LlavaMPTForCausalLM" in message and "'llava_mpt'" in message
    assert "LlavaLlamaForCausalLM" in e.value.hint and "LlavaMistralForCausalLM" in e.value.hint


def test_each_gguf_row_names_the_vocabulary_writer_gguf_export_uses():
    # --to gguf writes the vocabulary the row names (llama.cpp's tokenizer.ggml.model: "llama" for
    # SentencePiece, "gpt2" for byte-level BPE, as its converter writes them), through gguf_vocab.KINDS
    from vlmkit.conversion import gguf_vocab
    from vlmkit.families.llava.backbones import ROWS

    expected = {"sentencepiece": "llama", "bpe": "gpt2"}  # llama.cpp's converter: SentencePiece -> "llama"
    for row in ROWS.values():
        if row.gguf_arch is None:
            continue
        assert row.gguf_vocab == expected[row.tokenizer], row.name
        assert row.gguf_vocab in gguf_vocab.KINDS, row.name
