"""The non-tensor side of a converted BLIP-2 retrieval folder: ``Blip2Config`` and ``Blip2Processor``.

As transformers' script writes ``Salesforce/blip2-itm-vit-g[-coco]``: a ``Blip2Config`` whose
Q-Former config has ``use_qformer_text_input=True`` and the word embeddings' vocabulary
(30523: ``bert-base-uncased`` + ``[DEC]``), no language model (``text_config`` left at its
default, unused), ``image_text_hidden_size`` = the projections' width, no ``image_token_index``
(the Q-Former reads the text ids themselves). Vision and Q-Former sizes are read from the shapes
by the ``blip2`` family's readers (the image size from ``pos_embed``: 224 pretrain, 364 COCO);
``--config`` overrides what no shape tells (head counts) and is refused where it contradicts them.

The processor: LAVIS's ``blip_image_eval`` (bicubic square resize, CLIP mean/std) and
``Blip2Base.init_tokenizer`` (``bert-base-uncased`` + ``[DEC]`` as BOS), saved with
``model_max_length=32``: ``Blip2ITM.forward`` truncates every caption to ``max_txt_len`` = 32
tokens, so ``truncation=True`` cuts where LAVIS cuts (the published tokenizer says 512).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...conversion.hf_files import write_hf_files
from ...errors import ConfigError
from ...options import LoadOptions, deep_merge
from ..blip2.hf_output import check_depth, lavis_image_processor, qformer_fields, vision_fields
from .checkpoint import OriginalRetrieval

MAX_TXT_LEN = 32  # Blip2Qformer(max_txt_len=32): cfg.get("max_txt_len", 32), which no released config sets


@dataclass
class Target:
    """Everything about the output that is known before any tensor is read."""

    hf_config: object
    processor: object
    image_size: int


def tokenizer_for(ckpt: OriginalRetrieval):
    """``bert-base-uncased``'s tokenizer + ``[DEC]``, as long as the word embeddings (LAVIS resizes them to it)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(ckpt.tokenizer_folder, model_max_length=MAX_TXT_LEN)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    rows = ckpt.shape("Qformer.bert.embeddings.word_embeddings.weight")[0]
    if len(tokenizer) != rows:
        raise ConfigError(f"--language-model {ckpt.tokenizer_folder}: the tokenizer has {len(tokenizer)} tokens with "
                          f"[DEC] but {ckpt.path.name}'s Q-Former embeds {rows}",
                          hint="pass the bert-base-uncased folder (LAVIS: 30522 tokens + [DEC] = 30523)")
    return tokenizer


def target_for(ckpt: OriginalRetrieval, options: LoadOptions) -> Target:
    from transformers import Blip2Config, Blip2Processor

    override = options.config or {}
    vision = vision_fields(ckpt)
    qformer = {**qformer_fields(ckpt), "use_qformer_text_input": True}
    check_depth(ckpt, vision, override.get("vision_config") or {}, "vision_config", "visual_encoder.blocks.*")
    check_depth(ckpt, qformer, override.get("qformer_config") or {}, "qformer_config", "Qformer.bert.encoder.layer.*")
    width = ckpt.shape("vision_proj.weight")[0]
    if ckpt.shape("text_proj.weight")[0] != width or ckpt.shape("itm_head.weight")[0] != 2:
        raise ConfigError(f"{ckpt.path.name}: vision_proj is {width} wide, text_proj "
                          f"{ckpt.shape('text_proj.weight')[0]}, itm_head has {ckpt.shape('itm_head.weight')[0]} "
                          "outputs; LAVIS's stage-1 model has equal projections and a 2-way ITM head")
    derived = {"vision_config": vision, "qformer_config": qformer, "num_query_tokens": ckpt.shape("query_tokens")[1],
               "image_text_hidden_size": width}
    merged = deep_merge(derived, override)
    for key in ("model_type", "architectures", "transformers_version", "text_config"):
        merged.pop(key, None)
    hf_config = Blip2Config(**merged)
    size = hf_config.vision_config.image_size
    processor = Blip2Processor(image_processor=lavis_image_processor(size), tokenizer=tokenizer_for(ckpt))
    return Target(hf_config, processor, size)


def write(folder: Path, target: Target, stored_dtype: str) -> None:
    """config.json and the processor files (tokenizer, preprocessor_config.json), as the published repositories."""
    write_hf_files(folder, target.hf_config.to_dict(), "Blip2ForImageTextRetrieval", stored_dtype, target.processor)
