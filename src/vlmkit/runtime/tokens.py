"""Token ids as the original LLaVA code makes them, and the tokenizer of a converted model.

Original LLaVA loads its tokenizer with ``AutoTokenizer.from_pretrained(path, use_fast=False)``
under transformers 4.37, i.e. the *slow*, SentencePiece-backed ``LlamaTokenizer``, and turns a
prompt into ids with ``tokenizer_image_token``. :class:`OriginalTokenizer` re-implements that
slow tokenizer on the ``sentencepiece`` library alone, so parity checks do not depend on the
tokenizer code of the transformers version installed here (5.x has no slow Llama tokenizer).

The 4.37 rules it reproduces:

- ``legacy`` comes from ``tokenizer_config.json`` (absent means ``True``).
- The text is split on added tokens (``<unk>``, ``<s>``, ``</s>`` and any other added token);
  those map straight to their ids, the pieces between them go through SentencePiece.
- legacy: every piece between added tokens is encoded by the model as shipped, whose
  ``add_dummy_prefix`` puts a "▁" in front of *each* piece.
- non-legacy: "▁" is put in front of the whole text once (and dropped again when the text
  starts with an added token); the model is loaded with ``add_dummy_prefix`` switched off, so
  pieces after an added token get no prefix; a piece that starts with "▁" or a space is
  encoded as ``"<unk>" + piece`` and the pieces of ``"<unk>"`` are cut off again (without
  that, SentencePiece would drop the leading whitespace).
- ``add_bos_token`` / ``add_eos_token`` wrap the ids when ``add_special_tokens`` is true.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

from vlmkit.errors import CheckpointError, ConfigError
from vlmkit.lazy import sentencepiece as spm
from vlmkit.lazy import sentencepiece_model_pb2

SPIECE_UNDERLINE = "▁"
IMAGE_TOKEN_INDEX = -200  # llava/constants.py
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class AddedToken:
    """A token matched in the text before SentencePiece runs (4.37 ``AddedToken`` flags)."""

    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False


def token_content(value: Any) -> str | None:
    """A token as ``tokenizer_config.json`` spells it: a string or ``{"content": ...}``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ConfigError(f"token {value!r} is neither a string nor an object with a 'content' string",
                      hint="fix the token entry in tokenizer_config.json / special_tokens_map.json")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})", hint="restore the file from the model release") from exc


