"""Vocabularies for GGUF files, read through gguf-py.

* ``sentencepiece``: a LLaMA / Mistral ``tokenizer.model`` with its REAL scores (llama.cpp's
  SentencePiece tokenizer merges by score; -1000 placeholders change the ids), the added
  tokens at their ids, and ``[PAD<id>]`` rows up to the embedding rows (llama.cpp refuses
  a vocabulary shorter than ``token_embd``), as llama.cpp's converter writes them.
* ``sentencepiece_json``: the same vocabulary from ``tokenizer.json`` alone (transformers'
  conversion of that model), for folders without ``tokenizer.model``; ``llama`` picks one.
* ``gpt2``: a byte-level BPE ``tokenizer.json`` (Qwen2, Llama 3) with its merges and the name of
  its pre-tokenizer, as llama.cpp's converter writes it (``tokenizer.ggml.model = "gpt2"``).
* ``vocabulary`` / ``write_vocab`` pick the reader and writer by llama.cpp's name of the vocabulary
  (``tokenizer.ggml.model``: "llama" or "gpt2"; a LLaVA backbone row's ``gguf_vocab``).
* ``clip_bpe``: CLIP's 49,408 text tokens rebuilt from the original merges file, in the
  order of the ``vocab.json`` the CLIP repositories ship.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import gguf

from ..errors import ConfigError
from ..options import read_json

TokenType = gguf.TokenType
ADDED_SCORE = -1000.0  # gguf-py's SentencePieceVocab and llama.cpp's converter for added tokens
PAD_SCORE = -10000.0  # llama.cpp's converter for rows beyond the tokenizer
ASSETS = Path(__file__).resolve().parents[1] / "assets"
CLIP_MERGES = ASSETS / "tokenizers" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408


@dataclass
class Vocab:
    """Token texts, scores and types, one per embedding row (a BPE vocabulary: no scores, merges and a
    pre-tokenizer name instead)."""

    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    bos: int | None = None
    eos: int | None = None
    unk: int | None = None
    pad: int | None = None
    merges: list[str] = field(default_factory=list)
    pre: str | None = None  # llama.cpp's name for the BPE pre-tokenizer ("qwen2", "llama-bpe")
    add_sep: bool | None = None  # BPE: the pair template puts special tokens between two texts (None: no such)

    def __len__(self) -> int:
        return len(self.tokens)


def llama(folder: Path, added: dict[str, int], rows: int) -> Vocab:
    """The vocabulary of the LLaMA / Mistral tokenizer in ``folder``: from ``tokenizer.model`` where there is
    one (the published llava-hf folders, vlmkit's), else from ``tokenizer.json`` (transformers 5 saves only that).

    Raises:
        ConfigError: neither file, or one that is not a SentencePiece(-BPE) tokenizer (see the two readers).
    """
    if (folder / "tokenizer.model").is_file():
        return sentencepiece(folder, added, rows)
    if (folder / "tokenizer.json").is_file():
        return sentencepiece_json(folder, added, rows)
    raise ConfigError(f"{folder}: no tokenizer.model and no tokenizer.json; the GGUF needs the language model's "
                      "vocabulary", hint="copy the base LLM's tokenizer.model into the folder, or pass --model-base "
                                         "FOLDER (the base language model, e.g. vicuna-7b-v1.5)")


def sentencepiece(folder: Path, added: dict[str, int], rows: int) -> Vocab:
    """The vocabulary of ``folder/tokenizer.model`` padded to ``rows``.

    Args:
        folder: holds ``tokenizer.model`` (the SentencePiece model the LLM was trained with).
        added: tokens added after the SentencePiece ones (``{"<image>": 32000, "<pad>": 32001}``).
        rows: the language model's embedding rows; the vocabulary must fit and is padded to them.

    Raises:
        ConfigError: no ``tokenizer.model``, added ids that are not free rows, more tokens than rows.
    """
    model = folder / "tokenizer.model"
    if not model.is_file():
        raise ConfigError(f"{folder}: no tokenizer.model; llama.cpp needs the SentencePiece model's real token "
                          "scores", hint="copy the base LLM's tokenizer.model into the folder, or pass --model-base "
                                         "FOLDER (the base language model, e.g. vicuna-7b-v1.5)")
    try:
        spm = gguf.SentencePieceVocab(folder)  # gguf-py reads pieces, real scores, types (and added_tokens.json)
    except ValueError as e:
        raise ConfigError(f"{folder}/added_tokens.json: {e}",
                          hint="added tokens must follow the SentencePiece ids without gaps") from None
    if spm.added_tokens_list:  # an added_tokens.json beside the model: those ids are taken as given
        added = {**spm.added_tokens_dict, **added}
    sp = spm.sentencepiece_tokenizer
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    return _padded(list(spm.sentencepiece_tokens()), added, rows, model,
                   **{k: (v if v >= 0 else None) for k, v in ids.items()})


def sentencepiece_json(folder: Path, added: dict[str, int], rows: int) -> Vocab:
    """The vocabulary of ``folder/tokenizer.json`` (a SentencePiece-BPE model as transformers converts it),
    equal to the one ``sentencepiece`` reads from that ``tokenizer.model`` but for the scores.

    llama.cpp's converter falls back to gguf-py's ``LlamaHfVocab`` without ``tokenizer.model``: the
    same tokens and types (but ``<unk>``, see below), every score a -1000 placeholder. llama.cpp's
    SentencePiece tokenizer merges the highest-scored pair first, so equal scores merge left to
    right and give other ids than the model's. The scores here follow the BPE merges instead (a
    piece scores minus the rank of the first merge that makes it): the order transformers' converter
    took from the SentencePiece scores, so llama.cpp merges in the same order. The numbers differ
    from SentencePiece's (which are minus the piece's rank among the normal pieces, the
    whitespace-only pieces -1e9); pieces no merge makes (controls, bytes, single characters, whose
    scores llama.cpp never reads) score 0.

    Raises:
        ConfigError: ``tokenizer.json`` is not a SentencePiece-BPE tokenizer, or the vocabulary does not fit.
    """
    file = folder / "tokenizer.json"
    try:
        hf = gguf.LlamaHfVocab(folder)  # gguf-py: the tokens and types, through transformers' tokenizer
        merges = json.loads(file.read_text(encoding="utf-8"))["model"]["merges"]
    except (FileNotFoundError, TypeError) as e:
        raise ConfigError(f"{file}: not a SentencePiece-BPE (LLaMA / Mistral) tokenizer: {e}",
                          hint="pass --model-base FOLDER with the base LLM's tokenizer.model") from None
    except (ValueError, KeyError, AssertionError) as e:  # invalid JSON, a missing field, not a fast tokenizer
        why = {KeyError: f"it has no {e} field", AssertionError: "transformers does not read it as a fast tokenizer"}
        raise ConfigError(f"{file}: unreadable: {why.get(type(e), e)}",
                          hint="restore tokenizer.json from the model's release, or pass --model-base FOLDER "
                               "with the base LLM's tokenizer.model") from None
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    tok = hf.tokenizer
    base = []
    for i, (text, _, kind) in enumerate(hf.hf_tokens()):
        # SentencePiece marks its unknown piece UNKNOWN; LlamaHfVocab calls every special token CONTROL
        kind = TokenType.UNKNOWN if i == tok.unk_token_id else kind
        base.append((text, -float(rank.get(text.decode("utf-8"), 0)), kind))
    added = {**hf.added_tokens_dict, **added}
    return _padded(base, added, rows, file, bos=tok.bos_token_id, eos=tok.eos_token_id, unk=tok.unk_token_id)


def _padded(base: list[tuple[bytes, float, int]], added: dict[str, int], rows: int, where: Path, **ids) -> Vocab:
    """``base`` (text, score, type) at ids 0.., ``added`` at their ids, ``[PAD<id>]`` rows up to ``rows``."""
    if len(base) > rows:
        raise ConfigError(f"{where}: {len(base)} SentencePiece tokens but the model's embedding has only {rows} rows",
                          hint="use the tokenizer the model was trained with")
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(rows)]
    scores = [PAD_SCORE] * rows
    types = [int(TokenType.UNUSED)] * rows
    for i, (text, score, kind) in enumerate(base):
        tokens[i], scores[i], types[i] = text, float(score), int(kind)
    for text, index in sorted(added.items(), key=lambda kv: kv[1]):
        if index < len(base):
            continue  # an added token that is a SentencePiece piece already (e.g. <unk>, <s>)
        if index >= rows:
            raise ConfigError(f"added token {text!r} has id {index} but the model's embedding has {rows} rows",
                              hint="the tokenizer and the weights come from different models")
        tokens[index], scores[index], types[index] = text.encode(), ADDED_SCORE, int(TokenType.USER_DEFINED)
    return Vocab(tokens, scores, types, **ids)


def write_llama_vocab(writer: gguf.GGUFWriter, vocab: Vocab, *, pad: int | None, add_bos: bool, add_eos: bool,
                      chat_template: str | None) -> None:
    """The ``tokenizer.*`` keys of a SentencePiece ("llama") vocabulary, as llama.cpp's converter writes them."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    _write_specials(writer, vocab, pad=pad, add_bos=add_bos, add_eos=add_eos, chat_template=chat_template)


