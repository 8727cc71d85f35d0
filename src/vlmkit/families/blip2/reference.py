"""The ORIGINAL BLIP-2 forward pass, written from LAVIS's code, for ``vlmkit verify``.

Nothing here comes from transformers' Blip2 port: the parts are built from LAVIS's own
definitions and read the checkpoint under LAVIS's names.

* EVA ViT-g (``eva_vit.py``): patch conv, ``cls_token`` + ``pos_embed``, pre-norm blocks whose
  attention builds its qkv bias as ``cat(q_bias, zeros, v_bias)`` in the forward, exact GELU,
  LayerNorm eps 1e-6, no final norm; then ``ln_vision``, a LayerNorm with torch's default eps
  1e-5 (``blip2.py``; transformers' port normalises with the ViT's 1e-6: see the report note).
* The Q-Former (``Qformer.py``) on the query tokens alone, as ``Blip2OPT/Blip2T5`` call it:
  ``embeddings.LayerNorm`` of the queries, then per layer self-attention, cross-attention to
  the image features in layers ``i % cross_attention_freq == 0``, and the *query* feed-forward
  (``intermediate_query`` / ``output_query``), BERT's post-norm residuals, eps 1e-12.
* ``opt_proj`` / ``t5_proj``, and the language model from transformers (``OPTForCausalLM``;
  ``T5ForConditionalGeneration`` with ``dense_act_fn="gelu"``, as ``blip2_t5.py`` sets it),
  fed ``cat(projected queries, embedded text)`` as LAVIS's ``forward`` and ``generate`` do.

LAVIS runs float32 on the CPU (``load_model_and_preprocess`` calls ``model.float()`` there),
and so does this reference.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ...runtime.generation import with_cache
from .checkpoint import OriginalBlip2
from .language_models import HEAD

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def lavis_eval_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """``blip_image_eval``: ``Resize((size, size), BICUBIC)``, ``ToTensor``, ``Normalize(CLIP mean, std)``; [1, 3, s, s].

    torchvision's ``Resize`` on a PIL image is PIL's own ``resize`` with the same filter.
    """
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((array - mean) / std)[None]


# ------------------------------------------------------------------------------ EVA ViT-g


class EvaAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class EvaMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class EvaBlock(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
        self.attn, self.mlp = EvaAttention(width, heads), EvaMlp(width, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)


class EvaViT(nn.Module):
    """``VisionTransformer.forward_features``: the last block's output, no final norm."""

    def __init__(self, width: int, layers: int, heads: int, hidden: int, patch: int, image: int):
        super().__init__()
        self.patch_embed = PatchEmbed(width, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image // patch) ** 2 + 1, width))
        self.blocks = nn.ModuleList(EvaBlock(width, heads, hidden) for _ in range(layers))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


# ------------------------------------------------------------------------------ Q-Former


class BertSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, kv_width: int):
        super().__init__()
        self.heads, self.head = heads, width // heads
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(kv_width, width), nn.Linear(kv_width, width)

    def split(self, x):
        return x.view(*x.shape[:-1], self.heads, self.head).permute(0, 2, 1, 3)

    def forward(self, x, context):
        q, k, v = self.split(self.query(x)), self.split(self.key(context)), self.split(self.value(context))
        # the extended attention masks are all zeros here: every query and every image position is attended
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head)
        out = scores.softmax(dim=-1) @ v
        return out.permute(0, 2, 1, 3).reshape(*x.shape[:-1], -1)


class BertResidual(nn.Module):
    """``BertSelfOutput`` / ``BertOutput``: dense, then LayerNorm of the sum with the input."""

    def __init__(self, d_in: int, width: int, eps: float):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, width), nn.LayerNorm(width, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, width, heads, kv_width, eps):
        super().__init__()
        setattr(self, "self", BertSelfAttention(width, heads, kv_width))
        self.output = BertResidual(width, width, eps)

    def forward(self, x, context):
        return self.output(getattr(self, "self")(x, context), x)


