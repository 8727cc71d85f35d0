"""Byte-level BPE tokenizer folders (Qwen2, Llama 3) rebuilt from llama.cpp's vocab-only GGUF files.

The sources are ``tests/fixtures/tokenizers/{qwen2,llama-bpe}/ggml-vocab-*.gguf.gz``: llama.cpp's
``models/ggml-vocab-qwen2.gguf`` (converted from Qwen/Qwen1.5-7B) and ``ggml-vocab-llama-bpe.gguf``
(meta-llama/Meta-Llama-3-8B), gzipped, with their ``.inp`` / ``.out`` test vectors (llama.cpp's tokenizer,
checked against the HF tokenizer by ``convert_hf_to_gguf_update.py``). Everything here is read from
those files or written down from the releases, never from vlmkit's code:

* the token list, token types and merges from the GGUF (``tokenizer.ggml.*``);
* the pre-tokenizer regex each release's ``tokenizer.json`` carries (quoted in llama.cpp's
  ``src/llama-vocab.cpp``: LLAMA3 ``\\p{N}{1,3}``, QWEN2 ``\\p{N}``), then ``ByteLevel`` without its own regex;
* Qwen2's NFC normaliser; Llama 3's ``ignore_merges`` and its ``<|begin_of_text|> $A`` post-processor;
* CONTROL tokens as special added tokens; the ``[PAD<id>]`` rows of Qwen2's padded list stay out;
* ``tokenizer_config.json`` with the tokens the release names (Qwen1.5: no BOS, EOS = pad =
  ``<|endoftext|>``, the ChatML template the GGUF holds; Llama 3: ``<|begin_of_text|>`` / ``<|end_of_text|>``).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tokenizers"

# The split regex of each release's tokenizer.json (llama.cpp src/llama-vocab.cpp, "original regex").
_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}%s| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
          "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


@dataclass(frozen=True)
class Release:
    regex: str
    nfc: bool  # Qwen2's tokenizer.json normalises to NFC
    ignore_merges: bool  # Llama 3's BPE looks a whole word up before merging
    bos_template: str | None  # the post-processor's leading special token
    config: dict = field(default_factory=dict)  # tokenizer_config.json as the release ships it (no added tokens)


RELEASES = {
    "qwen2": Release(_REGEX % "", nfc=True, ignore_merges=False, bos_template=None, config={
        "add_prefix_space": False, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}),
    "llama-bpe": Release(_REGEX % "{1,3}", nfc=False, ignore_merges=True, bos_template="<|begin_of_text|>", config={
        "bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True, "eos_token": "<|end_of_text|>",
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast"}),
}


def gguf_file(name: str, dst: Path) -> Path:
    """The fixture's vocab-only GGUF, unzipped into ``dst``."""
    out = dst / f"ggml-vocab-{name}.gguf"
    if not out.exists():
        dst.mkdir(parents=True, exist_ok=True)
        with gzip.open(FIXTURES / name / f"ggml-vocab-{name}.gguf.gz") as src, open(out, "wb") as f:
            shutil.copyfileobj(src, f)
    return out


def vocab_vectors(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's (text, ids) vectors: inputs split at ``\\n__ggml_vocab_test__\\n``, one line of ids each."""
    folder, stem = ("gpt2-bpe", "gpt2") if name == "gpt2" else (name, name)
    inputs = (FIXTURES / folder / f"{stem}-test-vectors.inp").read_text(encoding="utf-8")
    outputs = (FIXTURES / folder / f"{stem}-test-vectors.out").read_text(encoding="utf-8")
    texts = inputs.split("\n__ggml_vocab_test__\n")
    ids = outputs.split("\n")
    assert texts[-1] == "" and ids[-1] == "" and len(texts) == len(ids)  # both end with their separator
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts[:-1], ids[:-1])]


def gguf_vocabulary(path: Path) -> dict:
    """The ``tokenizer.*`` fields of a GGUF file, as Python values (``gguf_fields``)."""
    return {k: v for k, v in gguf_fields(path).items() if k.startswith("tokenizer.")}


def gguf_fields(path: Path) -> dict:
    """Every key-value field of a GGUF file, as Python values.

    A direct read of the GGUF key-value section (spec: ggml's docs/gguf.md): gguf-py's ``GGUFReader``
    takes ~30 s on a 150k-token list (it builds a numpy view per element), this takes well under one.
    """
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0]

    def string() -> str:
        nonlocal pos
        size = take("Q")
        pos += size
        return data[pos - size:pos].decode("utf-8")

    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def value(kind: int):
        if kind == 8:
            return string()
        if kind == 9:
            item, count = take("I"), take("Q")
            return [value(item) for _ in range(count)]
        return take(scalars[kind])

    assert data[:4] == b"GGUF" and struct.unpack_from("<I", data, 4)[0] == 3, f"{path}: not a GGUF v3 file"
    pos = 8
    take("Q")  # tensor count
    fields = {}
    for _ in range(take("Q")):
        key = string()
        fields[key] = value(take("I"))
    return fields


def gpt2_folder(dst: Path) -> Path:
    """GPT-2's tokenizer folder (``fixtures/tokenizers/gpt2-bpe``, ``tokenizer.json`` gzipped) in ``dst``."""
    source = FIXTURES / "gpt2-bpe"
    if not (dst / "tokenizer.json").exists():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "tokenizer_config.json", dst / "tokenizer_config.json")
        with gzip.open(source / "tokenizer.json.gz") as src, open(dst / "tokenizer.json", "wb") as f:
            shutil.copyfileobj(src, f)
    return dst


def bpe_folder(name: str, dst: Path) -> Path:
    """``dst`` with ``tokenizer.json`` + ``tokenizer_config.json`` rebuilt from the fixture's GGUF."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if (dst / "tokenizer.json").exists():
        return dst
    release = RELEASES[name]
    fields = gguf_vocabulary(gguf_file(name, dst / "source"))
    tokens, types, merges = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "merges"))
    normal, control = 1, 3
    padding = re.compile(r"\[PAD\d+\]")
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == normal}
    special = [t for t, kind in zip(tokens, types) if kind == control]
    others = [t for t, kind in zip(tokens, types) if kind not in (normal, control) and not padding.fullmatch(t)]
    assert not others, f"{name}: unexpected token types for {others[:5]}"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                               ignore_merges=release.ignore_merges))
    if release.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(release.regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    byte_level = processors.ByteLevel(trim_offsets=False)
    if release.bos_template:
        bos = release.bos_template
        template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                 special_tokens=[(bos, tokens.index(bos))])
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    assert [tok.token_to_id(t) for t in special] == [tokens.index(t) for t in special], "added tokens moved"
    tok.save(str(dst / "tokenizer.json"))
    config = dict(release.config)
    if "tokenizer.chat_template" in fields:
        config["chat_template"] = fields["tokenizer.chat_template"]
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return dst


def bpe_folders(root: Path) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    """The Qwen2 and Llama-3 folders (``bpe_folder``) under ``root``, and each one's ``{token text: id}`` read from
    the fixture's GGUF token list (the expectations' ids: not from the tokenizer under test)."""
    folders = {name: bpe_folder(name, root / name) for name in ("qwen2", "llama-bpe")}
    ids = {name: {t: i for i, t in enumerate(gguf_vocabulary(gguf_file(name, folder / "source"))
                                              ["tokenizer.ggml.tokens"])} for name, folder in folders.items()}
    return folders, ids
