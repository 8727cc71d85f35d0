"""The non-tensor side of a converted InstructBLIP folder: ``InstructBlipConfig``, generation config, processor.

Sizes come from the checkpoint's shapes through ``families.blip2.hf_output`` (the EVA ViT-g and the
Q-Former are BLIP-2's; ``--config`` overrides what no shape tells, e.g. head counts). What is
InstructBLIP's own:

* the processor has two tokenizers, as ``InstructBlipProcessor`` wants: the language model's and
  the Q-Former's (``bert-base-uncased`` + ``[DEC]`` as BOS, ``Blip2Base.init_tokenizer``; left
  truncation, ``init_tokenizer(truncation_side="left")``);
* Vicuna's tokenizer as ``blip2_vicuna_instruct.py`` changes it: ``[PAD]`` added (id 32000), BOS,
  EOS and UNK all ``</s>`` (so a prompt starts with id 2, not 1), left padding and truncation;
  then transformers' ``<image>`` placeholder (id 32001). LAVIS resized the LLM to 32,001 rows
  (``resize_token_embeddings(len(llm_tokenizer))``), transformers needs one more row for
  ``<image>``: the output has 32,002 rows; see ``convert.py`` for what the new rows hold (a
  release has 32,000 rows of the language model's folder, a full state dict LAVIS's 32,001);
* Flan-T5: ``dense_act_fn="gelu"`` (``blip2_t5_instruct.py``) and ``bos_token_id=1`` (as
  transformers' conversion script sets it); ``<image>`` takes one of T5's spare rows (32100 of 32128).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...conversion.hf_files import write_hf_files
from ...errors import ConfigError
from ...options import LoadOptions
from ..blip2.checkpoint import WORDS
from ..blip2.hf_output import (IMAGE_TOKEN, check_depth, check_projection, generation_config, lavis_image_processor,
                               merged_config, qformer_fields, vision_fields)
from .checkpoint import OriginalInstructBlip

PAD_TOKEN = "[PAD]"  # blip2_vicuna_instruct.py: llm_tokenizer.add_special_tokens({'pad_token': '[PAD]'})
VICUNA_SPECIAL = "</s>"  # ... and bos_token, eos_token, unk_token all '</s>'
DEC_TOKEN = "[DEC]"  # blip2.py init_tokenizer: tokenizer.add_special_tokens({"bos_token": "[DEC]"})
MAX_TXT_LEN = 128  # blip2_instruct_*.yaml: max_txt_len, the Q-Former's text length
DROPPED_CONFIG_KEYS = ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype")


@dataclass
class Target:
    """Everything about the output that is known before any tensor is read."""

    hf_config: object
    processor: object
    generation_config: dict
    image_size: int
    trained_rows: int  # rows of the LM's embedding the checkpoint holds
    rows: int  # rows the output's embedding and head have (Vicuna: + [PAD] + <image>)
    tie_lm_head: bool  # the LM's output layer is its input embedding (its own config.json says so)


def qformer_tokenizer(ckpt: OriginalInstructBlip):
    """``Blip2Base.init_tokenizer(truncation_side="left")``: bert-base-uncased + ``[DEC]``, as long as the rows."""
    from transformers import BertTokenizer

    # LAVIS cuts the instruction to max_txt_len (128) tokens from the left: truncation=True does the same here
    tokenizer = BertTokenizer.from_pretrained(ckpt.qformer_tokenizer, truncation_side="left",
                                              model_max_length=MAX_TXT_LEN)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    rows = ckpt.shape(WORDS)[0]
    if len(tokenizer) != rows:
        raise ConfigError(f"{ckpt.qformer_tokenizer}: the tokenizer has {len(tokenizer)} tokens with {DEC_TOKEN}, but "
                          f"{ckpt.path.name}'s Q-Former word embeddings have {rows} rows",
                          hint="use bert-base-uncased's tokenizer files, the ones LAVIS loads")
    return tokenizer


def vicuna_tokenizer(ckpt: OriginalInstructBlip):
    """Vicuna's tokenizer as InstructBLIP changes it (module docstring), in transformers 5's form."""
    from ...runtime.tokens import OriginalTokenizer, build_converted_tokenizer

    legacy = OriginalTokenizer.from_folder(ckpt.lm_folder).legacy  # the original's flag, as 4.28 read it
    tokenizer = build_converted_tokenizer(ckpt.lm_folder, legacy=legacy, extra_tokens=(), pad_token=PAD_TOKEN)
    tokenizer.add_special_tokens({"bos_token": VICUNA_SPECIAL, "eos_token": VICUNA_SPECIAL, "unk_token": VICUNA_SPECIAL})
    tokenizer.update_post_processor()  # the BOS it puts in front is now </s> (id 2), as LAVIS's slow tokenizer does
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.padding_side = tokenizer.truncation_side = "left"  # LAVIS's generate pads on the left
    return tokenizer


def _t5_tokenizer(ckpt: OriginalInstructBlip):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt.lm_folder, truncation_side="left")  # blip2_t5_instruct.py
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer


def text_fields(ckpt: OriginalInstructBlip, tokenizer, rows: int) -> dict:
    """The LM's config.json with InstructBLIP's changes (module docstring)."""
    text = {k: v for k, v in ckpt.lm_config.items() if k not in DROPPED_CONFIG_KEYS}
    if ckpt.lm.causal:
        text.update(vocab_size=rows, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    else:
        text.update(dense_act_fn="gelu", bos_token_id=1)
    return text


def target_for(ckpt: OriginalInstructBlip, options: LoadOptions) -> Target:
    from transformers import InstructBlipConfig, InstructBlipProcessor

    override = options.config or {}
    vision, qformer = vision_fields(ckpt), qformer_fields(ckpt)
    check_depth(ckpt, vision, override.get("vision_config") or {}, "vision_config", "visual_encoder.blocks.*")
    check_depth(ckpt, qformer, override.get("qformer_config") or {}, "qformer_config", "Qformer.bert.encoder.layer.*")
    tokenizer = vicuna_tokenizer(ckpt) if ckpt.lm.causal else _t5_tokenizer(ckpt)
    trained = ckpt.shape(ckpt.prefix + ckpt.lm.embedding)[0]
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if ckpt.lm.causal:
        # [PAD] = the tokenizer's length, <image> the id after it. LAVIS's resized embedding holds [PAD]'s row (a full
        # state dict: image_token rows); the language model's own folder does not (a release: image_token - 1 rows)
        if trained not in (image_token - 1, image_token):
            raise ConfigError(f"{ckpt.lm_folder}: the tokenizer has {image_token - 1} tokens and the embedding "
                              f"{trained} rows; LAVIS gives [PAD] the row after the tokenizer's last",
                              hint="use the tokenizer the language model was trained with (Vicuna v1.1: 32,000 tokens)")
        rows = image_token + 1
    elif image_token >= trained:
        raise ConfigError(f"{ckpt.lm_folder}: the tokenizer has {image_token} tokens and the embedding {trained} rows: "
                          f"no spare row for {IMAGE_TOKEN}", hint="use the tokenizer the language model was trained with")
    else:
        rows = trained
    derived = {"vision_config": vision, "qformer_config": qformer, "text_config": text_fields(ckpt, tokenizer, rows),
               "num_query_tokens": ckpt.shape("query_tokens")[1], "image_token_index": image_token}
    hf_config = merged_config(InstructBlipConfig, derived, override)
    check_projection(ckpt, ckpt.lm.projection, hf_config)
    size = hf_config.vision_config.image_size
    processor = InstructBlipProcessor(image_processor=lavis_image_processor(size), tokenizer=tokenizer,
                                      qformer_tokenizer=qformer_tokenizer(ckpt),
                                      num_query_tokens=hf_config.num_query_tokens)
    tie = bool(ckpt.lm_config.get("tie_word_embeddings", not ckpt.lm.causal))  # LLaMA's default: untied
    return Target(hf_config, processor, generation_config(hf_config, ckpt.lm.causal), size, trained, rows, tie)


def write(folder: Path, target: Target, stored_dtype: str) -> None:
    """config.json, generation_config.json and the processor's files (both tokenizers)."""
    config = target.hf_config.to_dict()
    # transformers 5's T5Config always reports tied; write the language model's own flag (Flan-T5: untied)
    config["text_config"]["tie_word_embeddings"] = target.tie_lm_head
    write_hf_files(folder, config, "InstructBlipForConditionalGeneration", stored_dtype, target.processor,
                   target.generation_config)
