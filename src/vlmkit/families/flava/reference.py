"""The ORIGINAL FLAVA forward pass and DALL-E dVAE encoder, for ``vlmkit verify``.

Written from the original code (facebookresearch/multimodal's FLAVA as of its "match the
original codebase" fixes, openai/DALL-E's ``dall_e/encoder.py``), reading the checkpoint under
its own names; nothing here comes from transformers' FLAVA port.

* Encoders: pre-norm transformer layers (``layernorm_before`` -> self-attention ->
  ``attention.output.dense`` + residual -> ``layernorm_after`` -> ``intermediate.dense`` -> GELU
  -> ``output.dense`` + residual), a final ``layernorm`` and a tanh ``pooler`` on the first token.
  Image: patch conv, ``cls_token``, ``position_embeddings``. Text: word + position + token-type
  embeddings, LayerNorm; padding (``input_ids == pad``) masked with -10000.
* Multimodal: the image and text encoders' last hidden states *before* their final layernorm,
  through ``mm_image_projection`` / ``mm_text_projection``, concatenated after the multimodal
  ``cls_token``; the original passes no attention mask here (padding is attended to).
* dVAE: ``blocks.input`` (7x7), four groups of blocks (``id_path`` + ``post_gain * res_path``,
  ``post_gain = 1 / n_layers**2``, 2x max-pool after groups 1-3), ``output`` (ReLU, 1x1 conv);
  the code of each position is the argmax over the vocabulary (``get_codebook_indices``).
"""

from __future__ import annotations

import math
import re

import torch
from torch.nn import functional as F

from .checkpoint import CODEBOOK, OriginalFlava


class OriginalFlavaModel:
    """An original FLAVA checkpoint + codebook as plain tensors and functions. Build with ``load``."""

    def __init__(self, weights: dict[str, torch.Tensor], heads: dict[str, int], eps: float = 1e-12):
        self.w, self.heads, self.eps = weights, heads, eps

    @classmethod
    def load(cls, ckpt: OriginalFlava, heads: dict[str, int]) -> "OriginalFlavaModel":
        """Read every tensor (float32). ``heads``: attention heads of ``image`` / ``text`` / ``mm`` (no shape has them)."""
        return cls({n: ckpt.source.read(n).float() for n in ckpt.source.keys()}, heads)

    # ---------------------------------------------------------------- building blocks

    def _linear(self, x, name):
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _norm(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    def _attention(self, x, name, heads, mask):
        b, n, d = x.shape
        split = lambda t: t.view(b, n, heads, d // heads).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = (split(self._linear(x, f"{name}.attention.attention.{p}")) for p in ("query", "key", "value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
        if mask is not None:
            scores = scores + mask
        out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, n, d)
        return self._linear(out, f"{name}.attention.output.dense")

    def _encoder(self, x, prefix, heads, mask=None):
        """``prefix`` e.g. ``image_encoder.module.``; returns (last hidden state before the final norm, after it)."""
        layers = sorted({int(m.group(1)) for n in self.w if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", n))})
        for i in layers:
            name = f"{prefix}encoder.layer.{i}"
            x = x + self._attention(self._norm(x, f"{name}.layernorm_before"), name, heads, mask)
            h = F.gelu(self._linear(self._norm(x, f"{name}.layernorm_after"), f"{name}.intermediate.dense"))
            x = x + self._linear(h, f"{name}.output.dense")
        return x, self._norm(x, prefix + "layernorm")

    # ---------------------------------------------------------------- encoders

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor):
        p = "image_encoder.module."
        x = F.conv2d(pixels.float(), self.w[p + "embeddings.patch_embeddings.projection.weight"],
                     self.w[p + "embeddings.patch_embeddings.projection.bias"],
                     stride=self.w[p + "embeddings.patch_embeddings.projection.weight"].shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.w[p + "embeddings.cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
        return self._encoder(x + self.w[p + "embeddings.position_embeddings"], p, self.heads["image"])

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, pad_token_id: int = 0):
        p = "text_encoder.module.embeddings."
        n = input_ids.shape[1]
        x = (F.embedding(input_ids, self.w[p + "word_embeddings.weight"])
             + F.embedding(torch.arange(n)[None], self.w[p + "position_embeddings.weight"])
             + F.embedding(torch.zeros_like(input_ids), self.w[p + "token_type_embeddings.weight"]))
        x = self._norm(x, p + "LayerNorm")
        mask = (1.0 - (input_ids != pad_token_id).float())[:, None, None, :] * -10000.0
        return self._encoder(x, "text_encoder.module.", self.heads["text"], mask)

    @torch.no_grad()
    def encode_multimodal(self, image_hidden: torch.Tensor, text_hidden: torch.Tensor) -> torch.Tensor:
        """``encode_mm`` on the unimodal hidden states before their final norm; no mask. Returns the normed output."""
        fused = torch.cat([self._linear(image_hidden, "mm_image_projection"),
                           self._linear(text_hidden, "mm_text_projection")], dim=1)
        cls_token = self.w["mm_encoder.module.encoder.cls_token"].expand(fused.shape[0], -1, -1)
        return self._encoder(torch.cat([cls_token, fused], dim=1), "mm_encoder.module.", self.heads["mm"])[1]

    # ---------------------------------------------------------------- dVAE

    @torch.no_grad()
    def codebook_ids(self, pixels: torch.Tensor) -> torch.Tensor:
        """DALL-E's ``Encoder`` on already mapped pixels (``map_pixels``), argmax over the codes: [B, h, w]."""
        w = {n[len(CODEBOOK):]: t for n, t in self.w.items() if n.startswith(CODEBOOK)}

        def conv(x, name):
            kernel = w[name + ".w"]
            return F.conv2d(x, kernel, w[name + ".b"], padding=(kernel.shape[-1] - 1) // 2)

        groups = sorted({int(m.group(1)) for n in w if (m := re.match(r"blocks\.group_(\d+)\.", n))})
        blocks = sorted({int(m.group(1)) for n in w if (m := re.match(r"blocks\.group_1\.block_(\d+)\.", n))})
        post_gain = 1 / (len(groups) * len(blocks)) ** 2
        x = conv(pixels.float(), "blocks.input")
        for g in groups:
            for b in blocks:
                name = f"blocks.group_{g}.block_{b}"
                identity = conv(x, name + ".id_path") if name + ".id_path.w" in w else x
                r = x
                for c in (1, 2, 3, 4):
                    r = conv(F.relu(r), f"{name}.res_path.conv_{c}")
                x = identity + post_gain * r
            if g != groups[-1]:
                x = F.max_pool2d(x, kernel_size=2)
        return conv(F.relu(x), "blocks.output.conv").argmax(dim=1)
