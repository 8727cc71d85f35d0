"""``runtime.vocab``: the byte-level BPE kind on Qwen2's and Llama 3's real vocabularies (rebuilt from
llama.cpp's vocab GGUF files, ``tests/bpe_tokenizers.py``) against llama.cpp's test vectors, the special
ids from the folder's files, the kind read from the files, and ``tokenizer_image_token`` on both kinds
with ids derived by hand from the original's algorithm (``llava/mm_utils.py``, the same in LLaVA-NeXT)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlmkit.errors import ConfigError
from vlmkit.runtime.tokens import tokenizer_image_token
from vlmkit.runtime.vocab import open_vocab

from ..bpe_tokenizers import vocab_vectors

LLAMA_SPM = Path(__file__).parent.parent / "fixtures" / "tokenizers" / "llama-spm"


@pytest.fixture(scope="module")
def folders(bpe_vocabs):
    return bpe_vocabs[0]  # qwen2, llama-bpe rebuilt, gpt2: tests/conftest.py builds them once per run


@pytest.fixture(scope="module")
def token_ids(bpe_vocabs, folders):
    """name -> {token text: id}, read from the GGUF token list / GPT-2's tokenizer.json (not the code under test)."""
    out = dict(bpe_vocabs[1])  # qwen2, llama-bpe: bpe_tokenizers.bpe_folders reads them from the GGUF
    gpt2 = json.loads((folders["gpt2"] / "tokenizer.json").read_text(encoding="utf-8"))  # the release's file
    out["gpt2"] = {**gpt2["model"]["vocab"], **{t["content"]: t["id"] for t in gpt2["added_tokens"]}}
    return out


# ------------------------------------------------------------------------------------------ encoding
@pytest.mark.parametrize("name", ["qwen2", "llama-bpe", "gpt2"])
def test_bpe_vocab_gives_llama_cpp_test_vector_ids(folders, name):
    vocab = open_vocab(folders[name])
    assert vocab.kind == "bpe"
    for text, ids in vocab_vectors(name):
        assert vocab.encode(text, special=False) == ids, repr(text)
        assert vocab.decode(ids) == text, repr(text)


def test_special_tokens_as_the_release_adds_them(folders):
    qwen, llama = open_vocab(folders["qwen2"]), open_vocab(folders["llama-bpe"])
    # "Hello world" = 9707 1879 (Qwen2) / 9906 1917 (Llama 3) in llama.cpp's vectors
    assert qwen.encode("Hello world") == [9707, 1879]  # no BOS, no EOS
    assert llama.encode("Hello world") == [128000, 9906, 1917]  # <|begin_of_text|> from the post-processor
    assert (qwen.add_bos, qwen.add_eos, llama.add_bos, llama.add_eos) == (False, False, True, False)
    # special tokens in the text are one token each
    assert qwen.encode("<|im_start|>user<|im_end|>") == [151644, 872, 151645]


