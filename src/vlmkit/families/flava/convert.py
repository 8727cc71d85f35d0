"""Original FLAVA + DALL-E codebook -> transformers ``FlavaForPreTraining``, as a table.

Every tensor is a rename (the encoders' inner names are already transformers'); what is not
written is dropped by rule with its reason: the embeddings the original stores twice (its
encoder wrappers hold ``embeddings`` beside ``module``), a recomputed buffer, and the
prediction heads' ``bias``, which is the very tensor of ``decoder.bias``.
"""

from __future__ import annotations

from pathlib import Path

from ...lazy import torch

from ...conversion import Conversion, Rule, drop, rename
from ...options import LoadOptions
from . import hf_output
from .checkpoint import CODEBOOK, OriginalFlava, open_original

# the pre-training heads: original prefix -> transformers prefix
HEADS = {
    "heads.cmd.mim_head.cls.predictions": "mmm_image_head",
    "heads.cmd.mlm_head.cls.predictions": "mmm_text_head",
    "heads.fairseq_mlm.cls.predictions": "mlm_head",
    "heads.imagenet.mim_head.cls.predictions": "mim_head",
}
DUPLICATE = "a second copy of {0}.module.embeddings: the original's encoder wrapper stores them twice"


def _conv(source: str, target: str) -> list[Rule]:
    """A DALL-E ``Conv2d`` (``w``, ``b``) -> ``nn.Conv2d`` (``weight``, ``bias``)."""
    return [rename(f"{CODEBOOK}{source}.w", f"image_codebook.{target}.weight"),
            rename(f"{CODEBOOK}{source}.b", f"image_codebook.{target}.bias")]


RULES = [
    drop("image_encoder.embeddings.{rest:path}", why=DUPLICATE.format("image_encoder")),
    drop("text_encoder.embeddings.{rest:path}", why=DUPLICATE.format("text_encoder")),
    drop("text_encoder.module.embeddings.position_ids", why="a buffer (arange) the model recomputes"),
    # encoders
    rename("image_encoder.module.{rest:path}", "flava.image_model.{rest:path}"),
    rename("text_encoder.module.{rest:path}", "flava.text_model.{rest:path}"),
    rename("mm_encoder.module.encoder.cls_token", "flava.multimodal_model.cls_token"),
    rename("mm_encoder.module.{rest:path}", "flava.multimodal_model.{rest:path}"),
    # projections and the contrastive temperature
    rename("mm_image_projection.{p:path}", "flava.image_to_mm_projection.{p:path}"),
    rename("mm_text_projection.{p:path}", "flava.text_to_mm_projection.{p:path}"),
    rename("image_projection.{p:path}", "flava.image_projection.{p:path}"),
    rename("text_projection.{p:path}", "flava.text_projection.{p:path}"),
    rename("heads.cmd.clip_head.logit_scale", "flava.logit_scale"),
    # heads
    *[r for original, hf in HEADS.items() for r in (
        drop(f"{original}.bias", why="the same tensor as decoder.bias (BERT's prediction head ties them)"),
        rename(f"{original}.{{p:path}}", f"{hf}.{{p:path}}"))],
    rename("heads.cmd.itm_head.pooler.{p:path}", "itm_head.pooler.{p:path}"),  # before cls: reversed, it must win
    rename("heads.cmd.itm_head.cls.{p:path}", "itm_head.{p:path}"),
    # the DALL-E dVAE encoder (dall_e/encoder.py) -> image_codebook
    *_conv("blocks.input", "blocks.input"),
    *_conv("blocks.group_{g}.block_{b}.id_path", "blocks.group_{g}.group.block_{b}.id_path"),
    *_conv("blocks.group_{g}.block_{b}.res_path.conv_{c}", "blocks.group_{g}.group.block_{b}.res_path.path.conv_{c}"),
    *_conv("blocks.output.conv", "blocks.output.conv"),
]


def expected_tensors(hf_config) -> dict[str, tuple[int, ...]]:
    """Every tensor the folder must hold (the heads' tied ``bias`` excluded), from a meta-device model."""
    from transformers import FlavaForPreTraining

    with torch.device("meta"):
        model = FlavaForPreTraining(hf_config)
    tied = set(model.all_tied_weights_keys)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}


def conversion(path: Path, options: LoadOptions) -> Conversion:
    """The conversion of an original FLAVA folder (checkpoint + codebook + tokenizer) to a transformers folder."""
    ckpt = open_original(path)
    target = hf_output.target_for(ckpt, options)
    stored = options.dtype or ckpt.source.info("image_projection.weight").dtype
    config = target.hf_config
    summary = (f"FLAVA ({ckpt.path.name}: image {config.image_config.image_size}px / {config.image_config.patch_size}, "
               f"encoders {config.image_config.num_hidden_layers}+{config.text_config.num_hidden_layers}+"
               f"{config.multimodal_config.num_hidden_layers} layers; codebook {ckpt.codebook_path.name}, "
               f"{ckpt.codebook_form})")
    return Conversion(ckpt.source, RULES, expected=expected_tensors(config),
                      write_extras=lambda folder: hf_output.write(folder, target, stored), summary=summary)


def describe(ckpt: OriginalFlava) -> dict:
    return {"codebook": f"{ckpt.codebook_path.name} ({ckpt.codebook_form})"}
