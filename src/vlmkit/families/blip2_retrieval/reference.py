"""The ORIGINAL BLIP-2 retrieval forward, written from LAVIS's code, for ``vlmkit verify`` and ``vlmkit score``.

Nothing here comes from transformers' Blip2 port. The EVA ViT-g, ``ln_vision`` (eps 1e-5), the
eval preprocessing and the Q-Former's attention and query feed-forward are the ``blip2``
family's reference (``families/blip2/reference.py``: the same original code); what the
retrieval model adds is written here from ``Qformer.py`` and ``blip2_image_text_matching.py``:

* ``BertEmbeddings`` with text: ``word_embeddings(ids) + position_embeddings(0..L-1)``, after the
  query tokens when there are any (``cat(query_embeds, text)``), then one LayerNorm over all;
* ``BertLayer.forward`` with ``query_length``: self-attention over queries and text together,
  cross-attention to the image for the query positions only (every ``cross_attention_freq``
  layers), ``intermediate_query`` / ``output_query`` on the queries and ``intermediate`` /
  ``output`` on the text; with no queries (the text encoder) only the text feed-forward;
* ``Blip2ITM.forward(match_head="itm")``: ``itm_head`` on the 32 query outputs of the Q-Former
  over queries + caption with the image cross-attended, **mean over the queries** of the 2-way
  logits; the ITM probability is ``softmax(logits)[1]`` (as transformers' script compares it;
  ``Blip2Qformer.compute_itm`` averages the positive logit alone, a different number);
* ``match_head="itc"``: ``normalize(vision_proj(queries over the image)) @
  normalize(text_proj(CLS of the text alone))``, **max over the queries**, not divided by ``temp``.

The caption is tokenised as ``Blip2ITM.forward`` does it: ``bert-base-uncased`` + ``[DEC]``,
``truncation=True, max_length=max_txt_len`` (32), one caption per call, so no padding and every
attention mask is all ones (the blip2 pieces' unmasked attention is then LAVIS's exactly).
LAVIS runs float32 on the CPU, and so does this reference.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ..blip2.reference import BertIntermediate, BertResidual, EvaViT, QformerEncoder, QformerLayer, lavis_eval_pixels
from .checkpoint import OriginalRetrieval

MAX_TXT_LEN = 32  # Blip2Qformer.__init__(max_txt_len=32); no released config sets it


def lavis_tokenizer(folder):
    """``Blip2Base.init_tokenizer``: ``BertTokenizer.from_pretrained("bert-base-uncased")`` + ``[DEC]`` as BOS."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