class BertIntermediate(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.dense = nn.Linear(width, hidden)

    def forward(self, x):
        return F.gelu(self.dense(x))


class QformerLayer(nn.Module):
    def __init__(self, width, heads, hidden, vision_width, cross: bool, eps: float):
        super().__init__()
        self.attention = BertAttention(width, heads, width, eps)
        self.crossattention = BertAttention(width, heads, vision_width, eps) if cross else None
        self.intermediate_query = BertIntermediate(width, hidden)
        self.output_query = BertResidual(hidden, width, eps)

    def forward(self, x, image_embeds):
        x = self.attention(x, x)
        if self.crossattention is not None:
            x = self.crossattention(x, image_embeds)
        return self.output_query(self.intermediate_query(x), x)


class QformerEmbeddings(nn.Module):
    def __init__(self, width, eps):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(width, eps=eps)


class QformerEncoder(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class QformerBert(nn.Module):
    """``Qformer.bert`` called with ``query_embeds`` only (no text): the query path of every layer."""

    def __init__(self, width, layers, heads, hidden, vision_width, freq, eps=1e-12):
        super().__init__()
        self.embeddings = QformerEmbeddings(width, eps)
        self.encoder = QformerEncoder(
            [QformerLayer(width, heads, hidden, vision_width, i % freq == 0, eps) for i in range(layers)])

    def forward(self, query_tokens, image_embeds):
        x = self.embeddings.LayerNorm(query_tokens)
        for layer in self.encoder.layer:
            x = layer(x, image_embeds)
        return x


# ------------------------------------------------------------------------------ the model


class OriginalBlip2Model(nn.Module):
    """An original LAVIS BLIP-2 (OPT or T5), runnable. Build with ``OriginalBlip2Model.load``."""

    def __init__(self, ckpt: OriginalBlip2, vision: dict, qformer: dict, language_model: nn.Module, lm_width: int,
                 num_queries: int, tokenizer):
        super().__init__()
        self.ckpt, self.lm, self.tokenizer = ckpt, ckpt.lm, tokenizer
        self.visual_encoder = EvaViT(vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"],
                                     vision["intermediate_size"], vision["patch_size"], vision["image_size"])
        self.ln_vision = nn.LayerNorm(vision["hidden_size"])  # torch default eps 1e-5, as blip2.py builds it
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, qformer["hidden_size"]))
        self.Qformer = nn.Module()
        self.Qformer.bert = QformerBert(qformer["hidden_size"], qformer["num_hidden_layers"],
                                        qformer["num_attention_heads"], qformer["intermediate_size"],
                                        vision["hidden_size"], qformer["cross_attention_frequency"])
        self.proj = nn.Linear(qformer["hidden_size"], lm_width)
        self.language_model = language_model
        self.image_size = vision["image_size"]
        self.eos_token_id = (tokenizer("\n", add_special_tokens=False).input_ids[0] if self.lm.eos_at_newline
                             else language_model.config.eos_token_id)

    @classmethod
    def load(cls, ckpt: OriginalBlip2, vision: dict, qformer: dict, text_config) -> "OriginalBlip2Model":
        """Build from LAVIS's names. ``vision`` / ``qformer``: sizes (heads included); ``text_config``: the LM's config."""
        import transformers
        from transformers import AutoTokenizer
        from transformers.initialization import no_init_weights

        from ...errors import CheckpointError

        source = ckpt.source
        names = source.keys()
        with no_init_weights():
            lm = getattr(transformers, ckpt.lm.transformers_class)(text_config)
        prefix = ckpt.prefix
        state = {n[len(prefix):]: source.read(n).float() for n in names if n.startswith(prefix)}
        _load_language_model(lm, state, ckpt)
        model = cls(ckpt, vision, qformer, lm.eval(), text_config.hidden_size, source.info("query_tokens").shape[1],
                    AutoTokenizer.from_pretrained(ckpt.lm_folder))
        own = {}
        for name in model.state_dict():
            if name.startswith("language_model."):
                continue
            original = f"{ckpt.lm.original_projection}." + name[len("proj."):] if name.startswith("proj.") else name
            if original not in names:
                raise CheckpointError(f"{ckpt.path}: LAVIS's model needs '{original}', which the checkpoint lacks")
            own[name] = source.read(original).float()
        model.load_state_dict(own, strict=False)
        return model.eval()

    # -------------------------------------------------------------- the image side

    @torch.no_grad()
    def query_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """``inputs_opt`` / ``inputs_t5``: projected Q-Former outputs, [B, queries, LM width]."""
        image_embeds = self.ln_vision(self.visual_encoder(pixels.float()))
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.proj(self.Qformer.bert(queries, image_embeds))

    def prompt_ids(self, text: str) -> list[int]:
        """The language model's tokenisation of a prompt, as LAVIS does it (BOS for OPT, </s> after T5 text)."""
        return self.tokenizer(text).input_ids

    def _embed(self, pixels, text: str):
        queries = self.query_embeds(pixels)
        ids = torch.tensor([self.prompt_ids(text)])
        embeds = torch.cat([queries, self.language_model.get_input_embeddings()(ids)], dim=1)
        return embeds, torch.ones(embeds.shape[:2], dtype=torch.long)

    # -------------------------------------------------------------- LAVIS forward (logits)

    @torch.no_grad()
    def logits(self, pixels, text_input: str, text_output: str | None = None) -> torch.Tensor:
        """``Blip2OPT.forward`` (text + "\\n") / ``Blip2T5.forward`` (labels = text_output) logits, [L, vocab]."""
        embeds, mask = self._embed(pixels, text_input + self.lm.forward_suffix)
        if self.lm.causal:
            return self.language_model(inputs_embeds=embeds, attention_mask=mask).logits[0]
        targets = torch.tensor([self.prompt_ids(text_output or "")])
        targets = targets.masked_fill(targets == self.tokenizer.pad_token_id, -100)
        return self.language_model(inputs_embeds=embeds, attention_mask=mask, labels=targets).logits[0]

    # -------------------------------------------------------------- LAVIS generate (greedy)

    @torch.no_grad()
    def greedy(self, pixels, prompt: str, max_new_tokens: int) -> list[int]:
        """``generate(num_beams=1, use_nucleus_sampling=False)``: new token ids, up to and including EOS.

        OPT: ``min_length=1`` with only ``inputs_embeds`` counts from zero, so EOS (the newline)
        cannot be the first token. T5: the decoder starts from its start token (``min_length=1``
        is met already). The row's ``min_new_tokens`` says which.
        """
        embeds, mask = self._embed(pixels, prompt)
        lm, new = self.language_model, []
        if self.lm.causal:
            out, cache = with_cache(lm, None, inputs_embeds=embeds, attention_mask=mask)
        else:
            encoder = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
            start = lm.config.decoder_start_token_id
            out, cache = with_cache(lm, None, encoder_outputs=encoder, attention_mask=mask,
                                    decoder_input_ids=torch.tensor([[start]]))
        for step in range(max_new_tokens):
            scores = out.logits[0, -1].clone()
            if step < self.lm.min_new_tokens:
                scores[self.eos_token_id] = -math.inf
            token = int(scores.argmax())
            new.append(token)
            if token == self.eos_token_id:
                break
            ids = torch.tensor([[token]])
            if self.lm.causal:
                mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
                out, cache = with_cache(lm, cache, input_ids=ids, attention_mask=mask)
            else:
                out, cache = with_cache(lm, cache, encoder_outputs=encoder, attention_mask=mask, decoder_input_ids=ids)
        return new


def _load_language_model(lm: nn.Module, state: dict, ckpt: OriginalBlip2) -> None:
    """Load the LM's tensors; tied tensors point at one parameter, as in the original module."""
    from ...errors import CheckpointError

    if ckpt.lm.stored_head_is_copy:
        head_tied = lm.config.tie_word_embeddings or HEAD not in state
    else:
        head_tied = bool(ckpt.lm_config.get("tie_word_embeddings", True)) and HEAD not in state
    wanted = {n for n in lm.state_dict() if n not in ckpt.lm.copies and not (head_tied and n == HEAD)}
    missing = sorted(wanted - set(state))
    if missing:
        raise CheckpointError(f"{ckpt.path}: the language model lacks {len(missing)} tensor(s), e.g. "
                              f"'{ckpt.prefix}{missing[0]}'")
    lm.load_state_dict({n: state[n] for n in wanted}, strict=False, assign=True)
    shared = lm.get_input_embeddings().weight
    for copy in ckpt.lm.copies:
        lm.get_submodule(copy.removesuffix(".weight")).weight = shared
    if head_tied:
        lm.lm_head.weight = shared
