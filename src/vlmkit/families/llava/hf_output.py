"""The non-tensor files of a converted LLaVA folder: config, generation config, processor.

Fields are derived from the checkpoint's own files: the language model's config is the
original ``config.json`` minus its multimodal fields, the vision config is the CLIP
tower's, and ``--config`` (a transformers Llava/LlavaNext config) overrides any of it.
"""

from __future__ import annotations

import json
import functools
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ... import dtypes
from ...errors import ConfigError
from ...options import LoadOptions, deep_merge
from ...runtime import images, templates, tokens
from . import templates as llava_templates
from ...runtime.vocab import open_vocab
from .checkpoint import MULTIMODAL_FIELDS, OriginalCheckpoint

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
PAD_VOCAB_TO = 64  # the transformers conversion scripts' pad_to_multiple_of


@dataclass
class Target:
    """Everything about the output that is known before any tensor is read.

    The processor is built when first used (writing the folder): importing transformers'
    processing code costs seconds, which a conversion spends while its tensors stream.
    """

    hf_config: object
    tokenizer: object
    build_processor: Callable[[], object] = field(repr=False)
    generation_config: dict
    template: str

    @functools.cached_property
    def processor(self):
        return self.build_processor()


# transformers' processor per LLaVA kind: its class, its image processor (the PIL backend, bit-identical
# to the original's preprocessing: ``runtime.images.hf_image_processor``) and the original
# image_aspect_ratio values that image processor reproduces.
PROCESSORS = {"llava": ("LlavaProcessor", "LlavaImageProcessorPil", ("pad", "square")),
              "llava_next": ("LlavaNextProcessor", "LlavaNextImageProcessorPil", ("anyres",))}


def image_processor(cfg: images.ImageConfig, kind: str) -> tuple[object, list[list[int]] | None]:
    """The transformers image processor of a LLaVA ``kind`` for the original preprocessing ``cfg``
    (see ``runtime.images.hf_image_processor``), refused where that kind cannot reproduce it."""
    check_processor_kind(cfg, kind)
    return images.hf_image_processor(cfg, PROCESSORS[kind][1])


def check_processor_kind(cfg: images.ImageConfig, kind: str) -> None:
    if kind not in PROCESSORS or cfg.aspect not in PROCESSORS[kind][2]:
        raise ConfigError(f"hf_image_processor: aspect={cfg.aspect!r} cannot be done by kind={kind!r}",
                          hint=f"use kind {[k for k, (_, _, a) in PROCESSORS.items() if cfg.aspect in a]}")


def _bpe_tokenizer(folder: Path, legacy: bool):
    """A byte-level BPE tokenizer (Qwen2, Llama 3) as the folder ships it, ``<image>`` added as a special token
    (then ``<pad>`` where it names no pad token), as the transformers conversion scripts do."""
    from transformers import AddedToken, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # AutoTokenizer reads config.json too and warns that model_type llava_qwen / llava_llama is not its own
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    finally:
        hf_logging.set_verbosity(level)
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    return tokenizer


# the converted folder's tokenizer by the backbone row's tokenizer kind: (original folder, legacy) -> tokenizer
CONVERTED_TOKENIZERS = {
    "sentencepiece": lambda folder, legacy: tokens.build_converted_tokenizer(folder, legacy=legacy, pad_token=PAD_TOKEN),
    "bpe": _bpe_tokenizer,
}


def padded_vocab(rows: int, added: int) -> int:
    return math.ceil((rows + added) / PAD_VOCAB_TO) * PAD_VOCAB_TO



def original_tokenizer_legacy(folder: Path) -> bool:
    """The original slow tokenizer's ``legacy`` flag (transformers 4.37 treated a missing one as True)."""
    config = folder / "tokenizer_config.json"
    data = json.loads(config.read_text()) if config.exists() else {}
    return data.get("legacy", True) is not False


def template_for(ckpt: OriginalCheckpoint, options: LoadOptions) -> str:
    """The conversation template: ``--template``, else the original's choice from the model name,
    else the backbone's default (LLaVA's own fallback, ``llava_v0``, fits no released 1.5/1.6 model)."""
    if options.template:
        if options.template not in templates.TEMPLATES:
            raise ConfigError(f"--template {options.template!r} is unknown",
                              hint=f"known: {', '.join(sorted(templates.TEMPLATES))}")
        return options.template
    chosen = llava_templates.template_of(ckpt.path, ckpt.row)
    if chosen is None:
        raise ConfigError(f"{ckpt.path}: no conversation template is known for LLaVA with a {ckpt.backbone} "
                          "language model, and the model's name selects none",
                          hint="pass --template NAME (the template it was trained with)")
    return chosen


