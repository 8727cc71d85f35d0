"""A model's vocabulary, one small surface for both tokenizer kinds LLaVA backbones ship.

* ``sentencepiece`` — a ``tokenizer.model`` (LLaMA / Vicuna, Mistral): the transformers-4.37 slow
  tokenizer the original code uses, :class:`vlmkit.runtime.tokens.OriginalTokenizer`, unchanged.
* ``bpe`` — a byte-level BPE ``tokenizer.json`` (Qwen2, Llama 3, GPT-2 / OPT) through the
  ``tokenizers`` library: its own normaliser, pre-tokenizer, model and post-processor, i.e. what
  ``tokenizer(text).input_ids`` of the release's fast tokenizer gives.

The special ids come from the folder's files, never from a LLaMA assumption: BOS / EOS / pad / unk
are the tokens ``special_tokens_map.json`` or ``tokenizer_config.json`` name (Qwen2 names no BOS;
Llama 3 ``<|begin_of_text|>``), and the ids that stop generation add ``generation_config.json``'s
``eos_token_id`` (Qwen2-Instruct and Llama-3-Instruct stop on a token that is not the tokenizer's EOS).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

from ..errors import ConfigError
from ..options import read_json
from .tokens import OriginalTokenizer, token_content


class Vocab(Protocol):
    """What vlmkit needs from a tokenizer: ids in and out, and its special ids.

    Attributes:
        kind: "sentencepiece" or "bpe".
        folder: the folder it was read from.
        bos_id / eos_id / pad_id / unk_id: the tokenizer's own special tokens (None when it names none).
        eos_ids: the ids that end a generation: ``eos_id`` and ``generation_config.json``'s ``eos_token_id``.
        legacy: the slow LLaMA tokenizer's ``legacy`` flag; None for tokenizers without one.
        add_bos / add_eos: whether ``encode`` puts BOS / EOS around the text (GGUF ``add_bos_token``).
    """

    kind: str
    folder: Path
    bos_id: int | None
    eos_id: int | None
    eos_ids: frozenset[int]
    pad_id: int | None
    unk_id: int | None
    legacy: bool | None
    add_bos: bool
    add_eos: bool

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """``tokenizer(text).input_ids``: with the special tokens the tokenizer adds unless ``special`` is False."""

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str: ...

    def token(self, index: int) -> str:
        """The token's text as the vocabulary spells it ("▁Hello", "ĠHello", "<|im_end|>")."""

    def token_id(self, token: str) -> int | None:
        """transformers' ``convert_tokens_to_ids(token)``: the id of a vocabulary entry or added token spelled
        exactly ``token``, else the unk id (None without one). Byte-level vocabularies spell "\\n\\n" as "ĊĊ"."""


def _stop_ids(folder: Path, eos_id: int | None) -> frozenset[int]:
    """``eos_id`` plus the EOS id(s) of ``generation_config.json`` (an int or a list)."""
    file = folder / "generation_config.json"
    extra = read_json(file).get("eos_token_id") if file.is_file() else None
    extra = extra if isinstance(extra, list) else [extra]
    return frozenset(i for i in (eos_id, *extra) if isinstance(i, int))


class SentencePieceVocab:
    """``tokenizer.model`` read as the original code reads it (``OriginalTokenizer``)."""

    kind = "sentencepiece"

    def __init__(self, tokenizer: OriginalTokenizer, folder: Path):
        self.tokenizer, self.folder = tokenizer, folder
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token is not None else None
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token is not None else None
        self.eos_ids = _stop_ids(folder, self.eos_id)
        self.pad_id = tokenizer.pad_token_id
        self.unk_id = tokenizer.unk_token_id
        self.legacy = tokenizer.legacy
        self.add_bos, self.add_eos = bool(tokenizer.add_bos_token), bool(tokenizer.add_eos_token)
        self._by_id = {t.id: t.content for t in tokenizer.added_tokens.values()}

    @classmethod
    def from_folder(cls, folder: Path, *, legacy: bool | None = None) -> SentencePieceVocab:
        return cls(OriginalTokenizer.from_folder(folder, legacy=legacy), Path(folder))

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def token(self, index: int) -> str:
        return self._by_id.get(index) or self.tokenizer.sp.id_to_piece(index)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