class OriginalTokenizer:
    """The transformers-4.37 slow ``LlamaTokenizer`` (``use_fast=False``), on SentencePiece directly.

    Args:
        model_file: the SentencePiece ``tokenizer.model``.
        legacy: 4.37's ``legacy`` flag (see the module docstring).
        bos_token / eos_token / unk_token / pad_token: token strings; ``pad_token`` may be None.
        add_bos_token / add_eos_token: wrap encodings with BOS / EOS.
        added_tokens: extra tokens (content, id, flags) matched before SentencePiece runs; the
            special tokens above are added automatically with their SentencePiece ids.
        additional_special_tokens: added tokens that also count as special (4.37 only treats the
            token attributes and this list as special, whatever ``added_tokens_decoder`` says).

    Example:
        >>> tok = OriginalTokenizer.from_folder("tests/fixtures/tokenizers/llama-spm")
        >>> tok.encode("Hello world")
        [1, 15043, 3186]
    """

    def __init__(self, model_file: str | Path, *, legacy: bool, bos_token: str = "<s>", eos_token: str = "</s>",
                 unk_token: str = "<unk>", pad_token: str | None = None, add_bos_token: bool = True,
                 add_eos_token: bool = False, added_tokens: Sequence[AddedToken] = (),
                 additional_special_tokens: Sequence[str] = ()):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise CheckpointError(f"{model_file}: SentencePiece model not found",
                                  hint="point at the folder that holds the model's tokenizer.model")
        self.legacy = legacy
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_file.read_bytes())
        if not legacy:  # 4.37 get_spm_processor: switch the dummy prefix off for the new behaviour
            proto.normalizer_spec.add_dummy_prefix = False
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(proto.SerializeToString())

        # 4.37 registers every special token as an added token: with its piece id when the
        # vocabulary has it, else with the next free id.
        added = {token.content: token for token in added_tokens}
        next_id = max([self.sp.get_piece_size() - 1, *(t.id for t in added.values())]) + 1
        for content in (bos_token, eos_token, unk_token, pad_token):
            if content is None or content in added:
                continue
            index = self.sp.piece_to_id(content)
            if self.sp.id_to_piece(index) != content:
                index, next_id = next_id, next_id + 1
            added[content] = AddedToken(content, index)
        self.added_tokens = added
        self.special_tokens = {t for t in (bos_token, eos_token, unk_token, pad_token) if t is not None} | set(
            additional_special_tokens)
        # Longest first: at one position the longest added token wins, as in 4.37's trie.
        alternatives = sorted(added, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")") if alternatives else None
        self._unk_length = len(self.sp.encode(unk_token))

    @classmethod
    def from_folder(cls, folder: str | Path, *, legacy: bool | None = None) -> OriginalTokenizer:
        """Build it as ``AutoTokenizer.from_pretrained(folder, use_fast=False)`` did in 4.37.

        Reads ``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json`` (whose
        entries win over the config's, as in 4.37) and ``added_tokens.json`` if present.

        Args:
            folder: the model or tokenizer folder.
            legacy: override the config's ``legacy`` flag (absent in the config means True).
        """
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        tokens = {key: token_content(special_map.get(key, config.get(key, default)))
                  for key, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"),
                                       ("pad_token", None))}
        added = [AddedToken(entry["content"], int(index), lstrip=bool(entry.get("lstrip")),
                            rstrip=bool(entry.get("rstrip")), single_word=bool(entry.get("single_word")))
                 for index, entry in (config.get("added_tokens_decoder") or {}).items()]
        known = {t.content for t in added}
        added += [AddedToken(content, int(index))
                  for content, index in _read_json(folder / "added_tokens.json").items() if content not in known]
        additional = special_map.get("additional_special_tokens", config.get("additional_special_tokens")) or []
        if legacy is None:  # 4.37: a missing or null "legacy" means True
            legacy = config.get("legacy") is not False
        return cls(folder / "tokenizer.model", legacy=legacy,
                   add_bos_token=config.get("add_bos_token", True), add_eos_token=config.get("add_eos_token", False),
                   added_tokens=added, additional_special_tokens=[token_content(t) for t in additional], **tokens)

    # ----------------------------------------------------------------- ids of the special tokens
    def token_to_id(self, token: str) -> int:
        """The id of an added token or SentencePiece piece (unknown pieces give the ``<unk>`` id)."""
        added = self.added_tokens.get(token)
        return added.id if added is not None else self.sp.piece_to_id(token)

    @property
    def bos_token_id(self) -> int:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id(self.eos_token)

    @property
    def unk_token_id(self) -> int:
        return self.token_to_id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Size of the SentencePiece vocabulary (added tokens beyond it not counted, as in 4.37)."""
        return self.sp.get_piece_size()

    # ----------------------------------------------------------------------------- encoding
    def _split_added(self, text: str) -> list[str]:
        """4.37 ``PreTrainedTokenizer.tokenize``: split on added tokens and apply their strip flags."""
        parts = self._split_re.split(text) if self._split_re else [text]
        for i, part in enumerate(parts):
            token = self.added_tokens.get(part) if i % 2 else None
            if token is None:
                continue
            if token.rstrip and i + 1 < len(parts):
                parts[i + 1] = parts[i + 1].lstrip()
            if token.lstrip and i > 0:
                parts[i - 1] = parts[i - 1].rstrip()
            if token.single_word and i > 0 and parts[i - 1] and parts[i - 1][-1] != " ":
                parts[i - 1], parts[i] = parts[i - 1] + part, ""
            elif token.single_word and i + 1 < len(parts) and parts[i + 1] and parts[i + 1][0] != " ":
                parts[i + 1], parts[i] = part + parts[i + 1], ""
        return parts

    def _sp_pieces(self, text: str) -> list[str]:
        """4.37 ``LlamaTokenizer._tokenize``: one chunk between added tokens through SentencePiece."""
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp.encode(text, out_type=str)
        # With add_dummy_prefix off SentencePiece drops leading whitespace; "<unk>" in front keeps it.
        pieces = self.sp.encode(self.unk_token + text, out_type=str)
        return pieces[self._unk_length:] if len(pieces) >= self._unk_length else pieces

    def tokenize(self, text: str) -> list[str]:
        """Token strings for ``text``, without BOS/EOS (4.37 ``LlamaTokenizer.tokenize``)."""
        if not self.legacy and text:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        tokens: list[str] = []
        for i, part in enumerate(self._split_added(text)):
            if not part:
                continue
            tokens.extend([part] if i % 2 and part in self.added_tokens else self._sp_pieces(part))
        if not self.legacy and len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.special_tokens:
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``tokenizer(text).input_ids`` of the original: ids, with BOS/EOS as the config says.

        Args:
            text: the prompt (no ``<image>`` handling here; see :func:`tokenizer_image_token`).
            add_special_tokens: add BOS / EOS per ``add_bos_token`` / ``add_eos_token``.
        """
        ids = [self.token_to_id(token) for token in self.tokenize(text)]
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token
        return ids

    # ----------------------------------------------------------------------------- decoding
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """4.37 ``decode`` with the config LLaVA ships (no spaces between special tokens, no clean-up)."""
        special_ids = {self.token_to_id(t) for t in self.special_tokens}
        id_to_added = {t.id: t.content for t in self.added_tokens.values()}
        tokens = [id_to_added[i] if i in id_to_added else self.sp.id_to_piece(i) for i in map(int, ids)
                  if not (skip_special_tokens and i in special_ids)]
        # Added tokens that are not special are glued in verbatim (4.37 "legacy_added_tokens").
        texts, run = [], []
        for token in tokens:
            if token in self.added_tokens and token not in self.special_tokens:
                if run:
                    texts.append(self._tokens_to_string(run))
                texts.append(token)
                run = []
            else:
                run.append(token)
        if run:
            texts.append(self._tokens_to_string(run))
        return "".join(texts)

    def _tokens_to_string(self, tokens: list[str]) -> str:
        """4.37 ``LlamaTokenizer.convert_tokens_to_string``."""
        tokens = list(tokens)
        if tokens and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]
        out, run, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in self.special_tokens:
                if not prev_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp.decode(run) + token
                prev_special, run = True, []
            else:
                run.append(token)
                prev_special = False
        return out + self.sp.decode(run)


