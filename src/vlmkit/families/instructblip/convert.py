"""Original InstructBLIP (LAVIS) -> transformers ``InstructBlipForConditionalGeneration``, as a table.

Names on the left are LAVIS's, on the right those of the published ``Salesforce/instructblip-*``
repositories (transformers' conversion script ``convert_instructblip_original_to_pytorch.py``).
The EVA ViT-g rules (with the fused ``cat(q_bias, zeros, v_bias)``) are plain BLIP-2's, imported
from ``families.blip2.convert``. Unlike BLIP-2's, InstructBLIP's Q-Former keeps its text side
(word and position embeddings, each layer's text feed-forward): it reads the instruction.

The two rows Vicuna's embedding and output layer gain from a release (``[PAD]``, id 32000, which LAVIS
adds with ``resize_token_embeddings`` and never releases, and transformers' ``<image>``, id 32001) are
written as the mean of the 32,000 trained rows, in both. Why: LAVIS's own row is a random draw of whatever
transformers version resized it (no release holds it), so any value is a choice; the mean is
deterministic, and as an output row it can never win a greedy step (its logit is the mean of the
trained tokens' logits, so at most their maximum, and an argmax tie goes to the lower, trained id).
As an input row it is never read: ``[PAD]`` positions are masked and ``<image>`` positions are
replaced by the Q-Former's outputs. A full state dict holds LAVIS's ``[PAD]`` row (32,001 rows): it
is kept, and only ``<image>`` is new (the mean of the 32,001).
"""

from __future__ import annotations

from ...conversion import Conversion, ResizeRows, Rule, drop, rename, transform
from ...lazy import torch
from ...options import LoadOptions
from ..blip2.checkpoint import UNUSED_VIT
from ..blip2.convert import RULES as BLIP2_RULES
from . import hf_output
from .checkpoint import OriginalInstructBlip, open_original

# EVA ViT-g and ln_vision: exactly plain BLIP-2's rules
VISION_RULES = [r for r in BLIP2_RULES if r.name.startswith(("visual_encoder.", UNUSED_VIT, "ln_vision."))]

LAYER = "Qformer.bert.encoder.layer.{i}"
QFORMER_RULES = [
    rename("query_tokens", "query_tokens"),
    rename("Qformer.bert.embeddings.LayerNorm.{p:path}", "qformer.embeddings.layernorm.{p:path}"),
    rename("Qformer.bert.embeddings.word_embeddings.weight", "qformer.embeddings.word_embeddings.weight"),
    rename("Qformer.bert.embeddings.position_embeddings.weight", "qformer.embeddings.position_embeddings.weight"),
    drop("Qformer.bert.embeddings.position_ids", why="a buffer (arange) LAVIS's runner saves; the model recomputes it"),
    rename(LAYER + ".attention.self.{p:path}", "qformer.encoder.layer.{i}.attention.attention.{p:path}"),
    rename(LAYER + ".crossattention.self.{p:path}", "qformer.encoder.layer.{i}.crossattention.attention.{p:path}"),
    # *.output.*, intermediate / output (text), intermediate_query / output_query (queries)
    rename(LAYER + ".{rest:path}", "qformer.encoder.layer.{i}.{rest:path}"),
]


def mean_rows(existing: "torch.Tensor", n: int, generator) -> "torch.Tensor":
    """New rows = the mean of the trained rows (module docstring says why)."""
    return existing.float().mean(dim=0, keepdim=True).expand(n, -1).to(existing.dtype).clone()


def language_model_rules(ckpt: OriginalInstructBlip, target: hf_output.Target) -> list[Rule]:
    p = ckpt.prefix
    if ckpt.lm.causal:
        grow = ResizeRows(target.trained_rows, target.rows, mean_rows)
        head = [] if target.tie_lm_head else [transform(p + "lm_head.weight", "language_model.lm_head.weight", grow)]
        return [drop(p + "model.layers.{i}.self_attn.rotary_emb.inv_freq",
                     why="a buffer LAVIS's LLaMA (modeling_llama.py) saves; transformers recomputes it from rope_theta"),
                transform(p + "model.embed_tokens.weight", "language_model.model.embed_tokens.weight", grow),
                *head,
                rename("llm_proj.{p:path}", "language_projection.{p:path}"),
                rename(p + "{rest:path}", "language_model.{rest:path}")]
    copies = [drop(p + f"{part}.embed_tokens.weight", why=f"the same tensor as {p}shared.weight (T5 ties them)")
              for part in ("encoder", "decoder")]
    head = [drop(p + "lm_head.weight", why="the same tensor as shared.weight (tie_word_embeddings)")] \
        if target.tie_lm_head else []
    return copies + head + [rename("t5_proj.{p:path}", "language_projection.{p:path}"),
                            rename(p + "{rest:path}", "language_model.{rest:path}")]


def rules_for(ckpt: OriginalInstructBlip, target: hf_output.Target) -> list[Rule]:
    return VISION_RULES + QFORMER_RULES + language_model_rules(ckpt, target)


def expected_tensors(target: hf_output.Target) -> dict[str, tuple[int, ...]]:
    """Every tensor the folder must hold, with its shape (a meta-device model: no memory)."""
    from transformers import InstructBlipForConditionalGeneration

    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(target.hf_config)
    causal = target.hf_config.use_decoder_only_language_model
    skip = set() if causal else {f"language_model.{part}.embed_tokens.weight" for part in ("encoder", "decoder")}
    if target.tie_lm_head:
        skip.add("language_model.lm_head.weight")
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in skip}


def conversion(path, options: LoadOptions) -> Conversion:
    """The conversion of an InstructBLIP release (with its parts) to a transformers folder."""
    ckpt = open_original(path, options)
    target = hf_output.target_for(ckpt, options)
    expected = expected_tensors(target)
    keep = frozenset({"query_tokens"})  # InstructBlip's _keep_in_fp32_modules
    stored = options.dtype or ckpt.source.info(ckpt.prefix + ckpt.lm.embedding).dtype  # the bulk: the LM's
    cfg = target.hf_config
    new = ("[PAD]", "<image>")[target.trained_rows - target.rows:]  # a full state dict holds [PAD]'s row
    rows = (f"; embedding {target.trained_rows} -> {target.rows} rows ({', '.join(new)}: the mean of the trained rows)"
            if target.rows != target.trained_rows else "")
    summary = (f"InstructBLIP {ckpt.lm.title} (image {target.image_size}px, {cfg.num_query_tokens} queries, "
               f"Q-Former {cfg.qformer_config.num_hidden_layers} layers reading the instruction{rows})"
               + "".join(f"; {n}" for n in ckpt.notes))
    return Conversion(ckpt.source, rules_for(ckpt, target), expected=expected, keep_dtype=keep,
                      write_extras=lambda folder: hf_output.write(folder, target, stored), summary=summary)