def target_for(ckpt: OriginalCheckpoint, options: LoadOptions) -> Target:
    import transformers
    from transformers import AutoConfig, CLIPVisionConfig, LlavaConfig, LlavaNextConfig

    legacy = original_tokenizer_legacy(ckpt.tokenizer_folder)
    tokenizer = CONVERTED_TOKENIZERS[ckpt.row.tokenizer](ckpt.tokenizer_folder, legacy)
    tokenizer.padding_side = "left"  # generation pads on the left, as the llava-hf releases do
    rows = ckpt.source.info("model.embed_tokens.weight").shape[0]
    if ckpt.row.tokenizer == "bpe" and len(tokenizer) <= rows:
        # Qwen's rows are padded past its tokenizer: <image> takes a spare row and nothing is resized, as
        # transformers' convert_llava_next_weights_to_hf.py does for the Qwen releases
        vocab = rows
    else:
        added = len(tokenizer) - rows if len(tokenizer) > rows else 2
        vocab = padded_vocab(rows, added)
    template = template_for(ckpt, options)

    text = {k: v for k, v in ckpt.config.items() if k not in MULTIMODAL_FIELDS}
    text.update(vocab_size=vocab, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    image_cfg = images.ImageConfig.from_original(ckpt.config, ckpt.preprocessor)
    select = ckpt.config.get("mm_vision_select_feature", "patch")
    derived = {
        "text_config": text,
        "vision_config": ckpt.vision_config,
        "image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "vision_feature_layer": ckpt.config["mm_vision_select_layer"],
        "vision_feature_select_strategy": "default" if select == "patch" else "full",
        "projector_hidden_act": "gelu",
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    processor_kind = "llava"
    if ckpt.is_next:
        merge = ckpt.config.get("mm_patch_merge_type", "flat")
        if merge != "spatial_unpad":
            raise ConfigError(f"{ckpt.path}/config.json: anyres with mm_patch_merge_type {merge!r}: transformers' "
                              "LlavaNext only implements spatial_unpad (with image_newline)")
        processor_kind = "llava_next"
    check_processor_kind(image_cfg, processor_kind)
    if ckpt.is_next:
        derived.update(image_grid_pinpoints=images.hf_pinpoints(image_cfg), use_image_newline_parameter=True)
    else:
        patches = (ckpt.vision_config["image_size"] // ckpt.vision_config["patch_size"]) ** 2
        derived["image_seq_length"] = patches + (1 if select == "cls_patch" else 0)
    merged = deep_merge(derived, options.config or {})
    text_fields = dict(merged["text_config"])
    text_config = AutoConfig.for_model(text_fields.pop("model_type", ckpt.row.hf_model_type), **text_fields)
    merged["text_config"] = text_config
    merged["vision_config"] = CLIPVisionConfig(**{k: v for k, v in merged["vision_config"].items() if k != "model_type"})
    for key in ("model_type", "architectures"):
        merged.pop(key, None)
    hf_config = (LlavaNextConfig if ckpt.is_next else LlavaConfig)(**merged)

    def build_processor():
        processor_cls = getattr(transformers, PROCESSORS[processor_kind][0])
        return processor_cls(
            image_processor=image_processor(image_cfg, processor_kind)[0], tokenizer=tokenizer,
            patch_size=ckpt.vision_config["patch_size"],
            vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
            # the Jinja comment names the original template, for `vlmkit inspect` and the runtime
            chat_template=templates.marker(template) + templates.chat_template(template, legacy_tokenizer=legacy),
            num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
        )

    # generation ends where the original's does: the template's stop ids (Qwen's <|im_end|>, Llama 3's <|eot_id|>)
    stops = sorted(templates.stop_ids(template, open_vocab(ckpt.tokenizer_folder, ckpt.row.tokenizer)))
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
                  "pad_token_id": tokenizer.pad_token_id}
    return Target(hf_config, tokenizer, build_processor, generation, template)


def write(folder: Path, ckpt: OriginalCheckpoint, target: Target, dtype: str | None = None) -> None:
    """config.json (published fields), generation_config.json, the processor files and ``tokenizer.model``."""
    config = target.hf_config.to_dict()
    arch = "LlavaNextForConditionalGeneration" if ckpt.is_next else "LlavaForConditionalGeneration"
    config["architectures"] = [arch]
    stored = dtype or ckpt.source.info("model.embed_tokens.weight").dtype
    config["torch_dtype"] = dtypes.config_name(stored)  # the key 4.x and vLLM read
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(target.generation_config, indent=2) + "\n")
    target.processor.save_pretrained(folder)
    # transformers 5 nests the image processor in processor_config.json; 4.x, vLLM and llama.cpp's
    # converter read preprocessor_config.json, as the published repositories have it
    target.processor.image_processor.save_pretrained(folder)
    # the SentencePiece model itself, as the published repositories ship it: its real token scores are
    # what llama.cpp's converter (and `vlmkit convert --to gguf`) write into a GGUF
    spm = ckpt.tokenizer_folder / "tokenizer.model"
    if spm.is_file():
        shutil.copyfile(spm, folder / "tokenizer.model")
