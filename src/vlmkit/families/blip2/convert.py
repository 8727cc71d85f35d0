"""Original BLIP-2 (LAVIS) -> transformers ``Blip2ForConditionalGeneration``, as a table.

The names on the left are LAVIS's (``eva_vit.py``, ``Qformer.py``, ``blip2_opt.py`` /
``blip2_t5.py``), on the right transformers' (the layout of the published ``Salesforce/blip2-*``
repositories, which transformers 5 saves unchanged). Two things are not renames:

* EVA's attention has a bias for q and v only (``q_bias``, ``v_bias``) and builds the qkv bias
  in its forward as ``cat(q_bias, zeros, v_bias)``; transformers stores that fused bias, so the
  converter fuses once, with the same zero k bias.
* Parts LAVIS builds but never runs for generation are dropped by rule, each with its reason.
"""

from __future__ import annotations

from ...lazy import torch

from ...conversion import Conversion, Custom, Rule, drop, rename, transform
from ...options import LoadOptions
from . import hf_output
from .checkpoint import UNUSED_VIT, OriginalBlip2, open_original
from .language_models import HEAD, HF_PREFIX, HF_PROJECTION, LanguageModel


def _split_qv(tensors):
    (qkv,) = tensors
    q, _, v = torch.chunk(qkv, 3)
    return [q.contiguous(), v.contiguous()]


def _fuse_qv(tensors):
    q, v = tensors
    return [torch.cat((q, torch.zeros_like(v), v))]  # eva_vit.py Attention.forward


def _fuse_qv_shapes(shapes):
    q, v = shapes
    if q != v or len(q) != 1:
        raise ValueError(f"q_bias {list(q)} and v_bias {list(v)} must be equal 1-d shapes")
    return [(3 * q[0],)]


