"""The tokenizer as LLaVA's training code uses it: ``tokenizer(text).input_ids`` and two attributes.

``llava/train/train.py`` calls the tokenizer on whole prompts and on pieces of them, reads
``tokenizer.legacy`` (``preprocess_v1``; ``getattr(..., False)`` in ``preprocess_mpt``) and
pads with ``pad_token = unk_token`` (every template but v0). An :class:`Encoder` is exactly
that surface, over the original checkpoint's vocabulary (``runtime.vocab.Vocab``: the slow
SentencePiece tokenizer or a byte-level BPE ``tokenizer.json``) or over a transformers tokenizer
for converted folders.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..options import read_json
from ..runtime.tokens import IMAGE_TOKEN_INDEX, token_content
from ..runtime.vocab import Vocab, open_vocab

IMAGE_PIECE = "<image>"


class Encoder(Protocol):
    """What the original preprocessing needs from a tokenizer.

    Attributes:
        bos_id: the id ``tokenizer_image_token`` looks for at the start of the first chunk.
        pad_token_id: what the training pads with, and what ``total_len`` does not count: LLaVA sets
            ``tokenizer.pad_token = tokenizer.unk_token``.
        legacy: the tokenizer's ``legacy`` flag; None when the tokenizer class has no such attribute.
    """

    bos_id: int | None
    pad_token_id: int | None
    legacy: bool | None

    def encode(self, text: str) -> list[int]:
        """``tokenizer(text).input_ids``: ids with the special tokens the tokenizer adds."""

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """Token strings, ``<image>`` for the image placeholder (for display)."""


class OriginalEncoder:
    """The original checkpoint's tokenizer as training used it (``runtime.vocab``: for SentencePiece the
    transformers-4.37 slow LLaMA tokenizer, ``use_fast=False``)."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        self.encode = vocab.encode  # bound once: this is the hot path
        self.bos_id = vocab.bos_id
        # LLaVA's train.py: pad_token = unk_token (a tokenizer without unk keeps its own pad token)
        self.pad_token_id = vocab.unk_id if vocab.unk_id is not None else vocab.pad_id
        self.legacy = vocab.legacy

    @classmethod
    def from_folder(cls, folder: str | Path, *, legacy: bool | None = None) -> OriginalEncoder:
        return cls(open_vocab(folder, legacy=legacy))

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [IMAGE_PIECE if i == IMAGE_TOKEN_INDEX else self.vocab.token(i) for i in ids]

    @property
    def next_id(self) -> int:
        """``len(tokenizer)``: the id ``tokenizer.add_tokens([...])`` gives a new token (LLaVA-NeXT's ``<image>``)."""
        if self.vocab.kind == "bpe":
            return self.vocab.tokenizer.get_vocab_size(with_added_tokens=True)
        tokenizer = self.vocab.tokenizer
        return max([tokenizer.vocab_size - 1, *(t.id for t in tokenizer.added_tokens.values())]) + 1

    @property
    def additional_special_tokens(self) -> list[str]:
        """``tokenizer.additional_special_tokens``: ``special_tokens_map.json``'s list, else
        ``tokenizer_config.json``'s."""
        lists = [read_json(self.vocab.folder / name).get("additional_special_tokens")
                 for name in ("special_tokens_map.json", "tokenizer_config.json")
                 if (self.vocab.folder / name).is_file()]
        return [token_content(t) for t in next((x for x in lists if x is not None), None) or []]


class TransformersEncoder:
    """A transformers fast tokenizer (a converted folder's) that gives the ORIGINAL slow tokenizer's ids.

    A converted LLaMA tokenizer (``runtime.tokens.build_converted_tokenizer``, a ``Metaspace``
    pre-tokenizer) agrees with the slow one except on whitespace that starts a piece of text:

    * at the start of the text, the slow tokenizer puts its "▁" prefix IN FRONT of the space
      (" x" -> "▁ ▁x"), Metaspace does not add one when the text already starts with a space ("▁x");
    * legacy tokenizers encode every piece between added tokens on its own, with the same prefix
      ("</s> b" -> "</s> ▁ ▁b"), where Metaspace writes "</s> ▁b".

    One more leading space makes Metaspace write exactly the slow tokenizer's string, so this encoder
    adds it where the slow tokenizer's prefix goes: at the start (both modes) and, for legacy
    tokenizers, at the start of every piece between added tokens (which it splits itself).

    The ``<image>`` token the conversion adds is not a token here: the original's tokenizer has none
    (prompts with an image are cut at ``<image>`` before they are tokenised), so a text-only record's
    literal ``<image>`` is text, "▁<" "image" ">", as in the original training.
    """

    def __init__(self, tokenizer, legacy: bool | None):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.bos_token_id
        self.pad_token_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id
        self.legacy = legacy
        # tokenizer(text) of a fast tokenizer is its Rust backend's encode (no truncation or padding unless
        # asked); a private copy of the backend, with both off whatever tokenizer.json says, is 4x faster.
        self._backend = _without_token(tokenizer.backend_tokenizer, IMAGE_PIECE)
        self._backend.no_truncation()
        self._backend.no_padding()
        self._wrap = self._backend.encode("", add_special_tokens=True).ids  # [BOS] (+ [EOS])
        added = sorted(((t, i) for t, i in tokenizer.get_added_vocab().items() if t != IMAGE_PIECE),
                       key=lambda kv: -len(kv[0]))
        self._added = dict(added)
        self._split = re.compile("(" + "|".join(re.escape(t) for t, _ in added) + ")") if added else None

    @classmethod
    def from_folder(cls, folder: str | Path) -> TransformersEncoder:
        from transformers import AutoTokenizer

        folder = Path(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
        legacy = config.get("legacy")
        if legacy is None and "Llama" in str(config.get("tokenizer_class", "")):
            legacy = True  # 4.37's LlamaTokenizer(Fast): a missing legacy means True
        return cls(tokenizer, legacy)

    def encode(self, text: str) -> list[int]:
        if not self.legacy or self._split is None:
            return self._backend.encode(" " + text if text.startswith(" ") else text, add_special_tokens=True).ids
        ids = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._added[part])
            elif part:
                part = " " + part if part.startswith(" ") else part
                ids.extend(self._backend.encode(part, add_special_tokens=False).ids)
        bos = self._wrap[:1] if self._wrap and self._wrap[0] == self.bos_id else []
        return bos + ids + self._wrap[len(bos):]

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [IMAGE_PIECE if i == IMAGE_TOKEN_INDEX else self.tokenizer.convert_ids_to_tokens(int(i)) for i in ids]


def _without_token(backend, content: str):
    """A copy of a ``tokenizers.Tokenizer`` without the added token ``content`` (its text is then tokenised)."""
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["content"] != content]
    return Tokenizer.from_str(json.dumps(data))
