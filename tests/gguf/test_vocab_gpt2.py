"""The byte-level BPE ("gpt2") GGUF vocabulary vlmkit writes, against llama.cpp's converter and llama.cpp.

The tokenizers are Qwen2's and Llama 3's, rebuilt from llama.cpp's own vocab-only GGUF files
(``tests/bpe_tokenizers.py``); llama.cpp's converter hash-detects their pre-tokenizers as "qwen2" and
"llama-bpe", i.e. they encode its check text exactly as the released tokenizers do.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from vlmkit.conversion import gguf_vocab
from vlmkit.errors import ConfigError
from vlmkit.runtime.vocab import open_vocab

from ..bpe_tokenizers import bpe_folder, gguf_vocabulary, vocab_vectors
from .llama_tools import Job, run_scripts


# config.json of the release each vocabulary comes from (ids and sizes; the layers are made tiny):
# Qwen/Qwen1.5-7B and meta-llama/Meta-Llama-3-8B.
RELEASES = {
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 151643,
              "eos_token_id": 151643, "vocab_size": 151936, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
              "max_position_embeddings": 32768},
    "llama-bpe": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 128000,
                  "eos_token_id": 128001, "vocab_size": 128256, "rope_theta": 500000.0, "rms_norm_eps": 1e-05,
                  "max_position_embeddings": 8192},
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 4, "torch_dtype": "float32"}
ARCH = {"qwen2": "qwen2", "llama-bpe": "llama"}
LLAMA_SPM = Path(__file__).parent.parent / "fixtures" / "tokenizers" / "llama-spm"


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe-gguf")
    out = {}
    for name, config in RELEASES.items():
        folder = bpe_folder(name, root / name)
        (folder / "config.json").write_text(json.dumps({**config, **TINY}))
        out[name] = folder
    return out


@pytest.fixture(scope="session")
def converted(folders, llama_cpp_tree, tmp_path_factory):
    """llama.cpp's converter on each folder (``--vocab-only``), both in one interpreter: name -> (file, failure)."""
    root = tmp_path_factory.mktemp("bpe-gguf-llama-cpp")
    jobs = {name: Job("convert_hf_to_gguf.py", (folder, "--vocab-only", "--outfile", root / f"{name}.gguf"))
            for name, folder in folders.items()}
    return {name: (root / f"{name}.gguf", failure) for name, failure in run_scripts(llama_cpp_tree, jobs).items()}


def vlmkit_gguf(folder, name, out):
    """vlmkit's vocabulary in a vocab-only GGUF (the hyper-parameters llama.cpp needs to open it)."""
    config = json.loads((folder / "config.json").read_text())
    vocab = open_vocab(folder, "bpe")
    table = gguf_vocab.vocabulary("gpt2", folder, {}, config["vocab_size"], pre=name)
    writer = gguf.GGUFWriter(out, ARCH[name])
    writer.add_block_count(1)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    chat_template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    gguf_vocab.write_vocab(writer, "gpt2", table, pad=table.pad, add_bos=vocab.add_bos, add_eos=vocab.add_eos,
                           chat_template=chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return out


@pytest.mark.parametrize("name", ["qwen2", "llama-bpe"])
@pytest.mark.slow
@pytest.mark.xdist_group("gguf")
def test_same_keys_and_values_as_llama_cpp_converter(folders, converted, tmp_path, name):
    theirs, failure = converted[name]
    assert failure is None, failure
    expected = gguf_vocabulary(theirs)
    assert expected["tokenizer.ggml.pre"] == name  # the converter recognised the rebuilt tokenizer
    ours = gguf_vocabulary(vlmkit_gguf(folders[name], name, tmp_path / "ours.gguf"))
    assert sorted(ours) == sorted(expected)
    for key, value in expected.items():
        assert ours[key] == value, key


@pytest.mark.parametrize("name", ["qwen2", "llama-bpe"])
@pytest.mark.slow
@pytest.mark.xdist_group("gguf")
def test_llama_cpp_tokenizes_vlmkit_gguf_like_the_release(folders, tmp_path, name):
    import llama_cpp

    model = vlmkit_gguf(folders[name], name, tmp_path / "ours.gguf")
    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        for text, ids in vocab_vectors(name):
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, repr(text)
        # add_bos_token: Llama 3 starts every text with <|begin_of_text|> (128000); Qwen2 has no BOS
        bos = {"qwen2": [], "llama-bpe": [128000]}[name]
        hello = dict(vocab_vectors(name))["Hello world"]
        assert llm.tokenize(b"Hello world", add_bos=True, special=False) == bos + hello
        # the special tokens are CONTROL: parsed as one token when asked to, as the release's tokenizer does
        special = {"qwen2": ("<|im_start|>", 151644), "llama-bpe": ("<|eot_id|>", 128009)}[name]
        assert llm.tokenize(special[0].encode(), add_bos=False, special=True) == [special[1]]
    finally:
        llm.close()


def test_the_kind_picks_the_vocabulary_and_bad_input_is_one_error(folders):
    qwen = folders["qwen2"]
    table = gguf_vocab.vocabulary("gpt2", qwen, {"<image>": 151646}, 151936, pre="qwen2")
    assert (table.tokens[151646], table.types[151646]) == (b"<image>", gguf.TokenType.CONTROL)  # a special addition
    assert (table.tokens[151647], table.types[151647]) == (b"[PAD151647]", gguf.TokenType.UNUSED)
    # Qwen1.5 names no BOS token: config.json's bos_token_id is written, as llama.cpp's converter does
    assert (table.bos, table.eos, table.pad, table.add_sep) == (151643, 151643, 151643, None)
    with pytest.raises(ConfigError, match="no GGUF vocabulary writer 'wordpiece'"):
        gguf_vocab.vocabulary("wordpiece", qwen, {}, 151936)
    with pytest.raises(ConfigError, match="needs llama.cpp's pre-tokenizer name"):
        gguf_vocab.vocabulary("gpt2", qwen, {}, 151936)
    with pytest.raises(ConfigError, match="token id 151645 but the model's embedding has only 1000 rows"):
        gguf_vocab.vocabulary("gpt2", qwen, {}, 1000, pre="qwen2")
    with pytest.raises(ConfigError, match="a byte-level BPE tokenizer.json"):
        gguf_vocab.vocabulary("gpt2", LLAMA_SPM, {}, 32000, pre="llama-bpe")