class BpeVocab:
    """A byte-level BPE ``tokenizer.json`` through ``tokenizers`` (the fast tokenizer's backend)."""

    kind = "bpe"
    legacy = None

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.folder = folder
        file = folder / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ConfigError(f"{file}: not a tokenizer the tokenizers library reads ({e})",
                              hint="restore tokenizer.json from the model's release") from None
        # tokenizer(text) without truncation or padding, whatever tokenizer.json asks for
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        special_map = (read_json(folder / "special_tokens_map.json")
                       if (folder / "special_tokens_map.json").is_file() else {})

        def special_id(key: str) -> int | None:
            # special_tokens_map.json wins over tokenizer_config.json, as in transformers' from_pretrained
            content = token_content(special_map.get(key, config.get(key)))
            if content is None:
                return None
            index = self.tokenizer.token_to_id(content)
            if index is None:
                raise ConfigError(f"{folder}: {key} {content!r} is not a token of tokenizer.json",
                                  hint="the tokenizer files come from different releases; restore them")
            return index

        self.bos_id, self.eos_id = special_id("bos_token"), special_id("eos_token")
        self.pad_id, self.unk_id = special_id("pad_token"), special_id("unk_token")
        self.eos_ids = _stop_ids(folder, self.eos_id)
        # what the post-processor wraps a text with (Llama 3: "<|begin_of_text|> $A"; Qwen2: nothing)
        wrapped = self.encode("a")
        self.add_bos = self.bos_id is not None and wrapped[0] == self.bos_id
        self.add_eos = self.eos_id is not None and wrapped[-1] == self.eos_id

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    def token(self, index: int) -> str:
        return self.tokenizer.id_to_token(index)

    def token_id(self, token: str) -> int | None:
        index = self.tokenizer.token_to_id(token)
        return self.unk_id if index is None else index


def _is_byte_level_bpe(folder: Path) -> bool:
    """``folder/tokenizer.json`` is a BPE model behind a ByteLevel pre-tokenizer (alone or in a Sequence)."""
    file = folder / "tokenizer.json"
    if not file.is_file():
        return False
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: cannot read JSON ({e})",
                          hint="restore tokenizer.json from the model's release") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
        return False
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    return spec["model"].get("type") == "BPE" and any(isinstance(p, dict) and p.get("type") == "ByteLevel"
                                                      for p in parts)


def open_vocab(folder: str | Path, kind: str | None = None, *, legacy: bool | None = None) -> Vocab:
    """The vocabulary in ``folder``, of ``kind`` or of the kind its files show (``tokenizer.model`` first:
    original LLaVA folders may hold both files).

    Args:
        folder: a model or tokenizer folder.
        kind: "sentencepiece" or "bpe" (a LLaVA backbone row says which); None reads it from the files.
        legacy: sentencepiece only: override ``tokenizer_config.json``'s ``legacy`` flag.

    Raises:
        ConfigError: an unknown kind, or no tokenizer of that kind (of either kind) in the folder.

    Example:
        >>> open_vocab("tests/fixtures/tokenizers/llama-spm").encode("Hello world")
        [1, 15043, 3186]
    """
    folder = Path(folder)
    if kind is not None and kind not in _NEEDS:
        raise ConfigError(f"unknown tokenizer kind {kind!r}", hint=f"use one of: {', '.join(_NEEDS)}")
    if kind is None:  # in order: a tokenizer.json beside a tokenizer.model is not even read
        kind = next((k for k, (_, found) in _NEEDS.items() if found(folder)), None)
        missing = kind is None
    else:
        missing = not _NEEDS[kind][1](folder)
    if missing:
        what = _NEEDS[kind][0] if kind else " or ".join(need for need, _ in _NEEDS.values())
        raise ConfigError(f"{folder}: no tokenizer vlmkit can read: it needs {what}",
                          hint="point at the model's folder, or copy its language model's tokenizer files into it")
    if kind == "sentencepiece":
        return SentencePieceVocab.from_folder(folder, legacy=legacy)
    return BpeVocab(folder)


def length(vocab: Vocab) -> int:
    """``len(tokenizer)``: the vocabulary with its added tokens (the next id ``add_tokens`` would give)."""
    if vocab.kind == "bpe":
        return vocab.tokenizer.get_vocab_size(with_added_tokens=True)
    tokenizer = vocab.tokenizer
    return max([tokenizer.sp.get_piece_size() - 1, *(t.id for t in tokenizer.added_tokens.values())]) + 1


def kind_of(folder: str | Path) -> str | None:
    """The kind of tokenizer in ``folder`` ("sentencepiece" first, then "bpe"; None: neither)."""
    return next((k for k, (_, found) in _NEEDS.items() if found(Path(folder))), None)


# kind -> (what the folder needs, whether it has it)
_NEEDS = {"sentencepiece": ("a SentencePiece tokenizer.model", lambda folder: (folder / "tokenizer.model").is_file()),
          "bpe": ("a byte-level BPE tokenizer.json", _is_byte_level_bpe)}
