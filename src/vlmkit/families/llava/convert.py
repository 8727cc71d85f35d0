"""Original LLaVA -> transformers ``Llava`` / ``LlavaNext``, in the published llava-hf layout.

The rules below are the whole mapping. The target config is derived from the
checkpoint's own files (never downloaded), the new vocabulary rows follow the
transformers conversion scripts (a normal distribution with the embeddings' mean and
1e-5 x their covariance, vocabulary padded to a multiple of 64), and the folder gets a
tokenizer, an image processor and a chat template that reproduce the original's ids
and pixels (``vlmkit verify`` proves it).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...lazy import torch

from ...conversion import Conversion, ResizeRows, Rule, create, drop, lora_merge, rename, transform
from ...errors import ConfigError
from ...options import LoadOptions
from ...tensors import TensorSource, row_reader
from . import hf_output, layout
from .checkpoint import TOWER, UNUSED_CLIP, OriginalCheckpoint, open_original
from .hf_output import PAD_TOKEN, Target

class EmbeddingDistribution:
    """New vocabulary rows as the transformers conversion scripts draw them.

    ``N(mu, 1e-5 * Sigma)`` with the mean and (biased, ``/ n``) covariance of the existing
    input embeddings; the scripts use that same distribution for the ``lm_head`` rows.

    Sigma is never formed: with ``C`` the ``n`` centred embedding rows, ``Sigma = C^T C / n``,
    and for ``w ~ N(0, I_n)`` the vector ``w^T C`` has covariance ``C^T C``; so
    ``mu + sqrt(1e-5 / n) * w^T C`` is exactly a draw of the scripts' distribution. That is
    one pass over the embeddings (n x d x rows multiply-adds) instead of the n x d x d of the
    covariance and a d x d factorisation, which cost a 7B conversion as long as its copying.
    """

    reads_rows = False  # it reads the embeddings from the source itself, never the rows it is handed

    def __init__(self, source: TensorSource, name: str):
        self.source, self.name = source, name

    def __call__(self, existing: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        rows, width = self.source.info(self.name).shape
        read = row_reader(self.source, self.name)
        w = torch.randn((n, rows), generator=generator)
        total, projected = torch.zeros(width), torch.zeros(n, width)
        # in slices read one at a time: the lm_head's step holds no second copy of the embeddings
        for start in range(0, rows, 4096):
            chunk = read(start, start + 4096).float()
            total += chunk.sum(0)
            projected += w[:, start:start + 4096] @ chunk
        mu = total / rows
        # w^T C = w^T E - (sum of w) mu
        return mu + (projected - w.sum(1, keepdim=True) * mu) * (1e-5 / rows) ** 0.5


def _projector_rules(ckpt: OriginalCheckpoint, hidden: int) -> tuple[list[Rule], str]:
    """Rules for ``model.mm_projector.*`` and the activation transformers must use between its two linears.

    transformers' Llava projector is Linear -> act -> Linear. mlp2x_gelu maps one to one;
    a single Linear (``linear``, ``mlp1x_gelu``) becomes Linear -> identity -> I, and
    ``identity`` becomes I -> identity -> I, both exact.
    """
    depth = ckpt.projector_depth
    eye = lambda n: (lambda: torch.eye(n))  # noqa: E731
    zeros = lambda n: (lambda: torch.zeros(n))  # noqa: E731
    if depth == 2:
        return [rename("model.mm_projector.0.{p:path}", "multi_modal_projector.linear_1.{p:path}"),
                rename("model.mm_projector.2.{p:path}", "multi_modal_projector.linear_2.{p:path}")], "gelu"
    second = [create("multi_modal_projector.linear_2.weight", (hidden, hidden), eye(hidden),
                     why="a one-layer projector: the second linear is the identity"),
              create("multi_modal_projector.linear_2.bias", (hidden,), zeros(hidden), why="identity projector")]
    if depth == 1:
        prefix = "model.mm_projector.0" if any(k.startswith("model.mm_projector.0.") for k in ckpt.source.keys()) \
            else "model.mm_projector"
        return [rename(prefix + ".{p:path}", "multi_modal_projector.linear_1.{p:path}")] + second, "linear"
    if depth == 0:
        width = ckpt.config.get("mm_hidden_size", hidden)
        if width != hidden:
            raise ConfigError(f"{ckpt.path}: an identity projector needs mm_hidden_size ({width}) == hidden_size ({hidden})")
        return [create("multi_modal_projector.linear_1.weight", (hidden, hidden), eye(hidden), why="identity projector"),
                create("multi_modal_projector.linear_1.bias", (hidden,), zeros(hidden), why="identity projector")] \
            + second, "linear"
    raise ConfigError(f"{ckpt.path}: mm_projector_type {ckpt.config['mm_projector_type']!r} has {depth} linear layers; "
                      "transformers' Llava projector has two, so it cannot be converted without changing the model")


def rules_for(ckpt: OriginalCheckpoint, vocab_rows: int, seed: int) -> tuple[list[Rule], str]:
    """The conversion, as a table. Returns (rules, projector activation)."""
    embed = "model.embed_tokens.weight"
    rows = ckpt.source.info(embed).shape[0]
    hidden = ckpt.source.info(embed).shape[1]
    init = EmbeddingDistribution(ckpt.source, embed)
    projector, act = _projector_rules(ckpt, hidden)
    lora = [transform([module + ".weight", module + ".lora_A.weight", module + ".lora_B.weight"],
                      "language_model." + module + ".weight", lora_merge(ckpt.lora.scale))
            for module in (ckpt.lora.modules if ckpt.lora else [])]
    rules = [
        drop("model.layers.{layer}.self_attn.rotary_emb.inv_freq", why="recomputed from rope_theta at load"),
        drop(TOWER + "embeddings.position_ids", why="a buffer transformers recomputes"),
        drop(UNUSED_CLIP + "{rest:path}", why="only CLIP's vision tower is part of LLaVA"),
        *lora,
        *([transform(embed, "language_model.model.embed_tokens.weight", ResizeRows(rows, vocab_rows, init, seed)),
           transform("lm_head.weight", "language_model.lm_head.weight", ResizeRows(rows, vocab_rows, init, seed + 1))]
          if vocab_rows != rows else  # Qwen: <image> fits in the padded rows
          [rename(embed, "language_model.model.embed_tokens.weight"),
           rename("lm_head.weight", "language_model.lm_head.weight")]),
        *projector,
        rename("model.image_newline", "image_newline"),
        rename(TOWER + "{rest:path}", "vision_tower.vision_model.{rest:path}"),
        rename("model.{rest:path}", "language_model.model.{rest:path}"),
    ]
    return rules, act


def expected_tensors(hf_config) -> dict[str, tuple[int, ...]]:
    """Every tensor the target model has, with its shape, under the published names (meta device: no memory)."""
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    cls = LlavaNextForConditionalGeneration if hf_config.model_type == "llava_next" else LlavaForConditionalGeneration
    with torch.device("meta"):
        model = cls(hf_config)
    state = model.state_dict()
    return {new: tuple(state[old].shape) for old, new in layout.published_names(state, cls.__name__).items()}


def conversion(path: Path, options: LoadOptions) -> Conversion:
    """The conversion of an original LLaVA checkpoint (any form) to a transformers folder."""
    ckpt = open_original(path, options)
    from . import onevision

    if onevision.is_onevision(ckpt):  # transformers' LlavaOnevision: its own config, tokenizer and processor
        return onevision.conversion(ckpt, options)
    target = hf_output.target_for(ckpt, options)
    rows = target.hf_config.text_config.vocab_size
    _check_vocabulary(ckpt, target)
    rules, act = rules_for(ckpt, rows, options.seed)
    if act != target.hf_config.projector_hidden_act:
        target.hf_config.projector_hidden_act = act
    summary = (f"LLaVA{'-NeXT' if ckpt.is_next else '-1.5'} ({ckpt.form} checkpoint, {ckpt.backbone} backbone, "
               f"{ckpt.config.get('mm_projector_type', 'linear')} projector, template {target.template})"
               + "".join(f"; {n}" for n in ckpt.notes))
    dtype = options.dtype or (ckpt.lora.base_dtype if ckpt.lora else None)
    return Conversion(ckpt.source, rules, expected=expected_tensors(target.hf_config), dtype=dtype,
                      write_extras=lambda folder: hf_output.write(folder, ckpt, target, dtype), summary=summary,
                      assumptions=list(ckpt.assumptions))


def _check_vocabulary(ckpt: OriginalCheckpoint, target: Target) -> None:
    rows = ckpt.source.info("model.embed_tokens.weight").shape[0]
    head = ckpt.source.info("lm_head.weight").shape[0] if "lm_head.weight" in ckpt.source.keys() else rows
    config_vocab = ckpt.config.get("vocab_size", rows)
    base_tokens = len(target.tokenizer) - 1 - (1 if target.tokenizer.pad_token == PAD_TOKEN else 0)
    if rows != head or rows != config_vocab:
        raise ConfigError(f"{ckpt.path}: the vocabulary does not match: embed_tokens has {rows} rows, lm_head {head}, "
                          f"config.json vocab_size is {config_vocab}",
                          hint="the weights and config.json come from different models")
    if base_tokens > rows:
        raise ConfigError(f"{ckpt.tokenizer_folder}: the tokenizer has {base_tokens} tokens but the model's embedding "
                          f"has {rows} rows", hint="use the tokenizer the model was trained with")


def describe(ckpt: OriginalCheckpoint) -> dict:
    return {"form": ckpt.form, "backbone": ckpt.backbone, "version": "NeXT" if ckpt.is_next else "1.5",
            "vision_tower": json.dumps({k: ckpt.vision_config.get(k) for k in ("hidden_size", "num_hidden_layers",
                                                                                 "image_size", "patch_size")})}