def _write_specials(writer: gguf.GGUFWriter, vocab: Vocab, *, pad: int | None, add_bos: bool, add_eos: bool,
                    chat_template: str | None) -> None:
    """The keys after the token lists, common to both writers: the special ids, whether to add BOS / EOS
    (and SEP, for a BPE pair template that has one), the chat template."""
    for value, add in ((vocab.bos, writer.add_bos_token_id), (vocab.eos, writer.add_eos_token_id),
                       (vocab.unk, writer.add_unk_token_id), (pad, writer.add_pad_token_id)):
        if value is not None:
            add(value)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if vocab.add_sep is not None:
        writer.add_add_sep_token(vocab.add_sep)
    if chat_template:
        writer.add_chat_template(chat_template)


def _looks_special(text: str) -> bool:
    """llama.cpp's converter marks these added tokens CONTROL even when the tokenizer does not call them
    special (``does_token_look_special``: ``<|...|>`` and a few spellings some releases use)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or any(text.startswith(head) and text.endswith(tail) for head, tail in (("<|", "|>"), ("<｜", "｜>"),
                                                                                    ("<unused", ">"))))


def gpt2(folder: Path, added: dict[str, int], rows: int, *, pre: str) -> Vocab:
    """The byte-level BPE vocabulary of ``folder/tokenizer.json``, padded to ``rows``, as llama.cpp's
    converter builds it (``get_vocab_base`` + ``gguf.SpecialVocab``):

    * every id below ``rows``: the model's token (NORMAL), an added token (CONTROL when special or
      when it looks special, else USER_DEFINED), or ``[PAD<id>]`` (UNUSED) where the tokenizer has none;
    * the merges as ``"left right"`` strings (a space inside a part written as U+0120, gguf-py's rule);
    * BOS / EOS / unk / pad: the tokens ``tokenizer_config.json`` names, else ``config.json``'s
      ``*_token_id`` (the converter's fallback: Qwen1.5 names no BOS token but its config has
      ``bos_token_id``; llama.cpp adds BOS only when ``add_bos_token`` says so).

    Args:
        folder: holds ``tokenizer.json`` (and usually ``tokenizer_config.json``, ``config.json``).
        added: tokens the conversion adds beyond the tokenizer (special, so CONTROL), ``{text: id}``.
        rows: the language model's embedding rows.
        pre: llama.cpp's pre-tokenizer name (the backbone row's; llama.cpp's converter hashes it out).

    Raises:
        ConfigError: not a byte-level BPE tokenizer, or one that does not fit ``rows``.
    """
    from ..runtime.tokens import token_content
    from ..runtime.vocab import open_vocab

    vocab = open_vocab(folder, "bpe")
    file = folder / "tokenizer.json"
    spec = json.loads(file.read_text(encoding="utf-8"))
    model_tokens = spec["model"]["vocab"]
    extra = {t["content"]: t for t in spec.get("added_tokens", [])}
    extra.update({text: {"id": index, "content": text, "special": True} for text, index in added.items()})
    top = max([*model_tokens.values(), *(t["id"] for t in extra.values())], default=-1)
    if top >= rows:
        raise ConfigError(f"{file}: token id {top} but the model's embedding has only {rows} rows",
                          hint="use the tokenizer the model was trained with")
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(rows)]
    types = [int(TokenType.UNUSED)] * rows
    for text, index in model_tokens.items():
        tokens[index], types[index] = text.encode(), int(TokenType.NORMAL)
    for text, token in extra.items():
        if token["special"] or _looks_special(text):
            kind = TokenType.CONTROL
        else:  # llama.cpp reads user-defined tokens pre-normalised: "▁" written as the space it stands for
            kind, text = TokenType.USER_DEFINED, text.replace("\u2581", " ")
        tokens[token["id"]], types[token["id"]] = text.encode(), int(kind)
    merges = [m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m)
              for m in spec["model"].get("merges", [])]
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    config = {**config.get("text_config", {}), **config}

    def special(own: int | None, key: str) -> int | None:
        fallback = config.get(f"{key}_token_id")
        return own if own is not None else (fallback if isinstance(fallback, int) and 0 <= fallback < rows else None)

    # llama.cpp's add_sep_token: written when the post-processor's pair template puts special tokens between
    # the two texts (Llama 3: "<|begin_of_text|> $A <|begin_of_text|> $B"), true when one is the EOS / SEP
    pair = vocab.tokenizer.encode("a", "b")
    seqs = pair.sequence_ids  # 0 / 1 for the two texts, None for the template's special tokens
    between = {i for k, (i, s) in enumerate(zip(pair.ids, seqs)) if s is None and 0 in seqs[:k] and 1 in seqs[k:]}
    tok_config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    sep = vocab.tokenizer.token_to_id(token_content(tok_config.get("sep_token")) or "")
    add_sep = bool(between & {vocab.eos_id, sep} - {None}) if between else None
    return Vocab(tokens, [], types, bos=special(vocab.bos_id, "bos"), eos=special(vocab.eos_id, "eos"),
                 unk=special(vocab.unk_id, "unk"), pad=special(vocab.pad_id, "pad"), merges=merges, pre=pre,
                 add_sep=add_sep)


def write_gpt2_vocab(writer: gguf.GGUFWriter, vocab: Vocab, *, pad: int | None, add_bos: bool, add_eos: bool,
                     chat_template: str | None) -> None:
    """The ``tokenizer.*`` keys of a byte-level BPE ("gpt2") vocabulary, as llama.cpp's converter writes them."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    _write_specials(writer, vocab, pad=pad, add_bos=add_bos, add_eos=add_eos, chat_template=chat_template)


# llama.cpp's name of the vocabulary (tokenizer.ggml.model; a LLaVA backbone row's gguf_vocab) -> (reader, writer)
KINDS = {"llama": (llama, write_llama_vocab), "gpt2": (gpt2, write_gpt2_vocab)}


def vocabulary(kind: str, folder: Path, added: dict[str, int], rows: int, *, pre: str | None = None) -> Vocab:
    """The ``kind`` GGUF vocabulary ("llama", "gpt2") of the tokenizer in ``folder`` (``pre``: the BPE
    pre-tokenizer name)."""
    if kind not in KINDS:
        raise ConfigError(f"no GGUF vocabulary writer {kind!r}", hint=f"known: {', '.join(KINDS)}")
    if kind == "gpt2":
        if not pre:
            raise ConfigError(f"{folder}: a BPE vocabulary needs llama.cpp's pre-tokenizer name",
                              hint="the backbone row names it (e.g. qwen2, llama-bpe)")
        return gpt2(folder, added, rows, pre=pre)
    return llama(folder, added, rows)


def write_vocab(writer: gguf.GGUFWriter, kind: str, vocab: Vocab, *, pad: int | None, add_bos: bool,
                add_eos: bool, chat_template: str | None) -> None:
    """``write_llama_vocab`` or ``write_gpt2_vocab``, by the vocabulary's name (``KINDS``)."""
    KINDS[kind][1](writer, vocab, pad=pad, add_bos=add_bos, add_eos=add_eos, chat_template=chat_template)


@lru_cache(maxsize=1)
def clip_bpe(merges_file: Path = CLIP_MERGES) -> tuple[str, ...]:
    """CLIP's text vocabulary, as OpenAI's ``SimpleTokenizer`` builds it (= the order of its ``vocab.json``).

    The 256 byte symbols, the same with ``</w>``, one token per merge (the first 48,894
    merges), then ``<|startoftext|>`` and ``<|endoftext|>``.
    """
    with gzip.open(merges_file, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:CLIP_VOCAB_SIZE - 256 - 256 - 2 + 1]
    symbols = list(gguf.vocab.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    return tuple(vocab + ["<|startoftext|>", "<|endoftext|>"])