FUSE_QV_BIAS = Custom("cat(q_bias, zeros, v_bias)", _fuse_qv, _fuse_qv_shapes, n_in=2, n_out=1,
                      inverse_op=Custom("split qkv bias into q_bias, v_bias", _split_qv,
                                        lambda s: [(s[0][0] // 3,)] * 2, n_in=1, n_out=2))

LAYER = "Qformer.bert.encoder.layer.{i}"
UNUSED_QFORMER = "LAVIS sets it to None in Blip2OPT/Blip2T5 (generation runs the Q-Former on the queries alone)"

RULES = [
    # EVA ViT-g (eva_vit.py VisionTransformer) -> vision_model
    rename("visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),
    rename("visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),
    rename("visual_encoder.patch_embed.proj.{p:path}", "vision_model.embeddings.patch_embedding.{p:path}"),
    rename("visual_encoder.blocks.{i}.norm1.{p:path}", "vision_model.encoder.layers.{i}.layer_norm1.{p:path}"),
    rename("visual_encoder.blocks.{i}.norm2.{p:path}", "vision_model.encoder.layers.{i}.layer_norm2.{p:path}"),
    rename("visual_encoder.blocks.{i}.attn.qkv.weight", "vision_model.encoder.layers.{i}.self_attn.qkv.weight"),
    transform(["visual_encoder.blocks.{i}.attn.q_bias", "visual_encoder.blocks.{i}.attn.v_bias"],
              "vision_model.encoder.layers.{i}.self_attn.qkv.bias", FUSE_QV_BIAS),
    rename("visual_encoder.blocks.{i}.attn.proj.{p:path}", "vision_model.encoder.layers.{i}.self_attn.projection.{p:path}"),
    rename("visual_encoder.blocks.{i}.mlp.{p:path}", "vision_model.encoder.layers.{i}.mlp.{p:path}"),
    drop(UNUSED_VIT + "{rest:path}", why="not a module of LAVIS's EVA ViT (its load_state_dict(strict=False) skips it)"),
    # Blip2Base.ln_vision: the LayerNorm after the ViT -> the vision model's post_layernorm
    rename("ln_vision.{p:path}", "vision_model.post_layernorm.{p:path}"),
    # Q-Former (Qformer.py BertModel; cross-attention every cross_attention_freq layers)
    rename("query_tokens", "query_tokens"),
    rename("Qformer.bert.embeddings.LayerNorm.{p:path}", "qformer.layernorm.{p:path}"),
    drop("Qformer.bert.embeddings.word_embeddings.weight", why=f"text input of the Q-Former; {UNUSED_QFORMER}"),
    drop("Qformer.bert.embeddings.position_embeddings.weight", why=f"text positions of the Q-Former; {UNUSED_QFORMER}"),
    drop("Qformer.bert.embeddings.position_ids", why="a buffer (arange) the model recomputes"),
    drop("Qformer.cls.{rest:path}", why=f"the Q-Former's language-modelling head from pre-training; {UNUSED_QFORMER}"),
    drop(LAYER + ".intermediate.{p:path}", why=f"the text feed-forward of the layer; {UNUSED_QFORMER}"),
    drop(LAYER + ".output.{p:path}", why=f"the text feed-forward of the layer; {UNUSED_QFORMER}"),
    rename(LAYER + ".attention.self.{p:path}", "qformer.encoder.layer.{i}.attention.attention.{p:path}"),
    rename(LAYER + ".crossattention.self.{p:path}", "qformer.encoder.layer.{i}.crossattention.attention.{p:path}"),
    rename(LAYER + ".{rest:path}", "qformer.encoder.layer.{i}.{rest:path}"),  # *.output.*, *_query.*
    # stage-1 heads a checkpoint may still carry; Blip2OPT/Blip2T5 have no such modules
    drop("vision_proj.{p:path}", why="stage-1 image-text contrastive projection, not part of Blip2OPT/Blip2T5"),
    drop("text_proj.{p:path}", why="stage-1 image-text contrastive projection, not part of Blip2OPT/Blip2T5"),
    drop("itm_head.{p:path}", why="stage-1 image-text matching head, not part of Blip2OPT/Blip2T5"),
    drop("temp", why="stage-1 contrastive temperature, not part of Blip2OPT/Blip2T5"),
]


def language_model_rules(lm: LanguageModel, tie_lm_head: bool) -> list[Rule]:
    """The language model's rules, from its row: its copies of one tensor and a tied output layer dropped,
    then the projection into it and the language model itself renamed."""
    p = lm.original_prefix
    embedding = p + lm.embedding
    copies = [drop(p + c, why=f"the same tensor as {embedding} ({lm.copies_why})") for c in lm.copies]
    head = [drop(p + HEAD, why=lm.head_why)] if tie_lm_head else []
    return copies + head + [rename(lm.original_projection + ".{p:path}", HF_PROJECTION + ".{p:path}"),
                            rename(p + "{rest:path}", HF_PREFIX + "{rest:path}")]


def rules_for(tie_lm_head: bool, lm: LanguageModel) -> list[Rule]:
    """The table: the common rules, then the language model's."""
    return RULES + language_model_rules(lm, tie_lm_head)


def untied_duplicates(lm: LanguageModel, tie_lm_head: bool) -> set[str]:
    """Target names transformers ties to another tensor and that the folder therefore does not store."""
    return {HF_PREFIX + n for n in lm.copies + ((HEAD,) if tie_lm_head else ())}


def expected_tensors(hf_config, lm: LanguageModel, tie_lm_head: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor the folder must hold, with its shape (a meta-device model: no memory)."""
    from transformers import Blip2ForConditionalGeneration

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(hf_config)
    skip = untied_duplicates(lm, tie_lm_head)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in skip}


def conversion(path, options: LoadOptions) -> Conversion:
    """The conversion of an original LAVIS BLIP-2 checkpoint (any form) to a transformers folder."""
    ckpt = open_original(path, options)
    target = hf_output.target_for(ckpt, options)
    expected = expected_tensors(target.hf_config, ckpt.lm, target.tie_lm_head)
    # transformers keeps these in float32 whatever the dtype (Blip2's _keep_in_fp32_modules)
    keep = frozenset(n for n in expected if n == "query_tokens" or n.startswith("qformer."))
    stored = options.dtype or ckpt.source.info(lm_embedding(ckpt)).dtype  # the bulk of the model: the LM's
    summary = (f"BLIP-2 {ckpt.lm.title} ({ckpt.form} checkpoint; "
               f"image {target.image_size}px, {target.hf_config.num_query_tokens} queries, "
               f"Q-Former {target.hf_config.qformer_config.num_hidden_layers} layers with cross-attention every "
               f"{target.hf_config.qformer_config.cross_attention_frequency})" + "".join(f"; {n}" for n in ckpt.notes))
    return Conversion(ckpt.source, rules_for(target.tie_lm_head, ckpt.lm), expected=expected, keep_dtype=keep,
                      write_extras=lambda folder: hf_output.write(folder, target, stored), summary=summary)


def lm_embedding(ckpt: OriginalBlip2) -> str:
    """The language model's input embedding, under LAVIS's names."""
    return ckpt.prefix + ckpt.lm.embedding


def describe(ckpt: OriginalBlip2) -> dict:
    return {"blip2 form": ckpt.form, "language model": ckpt.lm.name, "language model folder": str(ckpt.lm_folder)}