def test_special_ids_come_from_the_folder_files(folders, tmp_path):
    qwen, llama = open_vocab(folders["qwen2"]), open_vocab(folders["llama-bpe"])
    # Qwen1.5: bos_token null, eos = pad = <|endoftext|>; Llama 3: <|begin_of_text|> / <|end_of_text|>, no pad
    assert (qwen.bos_id, qwen.eos_id, qwen.pad_id, qwen.unk_id) == (None, 151643, 151643, None)
    assert (llama.bos_id, llama.eos_id, llama.pad_id, llama.unk_id) == (128000, 128001, None, None)
    assert qwen.eos_ids == {151643} and llama.eos_ids == {128001}
    gpt2 = open_vocab(folders["gpt2"])  # GPT-2: bos = eos = <|endoftext|>, never added
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id, gpt2.add_bos, gpt2.encode("Hello world")) == (
        50256, 50256, None, False, [15496, 995])
    # an instruct release: tokenizer EOS <|im_end|>, generation_config stops on both
    instruct = shutil.copytree(folders["qwen2"], tmp_path / "qwen2-instruct", ignore=shutil.ignore_patterns("source"))
    config = json.loads((instruct / "tokenizer_config.json").read_text())
    (instruct / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_end|>"}))
    (instruct / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    vocab = open_vocab(instruct)
    assert (vocab.bos_id, vocab.eos_id, vocab.eos_ids) == (None, 151645, {151645, 151643})
    # special_tokens_map.json wins over tokenizer_config.json (transformers' from_pretrained)
    (instruct / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<|im_end|>"}}))
    assert open_vocab(instruct).pad_id == 151645


# -------------------------------------------------------------------------------------- the kind
def test_kind_read_from_the_files(folders, tmp_path):
    assert open_vocab(LLAMA_SPM).kind == "sentencepiece"
    assert open_vocab(folders["qwen2"]).kind == "bpe"  # Split + ByteLevel in a Sequence
    assert open_vocab(folders["gpt2"]).kind == "bpe"  # ByteLevel alone
    with pytest.raises(ConfigError, match="a byte-level BPE tokenizer.json"):
        open_vocab(LLAMA_SPM, "bpe")
    with pytest.raises(ConfigError, match="a SentencePiece tokenizer.model"):
        open_vocab(folders["qwen2"], "sentencepiece")
    with pytest.raises(ConfigError, match="unknown tokenizer kind 'wordpiece'"):
        open_vocab(folders["qwen2"], "wordpiece")


def test_a_folder_without_a_tokenizer_vlmkit_reads_is_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        open_vocab(tmp_path)
    assert str(tmp_path) in str(info.value) and "tokenizer.model" in str(info.value)
    # a tokenizer.json that is not byte-level BPE (a WordPiece model) is not taken for one
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}},
                                                         "pre_tokenizer": {"type": "BertPreTokenizer"}}))
    with pytest.raises(ConfigError, match="no tokenizer vlmkit can read"):
        open_vocab(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer.json: cannot read JSON"):
        open_vocab(tmp_path)


# ----------------------------------------------------------------------------- tokenizer_image_token
def pieces(ids: dict[str, int], *tokens: str) -> list[int]:
    return [ids[t] for t in tokens]


def test_image_token_qwen2_chatml_no_bos_plain_join(folders, token_ids):
    """qwen_1_5 prompt (LLaVA-NeXT conversation.py): no BOS, so nothing is dropped; the chunk after the
    image starts with its own "\\n" (byte-level "Ċ"), split off "What" by the pre-tokenizer."""
    t = token_ids["qwen2"]
    prompt = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
              "What is shown?<|im_end|>\n<|im_start|>assistant\n")
    chunk0 = pieces(t, "<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġhelpful", "Ġassistant", ".",
                    "<|im_end|>", "Ċ", "<|im_start|>", "user", "Ċ")
    chunk1 = pieces(t, "Ċ", "What", "Ġis", "Ġshown", "?", "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ")
    assert tokenizer_image_token(prompt, open_vocab(folders["qwen2"])) == chunk0 + [-200] + chunk1
    # an image first: the empty first chunk has no ids, the offset stays 0, no token of "\nHi" is lost
    assert tokenizer_image_token("<image>\nHi", open_vocab(folders["qwen2"])) == [-200] + pieces(t, "Ċ", "Hi")


def test_image_token_llama3_keeps_two_bos(folders, token_ids):
    """llava_llama_3: the chat template's text starts with "<|begin_of_text|>" and the tokenizer adds one
    more; the original keeps chunk 0's first id and drops one id of every chunk: two BOS remain, and
    the chunk after the image loses exactly its own added BOS."""
    t = token_ids["llama-bpe"]
    prompt = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is shown?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")
    bos = t["<|begin_of_text|>"]
    chunk0 = [bos] + pieces(t, "<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "ĊĊ")
    chunk1 = [bos] + pieces(t, "Ċ", "What", "Ġis", "Ġshown", "?", "<|eot_id|>", "<|start_header_id|>",
                            "assistant", "<|end_header_id|>", "ĊĊ")
    ids = tokenizer_image_token(prompt, open_vocab(folders["llama-bpe"]))
    assert ids == chunk0 + [-200] + chunk1[1:]  # chunk 0's BOS kept, then chunk0[1:]: both BOS stay
    assert ids[:2] == [128000, 128000]


def test_image_token_bos_text_without_added_bos_drops_a_real_token_as_the_original(folders, token_ids):
    """GPT-2 names a BOS (<|endoftext|>) but does not add it. A prompt that starts with that text: chunk 0
    starts with the BOS id, so the original's offset drops the first token of every later chunk, a real
    one here ("Ċ"). vlmkit does what the original does."""
    t = token_ids["gpt2"]
    ids = tokenizer_image_token("<|endoftext|>Hi<image>\nWhat", open_vocab(folders["gpt2"]))
    assert ids == pieces(t, "<|endoftext|>", "Hi") + [-200] + pieces(t, "What")  # "Ċ" dropped
    # without the BOS text nothing is dropped: a plain join
    assert tokenizer_image_token("Hi<image>\nWhat", open_vocab(folders["gpt2"])) == pieces(
        t, "Hi") + [-200] + pieces(t, "Ċ", "What")


def test_image_token_sentencepiece_vocab():
    """The SentencePiece kind through the same function: every chunk has its own <s>, kept once."""
    vocab = open_vocab(LLAMA_SPM)
    # "USER: " -> <s> ▁US ER : ▁ ; "\nWhat" -> <s> ▁ <0x0A> What (ids of the LLaMA vocabulary)
    assert tokenizer_image_token("USER: <image>\nWhat", vocab) == [1, 3148, 1001, 29901, 29871, -200, 29871, 13, 5618]
