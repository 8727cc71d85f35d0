"""Original BLIP-2 stage-1 (LAVIS) -> transformers ``Blip2ForImageTextRetrieval``, as a table.

Target names are the published ``Salesforce/blip2-itm-vit-g`` layout (transformers' conversion
script ``convert_blip_2_original_to_pytorch.py`` with ``blip2-itm-vit-g[-coco]``). The EVA ViT-g,
``ln_vision`` and Q-Former rows are the ``blip2`` family's table, imported; this family adds, in
front of it (the engine gives a tensor to the first rule that matches), what the retrieval
model keeps and ``Blip2OPT`` / ``Blip2T5`` do not run:

* the Q-Former's word and position embeddings, which transformers keeps *outside* the Q-Former
  (``embeddings.*``; the embeddings' LayerNorm stays ``qformer.layernorm``);
* each layer's text feed-forward (``intermediate`` / ``output``, next to the ``*_query`` ones);
* the heads: ``vision_proj`` / ``text_proj`` -> ``vision_projection`` / ``text_projection``, ``itm_head``.

Dropped, each with its reason: ``Qformer.cls.*`` and ``temp`` (the two tensors the transformers
script lists as unexpected), and the ``position_ids`` buffer (the ``blip2`` table's row).
"""

from __future__ import annotations

from ...conversion import Conversion, drop, rename
from ...lazy import torch
from ...options import LoadOptions
from ..blip2.checkpoint import UNUSED_VIT
from ..blip2.convert import LAYER, RULES as BLIP2_RULES
from . import hf_output
from .checkpoint import open_original

RETRIEVAL_RULES = [
    rename("Qformer.bert.embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
    rename("Qformer.bert.embeddings.position_embeddings.weight", "embeddings.position_embeddings.weight"),
    rename(LAYER + ".intermediate.{p:path}", "qformer.encoder.layer.{i}.intermediate.{p:path}"),
    rename(LAYER + ".output.{p:path}", "qformer.encoder.layer.{i}.output.{p:path}"),
    rename("vision_proj.{p:path}", "vision_projection.{p:path}"),
    rename("text_proj.{p:path}", "text_projection.{p:path}"),
    rename("itm_head.{p:path}", "itm_head.{p:path}"),
    drop("Qformer.cls.{rest:path}", why="the Q-Former's language-modelling head, used only by the stage-1 captioning "
                                        "loss; Blip2ForImageTextRetrieval has no such module"),
    drop("temp", why="the contrastive temperature: only the training loss divides by it; the ITC score of "
                     "blip2_image_text_matching is the undivided similarity, and the transformers model has no temp"),
]
# the blip2 family's EVA ViT-g, ln_vision, query_tokens and Q-Former rows (its language-model rows do not apply)
SHARED_PREFIXES = ("visual_encoder.", UNUSED_VIT, "ln_vision.", "query_tokens", "Qformer.bert.")
RULES = RETRIEVAL_RULES + [r for r in BLIP2_RULES if r.sources and r.sources[0].text.startswith(SHARED_PREFIXES)]


def expected_tensors(hf_config) -> dict[str, tuple[int, ...]]:
    """Every tensor the folder must hold, with its shape (a meta-device model: no memory)."""
    from transformers import Blip2ForImageTextRetrieval

    with torch.device("meta"):
        model = Blip2ForImageTextRetrieval(hf_config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def conversion(path, options: LoadOptions) -> Conversion:
    """The conversion of an original LAVIS BLIP-2 stage-1 checkpoint (any form) to a transformers folder."""
    ckpt = open_original(path, options)
    target = hf_output.target_for(ckpt, options)
    cfg = target.hf_config
    expected = expected_tensors(cfg)
    # transformers keeps these in float32 whatever the dtype (Blip2ForImageTextRetrieval._keep_in_fp32_modules)
    keep = frozenset(n for n in expected if n == "query_tokens" or n.startswith("qformer."))
    stored = options.dtype or ckpt.source.info("visual_encoder.blocks.0.mlp.fc1.weight").dtype  # the bulk: the ViT
    summary = (f"BLIP-2 retrieval ({ckpt.form} checkpoint; image {target.image_size}px, {cfg.num_query_tokens} "
               f"queries, Q-Former {cfg.qformer_config.num_hidden_layers} layers with cross-attention every "
               f"{cfg.qformer_config.cross_attention_frequency}, embeddings {cfg.image_text_hidden_size} wide)"
               + "".join(f"; {n}" for n in ckpt.notes))
    return Conversion(ckpt.source, RULES, expected=expected, keep_dtype=keep,
                      write_extras=lambda folder: hf_output.write(folder, target, stored), summary=summary)
