"""The non-tensor side of a converted FLAVA folder: ``FlavaConfig`` and ``FlavaProcessor``.

Sizes come from the checkpoint's shapes (widths, depths, vocabularies, image and patch size,
the codebook's width and vocabulary, the projection width); the head counts, which no shape
tells, default to FLAVA's 64-wide heads (12 at width 768), the rest to FLAVA's constants
(GELU, LayerNorm eps 1e-12). ``--config`` (a transformers ``FlavaConfig``) overrides any of it.
The processor is transformers' ``FlavaImageProcessor`` at the derived sizes (the codebook sees
the image at 8 x the patch grid, 112 for 224 / 16) with the folder's BERT tokenizer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from ...conversion.hf_files import write_hf_files
from ...errors import ConfigError
from ...options import LoadOptions, deep_merge
from .checkpoint import CODEBOOK, OriginalFlava

HEAD_DIM = 64  # FLAVA: 768 wide, 12 heads


@dataclass
class Target:
    hf_config: object
    processor: object


def _layers(ckpt: OriginalFlava, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    found = sorted({int(m.group(1)) for n in ckpt.source.keys() if (m := pattern.match(n))})
    if found != list(range(len(found))):
        raise ConfigError(f"{ckpt.path}: the layers under {prefix} are {found}, not 0..{len(found) - 1}",
                          hint="the checkpoint is incomplete; download or copy it again")
    return len(found)


def _encoder(ckpt: OriginalFlava, prefix: str) -> dict:
    hidden = ckpt.shape(prefix + "encoder.layer.0.attention.attention.query.weight")[0]
    return {"hidden_size": hidden, "num_hidden_layers": _layers(ckpt, prefix),
            "num_attention_heads": max(1, hidden // HEAD_DIM),
            "intermediate_size": ckpt.shape(prefix + "encoder.layer.0.intermediate.dense.weight")[0],
            "hidden_act": "gelu", "layer_norm_eps": 1e-12,
            "qkv_bias": prefix + "encoder.layer.0.attention.attention.query.bias" in ckpt.source.keys()}


def derived_config(ckpt: OriginalFlava) -> dict:
    """``FlavaConfig`` fields from the shapes (see the module docstring)."""
    names = set(ckpt.source.keys())
    image = _encoder(ckpt, "image_encoder.module.")
    patch = ckpt.shape("image_encoder.module.embeddings.patch_embeddings.projection.weight")[-1]
    positions = ckpt.shape("image_encoder.module.embeddings.position_embeddings")[1]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ConfigError(f"{ckpt.path}: image position embeddings hold {positions} rows, not 1 + a square grid")
    image.update(image_size=side * patch, patch_size=patch,
                 mask_token="image_encoder.module.embeddings.mask_token" in names,
                 vocab_size=ckpt.shape("heads.imagenet.mim_head.cls.predictions.decoder.weight")[0])
    text = _encoder(ckpt, "text_encoder.module.")
    text.update(vocab_size=ckpt.shape("text_encoder.module.embeddings.word_embeddings.weight")[0],
                max_position_embeddings=ckpt.shape("text_encoder.module.embeddings.position_embeddings.weight")[0],
                type_vocab_size=ckpt.shape("text_encoder.module.embeddings.token_type_embeddings.weight")[0])
    multimodal = _encoder(ckpt, "mm_encoder.module.")
    multimodal["use_cls_token"] = "mm_encoder.module.encoder.cls_token" in names
    groups = sorted({int(m.group(1)) for n in names if (m := re.match(re.escape(CODEBOOK) + r"blocks\.group_(\d+)\.", n))})
    blocks = {int(m.group(1)) for n in names if (m := re.match(re.escape(CODEBOOK) + r"blocks\.group_1\.block_(\d+)\.", n))}
    codebook = {"hidden_size": ckpt.shape(CODEBOOK + "blocks.input.w")[0],
                "input_channels": ckpt.shape(CODEBOOK + "blocks.input.w")[1],
                "vocab_size": ckpt.shape(CODEBOOK + "blocks.output.conv.w")[0],
                "num_groups": len(groups), "num_blocks_per_group": len(blocks)}
    if codebook["vocab_size"] != image["vocab_size"]:
        raise ConfigError(f"the codebook {ckpt.codebook_path.name} has {codebook['vocab_size']} codes but "
                          f"{ckpt.path.name}'s masked-image head predicts {image['vocab_size']}",
                          hint="the codebook is not the one this FLAVA was trained with (DALL-E's has 8192)")
    return {"image_config": image, "text_config": text, "multimodal_config": multimodal,
            "image_codebook_config": codebook, "hidden_size": ckpt.shape("heads.cmd.itm_head.pooler.dense.weight")[0],
            "projection_dim": ckpt.shape("image_projection.weight")[0], "init_codebook": True}



def hf_config(ckpt: OriginalFlava, options: LoadOptions):
    """The derived config with ``--config`` on top; widths and depths must still match the weights."""
    from transformers import FlavaConfig

    derived = derived_config(ckpt)
    override = options.config or {}
    for sub in ("image_config", "text_config", "multimodal_config"):
        for key in ("hidden_size", "num_hidden_layers", "intermediate_size"):
            value = (override.get(sub) or {}).get(key)
            if value is not None and value != derived[sub][key]:
                raise ConfigError(f"--config sets {sub}.{key}={value} but {ckpt.path.name} has {derived[sub][key]}",
                                  hint=f"remove {sub}.{key} from --config, or pass the checkpoint it describes")
    merged = deep_merge(derived, override)
    for key in ("model_type", "architectures", "transformers_version"):
        merged.pop(key, None)
    return FlavaConfig(**merged)


def target_for(ckpt: OriginalFlava, options: LoadOptions) -> Target:
    from transformers import BertTokenizer, FlavaProcessor
    from transformers.models.flava.image_processing_pil_flava import FlavaImageProcessorPil

    config = hf_config(ckpt, options)
    image = config.image_config
    grid = image.image_size // image.patch_size
    book = grid * 8  # three 2x poolings: the codebook's token grid is the patch grid
    image_processor = FlavaImageProcessorPil(
        size={"height": image.image_size, "width": image.image_size},
        crop_size={"height": image.image_size, "width": image.image_size},
        codebook_size={"height": book, "width": book}, codebook_crop_size={"height": book, "width": book},
        input_size_patches=grid)
    tokenizer = BertTokenizer.from_pretrained(ckpt.folder)  # FLAVA's text side is bert-base-uncased's
    if len(tokenizer) > config.text_config.vocab_size:
        raise ConfigError(f"{ckpt.folder}: the tokenizer has {len(tokenizer)} tokens but the text encoder's embedding "
                          f"{config.text_config.vocab_size} rows", hint="use bert-base-uncased's tokenizer, as FLAVA does")
    return Target(config, FlavaProcessor(image_processor=image_processor, tokenizer=tokenizer))


def write(folder: Path, target: Target, stored_dtype: str) -> None:
    write_hf_files(folder, target.hf_config.to_dict(), "FlavaForPreTraining", stored_dtype, target.processor)