class Encodes(Protocol):
    """What ``tokenizer_image_token`` needs of a tokenizer: a ``runtime.vocab.Vocab`` or a ``data.encoders.Encoder``."""

    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...


def tokenizer_image_token(prompt: str, vocab: "Encodes", image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """Original ``llava.mm_utils.tokenizer_image_token`` (the same in LLaVA-NeXT): ids with
    ``image_token_index`` per ``<image>``, for either kind of vocabulary.

    Each chunk between ``<image>`` markers is encoded on its own *with* the tokenizer's special
    tokens (``tokenizer(chunk).input_ids``). When the first chunk starts with the BOS id, that
    token is kept once and the first token of EVERY chunk is dropped (the original's ``offset``:
    it assumes each chunk starts with its own BOS). So, as in the original:

    * a tokenizer without BOS (Qwen2: ``bos_token_id`` None) never drops a token: a plain join;
    * a prompt that itself starts with the BOS text on a tokenizer that also adds BOS (Llama 3's
      chat template + its ``<|begin_of_text|>`` post-processor) keeps two BOS at the start;
    * chunks are encoded apart, so the chunk after an image starts like a fresh text (a
      SentencePiece tokenizer gives it a "▁" prefix; byte-level BPE merges across the cut are lost).

    Args:
        prompt: the rendered conversation (see ``runtime.templates.render``).
        vocab: anything with ``encode(text) -> ids`` (special tokens added) and ``bos_id``: a
            ``runtime.vocab.Vocab`` or a ``data.encoders.Encoder``.
        image_token_index: the placeholder id (-200 in the original).

    Example:
        >>> from vlmkit.runtime.vocab import open_vocab
        >>> tokenizer_image_token("<image>\\nHi", open_vocab("tests/fixtures/tokenizers/llama-spm"))
        [1, -200, 29871, 13, 18567]
    """
    chunks = [vocab.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
    bos = vocab.bos_id
    offset = 1 if bos is not None and chunks[0][:1] == [bos] else 0
    ids = chunks[0][:offset]
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_token_index)  # the original's separator [-200] * (offset + 1), cut by x[offset:]
        ids.extend(chunk[offset:])
    return ids


def _score_ranked_bpe(model_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a SentencePiece BPE model, merges ranked as SentencePiece applies them.

    SentencePiece merges the adjacent pair whose joined piece has the highest score; a
    ``tokenizers`` BPE merges the pair of lowest rank. So every split of every piece into two
    pieces of the vocabulary becomes a merge, ranked by the joined piece's score (ties: by the
    ids of the two halves).
    """
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise ConfigError(f"{model_file}: SentencePiece model type is not BPE",
                          hint="only LLaMA-style (BPE) SentencePiece tokenizers are supported here")
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    ranked = []
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    for index, piece in enumerate(proto.pieces):
        if piece.type != normal:  # control, byte and user-defined pieces are never built by merges
            continue
        for cut in range(1, len(piece.piece)):
            left, right = piece.piece[:cut], piece.piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-piece.score, index, vocab[left], vocab[right], left, right))
    ranked.sort()
    return vocab, [(left, right) for *_, left, right in ranked]


def build_converted_tokenizer(folder: str | Path, *, legacy: bool, extra_tokens: Sequence[str] = (IMAGE_TOKEN,),
                              pad_token: str | None = "<pad>"):
    """The transformers-5 tokenizer of a converted LLaVA folder, built from ``tokenizer.model``.

    transformers 5 ``LlamaTokenizer`` is backed by ``tokenizers``: it converts the SentencePiece
    BPE model into a byte-fallback BPE with a ``Metaspace`` pre-tokenizer whose prepend scheme is
    "always" for ``legacy=True`` (a "▁" before every piece between special tokens, like the legacy
    slow tokenizer) and "first" for ``legacy=False`` (only at the very start of the text, like the
    non-legacy slow tokenizer). The extra tokens are added as special, non-normalised tokens
    (``<image>`` gets id = vocab size, 32000 for LLaMA), then ``pad_token`` (32001), as
    transformers' ``convert_llava_weights_to_hf.py`` does.

    Args:
        folder: folder with ``tokenizer.model`` (and usually ``tokenizer_config.json``).
        legacy: the ``legacy`` flag of the ORIGINAL tokenizer (see ``tokenizer_config.json``).
        extra_tokens: special tokens to add, in order.
        pad_token: padding token to add after them, or None to keep the folder's.

    Returns:
        A ``transformers.LlamaTokenizer``; ``save_pretrained`` + ``AutoTokenizer.from_pretrained``
        gives back the same behaviour (``legacy`` is stored in ``tokenizer_config.json``).
    """
    from tokenizers.models import BPE
    from transformers import AddedToken as HfAddedToken
    from transformers import LlamaTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.model").is_file():
        raise CheckpointError(f"{folder}: no tokenizer.model",
                              hint="point at the original model folder, which ships the SentencePiece model")
    tokenizer = LlamaTokenizer.from_pretrained(str(folder), legacy=legacy)
    # transformers 5.23 ranks the BPE merges by piece id; SentencePiece ranks merges by piece
    # score. LLaMA keeps its whitespace-run pieces ("▁▁", "▁▁▁▁", ids 259, 268, ...) at low ids
    # but with score -1e9, so the id ranking merges "    Hello" into "▁▁▁▁"+"Hello" where the
    # original gives "▁▁▁"+"▁Hello". Ranking by score (as transformers 4.x's LlamaConverter did)
    # restores the original; the merges travel in tokenizer.json, so the fix survives a reload.
    vocab, merges = _score_ranked_bpe(folder / "tokenizer.model")
    tokenizer.backend_tokenizer.model = BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True)
    # 5.23's LlamaTokenizer consumes ``legacy`` without recording it in ``init_kwargs``, so
    # save_pretrained drops it and a reload falls back to legacy=False ("first"): record it.
    tokenizer.init_kwargs["legacy"] = legacy
    if extra_tokens:
        tokenizer.add_tokens([HfAddedToken(t, special=True, normalized=False) for t in extra_tokens],
                             special_tokens=True)
    if pad_token is not None:
        tokenizer.add_special_tokens({"pad_token": HfAddedToken(pad_token, special=True, normalized=False)})
    return tokenizer
