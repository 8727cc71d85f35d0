"""Tiny BLIP-2 stage-1 checkpoints with random weights, in the on-disk layouts of LAVIS's releases.

The names are those of ``Blip2Qformer`` (``blip2_qformer.py``, ``blip2.py``, ``Qformer.py``):

* ``blip2_pretrained.pth``: ``{"model": ...}`` as LAVIS's runner saves it, the trained
  parameters and the buffers, without the frozen ViT: ``query_tokens``, ``ln_vision.*``,
  ``Qformer.bert.*`` (word embeddings resized to the tokenizer's length, position embeddings,
  the ``position_ids`` buffer, every layer's text and ``*_query`` feed-forward, cross-attention
  every other layer), ``Qformer.cls.predictions.*`` (``BertLMHeadModel``'s head: ``decoder.weight``
  tied to the word embeddings, ``decoder.bias`` the same tensor as ``predictions.bias``),
  ``vision_proj.*``, ``text_proj.*``, ``itm_head.*`` and the scalar ``temp``;
* ``blip2_finetune_coco.pth``: the same with the fine-tuned ViT inside (``freeze_vit: False``) at
  its own resolution;
* a ``bert-base-uncased``-style tokenizer folder: the ``flava`` family's tiny uncased WordPiece
  vocabulary (bert's special-token ids, not its vocabulary, which is not available offline).

The ViT (``eva_vit_g.pth``) and the Q-Former's common tensors are the ``blip2`` family's builders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..blip2 import tiny as blip2_tiny
from ..flava.tiny import write_tokenizer

TinySizes = blip2_tiny.TinySizes
make_eva_vit = blip2_tiny.make_eva_vit


@dataclass(frozen=True)
class TinyStage1:
    sizes: TinySizes = TinySizes()
    embed_dim: int = 16  # LAVIS: 256


def make_tokenizer(folder: Path) -> int:
    """A ``bert-base-uncased``-style folder; returns the length LAVIS's tokenizer has with ``[DEC]`` added."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    words = (folder / "vocab.txt").read_text().splitlines()
    return len(set(words)) + 1  # a vocab.txt's repeated word is one token


def stage1_state(tiny: TinyStage1, vocab: int, *, seed: int = 1, vit: bool = False) -> dict[str, torch.Tensor]:
    """``Blip2Qformer``'s state dict under LAVIS's names (``vit``: with ``visual_encoder.*``)."""
    s, g = tiny.sizes, torch.Generator().manual_seed(seed + 100)
    h = s.qformer_hidden
    state = blip2_tiny.qformer_state(s, seed=seed, unused=True, position_ids=True)
    # Blip2Qformer: Qformer.resize_token_embeddings(len(tokenizer)); the LM head's decoder is tied to them
    words = torch.randn(vocab, h, generator=g) * 0.5
    state["Qformer.bert.embeddings.word_embeddings.weight"] = words
    state["Qformer.cls.predictions.decoder.weight"] = words
    state["Qformer.cls.predictions.bias"] = state["Qformer.cls.predictions.decoder.bias"] = torch.zeros(vocab)
    state["Qformer.bert.embeddings.position_embeddings.weight"] = torch.randn(512, h, generator=g) * 0.5
    for name, d_out in (("vision_proj", tiny.embed_dim), ("text_proj", tiny.embed_dim), ("itm_head", 2)):
        blip2_tiny._linear(state, name, d_out, h, g)
    state["temp"] = torch.tensor(0.07)  # nn.Parameter(0.07 * torch.ones([])), a 0-d tensor
    if vit:
        state.update({"visual_encoder." + k: v for k, v in blip2_tiny.eva_vit_state(s, seed=seed + 20).items()})
    return state


def make_pretrained(path: Path, vocab: int, tiny: TinyStage1 = TinyStage1(), *, seed: int = 1) -> Path:
    """``blip2_pretrained.pth``: no ViT inside (``--vision eva_vit_g.pth``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": stage1_state(tiny, vocab, seed=seed)}, path)
    return path


def make_finetuned(path: Path, vocab: int, tiny: TinyStage1 = TinyStage1(), *, seed: int = 3) -> Path:
    """``blip2_finetune_coco.pth``: the fine-tuned ViT inside, at its own image size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": stage1_state(tiny, vocab, seed=seed, vit=True)}, path)
    return path