class TextEmbeddings(nn.Module):
    """``Qformer.py`` ``BertEmbeddings`` (absolute positions)."""

    def __init__(self, vocab: int, positions: int, width: int, eps: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.position_embeddings = nn.Embedding(positions, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, ids: torch.Tensor | None, queries: torch.Tensor | None) -> torch.Tensor:
        parts = [] if queries is None else [queries]
        if ids is not None:
            positions = torch.arange(ids.shape[1], device=ids.device)[None]
            parts.append(self.word_embeddings(ids) + self.position_embeddings(positions))
        return self.LayerNorm(torch.cat(parts, dim=1))


class RetrievalLayer(QformerLayer):
    """``BertLayer`` with its text feed-forward, run with ``query_length`` as ``Qformer.py`` does."""

    def __init__(self, width, heads, hidden, vision_width, cross: bool, eps: float):
        super().__init__(width, heads, hidden, vision_width, cross, eps)
        self.intermediate = BertIntermediate(width, hidden)
        self.output = BertResidual(hidden, width, eps)

    def forward(self, x, image_embeds=None, queries: int = 0):
        x = self.attention(x, x)
        q, text = x[:, :queries], x[:, queries:]
        parts = []
        if queries:
            if self.crossattention is not None:
                q = self.crossattention(q, image_embeds)
            parts.append(self.output_query(self.intermediate_query(q), q))
        if text.shape[1]:
            parts.append(self.output(self.intermediate(text), text))
        return torch.cat(parts, dim=1)


class OriginalRetrievalModel(nn.Module):
    """LAVIS's ``Blip2ITM`` at inference. Build with ``OriginalRetrievalModel.load``."""

    def __init__(self, vision: dict, qformer: dict, num_queries: int, embed_dim: int, tokenizer):
        super().__init__()
        width, eps = qformer["hidden_size"], 1e-12  # bert-base-uncased's layer_norm_eps
        self.tokenizer = tokenizer
        self.image_size = vision["image_size"]
        self.visual_encoder = EvaViT(vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"],
                                     vision["intermediate_size"], vision["patch_size"], vision["image_size"])
        self.ln_vision = nn.LayerNorm(vision["hidden_size"])  # blip2.py LayerNorm: torch's default eps 1e-5
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, width))
        self.Qformer = nn.Module()
        self.Qformer.bert = nn.Module()
        self.Qformer.bert.embeddings = TextEmbeddings(qformer["vocab_size"], qformer["max_position_embeddings"],
                                                      width, eps)
        freq = qformer["cross_attention_frequency"]
        self.Qformer.bert.encoder = QformerEncoder(
            [RetrievalLayer(width, qformer["num_attention_heads"], qformer["intermediate_size"], vision["hidden_size"],
                            i % freq == 0, eps) for i in range(qformer["num_hidden_layers"])])
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)

    @classmethod
    def load(cls, ckpt: OriginalRetrieval, vision: dict, qformer: dict) -> "OriginalRetrievalModel":
        """Build from LAVIS's names. ``vision`` / ``qformer``: sizes, head counts included."""
        from ...errors import CheckpointError

        model = cls(vision, qformer, ckpt.shape("query_tokens")[1], ckpt.shape("vision_proj.weight")[0],
                    lavis_tokenizer(ckpt.tokenizer_folder))
        names = set(ckpt.source.keys())
        state = {}
        for name in model.state_dict():
            if name not in names:
                raise CheckpointError(f"{ckpt.path}: LAVIS's model needs '{name}', which the checkpoint lacks")
            state[name] = ckpt.source.read(name).float()
        model.load_state_dict(state)
        return model.eval()

    # ------------------------------------------------------------------ the pieces of Blip2ITM.forward

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, truncation=True, max_length=MAX_TXT_LEN).input_ids

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ln_vision(self.visual_encoder(pixels.float()))

    def bert(self, ids: torch.Tensor | None, image_embeds: torch.Tensor | None) -> torch.Tensor:
        """``Qformer.bert``: with the query tokens when an image is given, else the text alone."""
        queries = None if image_embeds is None else self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        x = self.Qformer.bert.embeddings(ids, queries)
        for layer in self.Qformer.bert.encoder.layer:
            x = layer(x, image_embeds, 0 if queries is None else queries.shape[1])
        return x

    @torch.no_grad()
    def scores(self, image: Image.Image, texts: list[str]) -> dict:
        """Pixels, ids, ITM logits and probabilities, ITC similarities, image and text embeddings for one image."""
        device = self.query_tokens.device
        pixels = lavis_eval_pixels(image, self.image_size)
        image_embeds = self.encode_image(pixels.to(device))
        n = self.query_tokens.shape[1]
        image_feats = F.normalize(self.vision_proj(self.bert(None, image_embeds)), dim=-1)[0]  # [queries, D]
        ids, logits, text_feats = [], [], []
        for text in texts:
            row = self.ids(text)
            ids.append(row)
            t = torch.tensor([row], device=device)
            logits.append(self.itm_head(self.bert(t, image_embeds)[:, :n]).mean(dim=1)[0])
            text_feats.append(F.normalize(self.text_proj(self.bert(t, None)[:, 0]), dim=-1)[0])
        logits, text_feats, image_feats = torch.stack(logits).cpu(), torch.stack(text_feats).cpu(), image_feats.cpu()
        return {"pixels": pixels[0], "ids": ids, "itm_logits": logits, "itm": logits.softmax(dim=1)[:, 1],
                "itc": (image_feats @ text_feats.T).max(dim=0).values, "image_embeds": image_feats,
                "text_embeds": text_feats}
