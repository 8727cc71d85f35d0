"""The ORIGINAL InstructBLIP forward pass, written from LAVIS's code, for ``vlmkit verify`` and chat.

Nothing here comes from transformers' InstructBlip port. The EVA ViT-g and the Q-Former's attention
blocks are plain BLIP-2's, imported from ``families.blip2.reference``; what InstructBLIP adds is
written here from ``blip2_vicuna_instruct.py`` / ``blip2_t5_instruct.py`` and ``Qformer.py``:

* the instruction is tokenised by ``bert-base-uncased`` + ``[DEC]`` (``init_tokenizer``, left
  truncation at ``max_txt_len`` = 128; ``LavisBertTokenizer``, 4.x's slow BertTokenizer) and read
  by the Q-Former together with the queries:
  ``BertEmbeddings`` adds absolute positions (0, 1, ...) to the *text* only, puts the queries in
  front and normalises both (``embeddings.LayerNorm``); each layer runs self-attention over queries
  and text, cross-attention to the image for the queries alone (every ``cross_attention_freq``-th
  layer), then the query feed-forward (``intermediate_query`` / ``output_query``) on the queries and
  the text feed-forward (``intermediate`` / ``output``) on the text; the language model gets
  ``llm_proj`` / ``t5_proj`` of the first ``num_query_token`` outputs;
* Vicuna: the prompt as given (no template), tokenised by the slow ``LlamaTokenizer`` with
  ``[PAD]`` added and BOS / EOS / UNK set to ``</s>`` (``runtime.tokens.OriginalTokenizer``, the
  4.x slow tokenizer on SentencePiece alone), so the prompt starts with ``</s>`` (id 2); the
  LLaMA from transformers, fed ``cat(projected queries, embedded prompt)``; ``generate`` with
  ``min_length=1`` (EOS cannot come first: only ``inputs_embeds`` are given, so it counts from 0);
* Flan-T5: the prompt through the folder's T5 tokenizer (``</s>`` appended), the encoder reads
  ``cat(projected queries, embedded prompt)``, the decoder starts from ``decoder_start_token_id``;
  ``dense_act_fn="gelu"`` as LAVIS sets it.

LAVIS resizes Vicuna to 32,001 rows for ``[PAD]`` and never releases the new row (a random draw of
the transformers version that resized it). For a release the reference has no such row: it runs the
32,000 trained rows, so its logits have 32,000 columns and its greedy steps choose among trained
tokens. A full state dict (``model.state_dict()``) holds the row, and the reference runs all 32,001.

Precision: LAVIS runs the ViT under fp16 autocast and Flan-T5 in bfloat16 on a GPU, and the whole
model in float32 on the CPU (``load_model_and_preprocess`` calls ``model.float()`` there); this
reference is that float32 model.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from pathlib import Path

import torch
from torch import nn

from ...runtime.generation import with_cache
from ..blip2.reference import BertAttention, BertIntermediate, BertResidual, EvaViT, lavis_eval_pixels
from .checkpoint import OriginalInstructBlip
from .hf_output import MAX_TXT_LEN


__all__ = ["LavisBertTokenizer", "OriginalInstructBlipModel", "lavis_eval_pixels", "lavis_llm_tokenizer"]


class LavisBertTokenizer:
    """``Blip2Base.init_tokenizer(truncation_side="left")``: transformers 4.x's *slow* ``BertTokenizer`` of
    bert-base-uncased with ``[DEC]`` added as BOS, written from its definition on ``vocab.txt`` alone (so the
    check does not lean on the ``tokenizers``-backed BertTokenizer the converted processor uses):

    * special tokens (``[PAD] [UNK] [CLS] [SEP] [MASK] [DEC]``) are cut out of the text first;
    * ``BasicTokenizer``: drop NUL / U+FFFD / control characters, whitespace to " ", spaces around CJK
      ideographs, NFC, split on whitespace, lower-case, strip accents (NFD without ``Mn``), split off
      every punctuation character (ASCII symbols count as punctuation);
    * ``WordpieceTokenizer``: greedy longest match, ``##`` continuations, a word over 100 characters or
      one that cannot be covered is ``[UNK]``;
    * ``[CLS] ... [SEP]``; ``truncation=True, max_length`` drops tokens on the left.
    """

    SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

    def __init__(self, folder):
        folder = Path(folder)
        if (folder / "vocab.txt").is_file():
            lines = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            self.vocab = {}
            for index, token in enumerate(lines):  # load_vocab: a repeated token keeps its last line
                self.vocab[token] = index
        else:
            self.vocab = dict(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
        self.dec_id = len(self.vocab)  # add_special_tokens({"bos_token": "[DEC]"}): a new id after the vocabulary
        specials = [t for t in self.SPECIAL if t in self.vocab] + ["[DEC]"]
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")")

    def __len__(self) -> int:
        return self.dec_id + 1

    def token_id(self, token: str) -> int:
        return self.dec_id if token == "[DEC]" else self.vocab.get(token, self.vocab["[UNK]"])

    @staticmethod
    def _basic(text: str) -> list[str]:
        chars = []
        for c in text:
            cp = ord(c)
            if cp == 0 or cp == 0xFFFD or (unicodedata.category(c).startswith("C") and c not in "\t\n\r"):
                continue
            if c in " \t\n\r" or unicodedata.category(c) == "Zs":
                chars.append(" ")
            elif _is_cjk(cp):
                chars.append(f" {c} ")
            else:
                chars.append(c)
        words = []
        for word in unicodedata.normalize("NFC", "".join(chars)).split():
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
            piece = ""
            for c in word:
                if _is_punctuation(c):
                    words += [piece, c] if piece else [c]
                    piece = ""
                else:
                    piece += c
            if piece:
                words.append(piece)
        return words

    def _wordpiece(self, word: str) -> list[str]:
        if len(word) > 100:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and ("##" if start else "") + word[start:end] not in self.vocab:
                end -= 1
            if end == start:
                return ["[UNK]"]
            pieces.append(("##" if start else "") + word[start:end])
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        tokens = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                tokens.append(part)
            else:
                tokens += [p for word in self._basic(part) for p in self._wordpiece(word)]
        return tokens

    def encode(self, text: str, max_length: int) -> list[int]:
        ids = [self.token_id(t) for t in self.tokenize(text)][-(max_length - 2):]  # left truncation
        return [self.vocab["[CLS]"], *ids, self.vocab["[SEP]"]]

    def decode(self, ids) -> str:
        names = {i: t for t, i in self.vocab.items()} | {self.dec_id: "[DEC]"}
        return " ".join(names.get(i, "?") for i in ids).replace(" ##", "")


# BasicTokenizer._is_chinese_char's blocks
CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in CJK)


def _is_punctuation(c: str) -> bool:
    cp = ord(c)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 \
        or unicodedata.category(c).startswith("P")


def lavis_llm_tokenizer(ckpt: OriginalInstructBlip):
    """Vicuna: the slow LlamaTokenizer + ``[PAD]``, BOS/EOS/UNK ``</s>`` (``blip2_vicuna_instruct.py:90-97``);
    Flan-T5: ``T5TokenizerFast.from_pretrained(t5_model, truncation_side="left")``."""
    if not ckpt.lm.causal:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(ckpt.lm_folder, truncation_side="left")
    from ...runtime.tokens import OriginalTokenizer

    base = OriginalTokenizer.from_folder(ckpt.lm_folder)
    return OriginalTokenizer(ckpt.lm_folder / "tokenizer.model", legacy=base.legacy, bos_token="</s>",
                             eos_token="</s>", unk_token="</s>", pad_token="[PAD]", add_bos_token=base.add_bos_token,
                             add_eos_token=base.add_eos_token, added_tokens=list(base.added_tokens.values()))


class TextEmbeddings(nn.Module):
    """``Qformer.py BertEmbeddings.forward(input_ids, query_embeds)``."""

    def __init__(self, vocab: int, positions: int, width: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.position_embeddings = nn.Embedding(positions, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, ids: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        text = self.word_embeddings(ids) + self.position_embeddings(positions)
        return self.LayerNorm(torch.cat([queries, text], dim=1))


class InstructQformerLayer(nn.Module):
    """``Qformer.py BertLayer.forward`` with ``query_length`` > 0 and text after the queries."""

    def __init__(self, width, heads, hidden, vision_width, cross: bool, eps: float):
        super().__init__()
        self.attention = BertAttention(width, heads, width, eps)
        self.crossattention = BertAttention(width, heads, vision_width, eps) if cross else None
        self.intermediate, self.output = BertIntermediate(width, hidden), BertResidual(hidden, width, eps)
        self.intermediate_query, self.output_query = BertIntermediate(width, hidden), BertResidual(hidden, width, eps)

    def forward(self, x, image_embeds, n_queries: int):
        # one prompt, no padding: every extended-mask entry is 0, so no mask is added
        x = self.attention(x, x)
        queries, text = x[:, :n_queries], x[:, n_queries:]
        if self.crossattention is not None:
            queries = self.crossattention(queries, image_embeds)
        queries = self.output_query(self.intermediate_query(queries), queries)
        text = self.output(self.intermediate(text), text)
        return torch.cat([queries, text], dim=1)


class InstructQformerBert(nn.Module):
    def __init__(self, qformer: dict, vision_width: int, eps: float = 1e-12):
        super().__init__()
        width = qformer["hidden_size"]
        self.embeddings = TextEmbeddings(qformer["vocab_size"], qformer["max_position_embeddings"], width, eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            InstructQformerLayer(width, qformer["num_attention_heads"], qformer["intermediate_size"], vision_width,
                                 i % qformer["cross_attention_frequency"] == 0, eps)
            for i in range(qformer["num_hidden_layers"]))

    def forward(self, ids, query_tokens, image_embeds):
        x = self.embeddings(ids, query_tokens)
        for layer in self.encoder.layer:
            x = layer(x, image_embeds, query_tokens.shape[1])
        return x


class OriginalInstructBlipModel(nn.Module):
    """An original LAVIS InstructBLIP (Vicuna or Flan-T5), runnable. Build with ``load``."""

    def __init__(self, ckpt: OriginalInstructBlip, vision: dict, qformer: dict, language_model: nn.Module):
        super().__init__()
        self.ckpt, self.causal = ckpt, ckpt.lm.causal
        self.visual_encoder = EvaViT(vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"],
                                     vision["intermediate_size"], vision["patch_size"], vision["image_size"])
        self.ln_vision = nn.LayerNorm(vision["hidden_size"])  # torch default eps 1e-5, as blip2.py builds it
        self.query_tokens = nn.Parameter(torch.zeros(1, ckpt.shape("query_tokens")[1], qformer["hidden_size"]))
        self.Qformer = nn.Module()
        self.Qformer.bert = InstructQformerBert(qformer, vision["hidden_size"])
        self.proj = nn.Linear(qformer["hidden_size"], language_model.config.hidden_size)
        self.language_model = language_model
        self.image_size = vision["image_size"]
        self.tokenizer = lavis_llm_tokenizer(ckpt)
        self.qformer_tokenizer = LavisBertTokenizer(ckpt.qformer_tokenizer)
        # generate() takes EOS from the LM's own generation config (Vicuna: 2 = </s>; T5: 1)
        self.eos_token_id = language_model.generation_config.eos_token_id
        self.min_new_tokens = 1 if self.causal else 0  # LAVIS's min_length=1, counted as transformers counts it

    @classmethod
    def load(cls, ckpt: OriginalInstructBlip, vision: dict, qformer: dict) -> "OriginalInstructBlipModel":
        """Build from LAVIS's names. ``vision`` / ``qformer``: sizes (heads included, e.g. from the target config)."""
        from transformers import AutoConfig, GenerationConfig, LlamaForCausalLM, T5ForConditionalGeneration
        from transformers.initialization import no_init_weights

        from ...errors import CheckpointError

        fields = {k: v for k, v in ckpt.lm_config.items() if k not in ("architectures", "transformers_version")}
        if not ckpt.lm.causal:
            fields["dense_act_fn"] = "gelu"  # blip2_t5_instruct.py: t5_config.dense_act_fn = "gelu"
        # the rows the weights have: a full state dict holds LAVIS's resized Vicuna ([PAD]'s row), a release none
        fields["vocab_size"] = ckpt.shape(ckpt.prefix + ckpt.lm.embedding)[0]
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        with no_init_weights():
            lm = (LlamaForCausalLM if ckpt.lm.causal else T5ForConditionalGeneration)(config)
        if (ckpt.lm_folder / "generation_config.json").exists():
            lm.generation_config = GenerationConfig.from_pretrained(ckpt.lm_folder)
        source, prefix = ckpt.source, ckpt.prefix
        state = {n[len(prefix):]: source.read(n).float() for n in source.keys()
                 if n.startswith(prefix) and not n.endswith(".inv_freq")}
        tied = bool(ckpt.lm_config.get("tie_word_embeddings", not ckpt.lm.causal)) and "lm_head.weight" not in state
        copies = () if ckpt.lm.causal else ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
        wanted = {n for n in lm.state_dict() if n not in copies and not (tied and n == "lm_head.weight")}
        if missing := sorted(wanted - set(state)):
            raise CheckpointError(f"{ckpt.lm_folder}: the language model lacks {len(missing)} tensor(s), "
                                  f"e.g. {missing[0]!r}")
        lm.load_state_dict({n: state[n] for n in wanted}, strict=False, assign=True)
        shared = lm.get_input_embeddings().weight
        for copy in copies:
            lm.get_submodule(copy.removesuffix(".weight")).weight = shared
        if tied:
            lm.lm_head.weight = shared
        model = cls(ckpt, vision, qformer, lm.eval())
        own = {}
        for name in model.state_dict():
            if name.startswith("language_model."):
                continue
            original = ckpt.lm.projection + name[len("proj"):] if name.startswith("proj.") else name
            if original not in source.keys():
                raise CheckpointError(f"{ckpt.path}: LAVIS's model needs '{original}', which the checkpoint lacks")
            own[name] = source.read(original).float()
        model.load_state_dict(own, strict=False)
        return model.eval()

    # -------------------------------------------------------------- tokenisation

    def prompt_ids(self, prompt: str) -> list[int]:
        """The language model's ids of the prompt, as LAVIS's generate makes them."""
        return self.tokenizer.encode(prompt) if self.causal else self.tokenizer(prompt).input_ids

    def qformer_ids(self, prompt: str) -> list[int]:
        """The Q-Former's ids of the prompt (``[CLS] ... [SEP]``, at most ``max_txt_len``, cut on the left)."""
        return self.qformer_tokenizer.encode(prompt, MAX_TXT_LEN)

    # -------------------------------------------------------------- the image side

    @torch.no_grad()
    def query_embeds(self, pixels: torch.Tensor, prompt: str) -> torch.Tensor:
        """``inputs_llm`` / ``inputs_t5``: the projected query outputs for this instruction, [1, queries, LM width]."""
        image_embeds = self.ln_vision(self.visual_encoder(pixels.float()))
        ids = torch.tensor([self.qformer_ids(prompt)], device=image_embeds.device)
        output = self.Qformer.bert(ids, self.query_tokens, image_embeds)
        return self.proj(output[:, : self.query_tokens.shape[1]])

    def _embed(self, pixels, prompt: str):
        queries = self.query_embeds(pixels, prompt)
        ids = torch.tensor([self.prompt_ids(prompt)], device=queries.device)
        embeds = torch.cat([queries, self.language_model.get_input_embeddings()(ids)], dim=1)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=queries.device)

    # -------------------------------------------------------------- logits and greedy generation

    @torch.no_grad()
    def logits(self, pixels, prompt: str, text_output: str = "\n") -> torch.Tensor:
        """Vicuna: the LM's logits over queries + prompt (what generate starts from), [L, 32000].
        Flan-T5: the decoder's logits with ``text_output`` as labels (``forward``), [T, vocab]."""
        embeds, mask = self._embed(pixels, prompt)
        if self.causal:
            return self.language_model(inputs_embeds=embeds, attention_mask=mask).logits[0]
        labels = torch.tensor([self.tokenizer(text_output).input_ids])
        labels = labels.masked_fill(labels == self.tokenizer.pad_token_id, -100)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels).logits[0]

    @torch.no_grad()
    def greedy(self, pixels, prompt: str, max_new_tokens: int) -> list[int]:
        """``generate(num_beams=1, repetition_penalty=1.0, use_nucleus_sampling=False)``: new ids, up to EOS.

        (LAVIS's own defaults are ``num_beams=5, repetition_penalty=1.5``; greedy is what can be
        compared token for token.) Vicuna's ``outputs[outputs == 0] = 2`` rewrites the returned ids
        after generation; the ids here are the generated ones.
        """
        embeds, mask = self._embed(pixels, prompt)
        lm, new = self.language_model, []
        if self.causal:
            out, cache = with_cache(lm, None, inputs_embeds=embeds, attention_mask=mask)
        else:
            encoder = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
            start = torch.tensor([[lm.config.decoder_start_token_id]], device=embeds.device)
            out, cache = with_cache(lm, None, encoder_outputs=encoder, attention_mask=mask, decoder_input_ids=start)
        for step in range(max_new_tokens):
            scores = out.logits[0, -1].clone()
            if step < self.min_new_tokens:
                scores[self.eos_token_id] = -math.inf
            token = int(scores.argmax())
            new.append(token)
            if token == self.eos_token_id:
                break
            ids = torch.tensor([[token]], device=embeds.device)
            if self.causal:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out, cache = with_cache(lm, cache, input_ids=ids, attention_mask=mask)
            else:
                out, cache = with_cache(lm, cache, encoder_outputs=encoder, attention_mask=mask, decoder_input_ids=ids)
        return new
