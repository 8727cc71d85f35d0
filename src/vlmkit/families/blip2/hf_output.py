"""The non-tensor side of a converted BLIP-2 folder: ``Blip2Config``, generation config, ``Blip2Processor``.

Every size is read from the checkpoint's shapes; what no shape tells comes from LAVIS's
constants (EVA ViT-g: 88-wide heads, i.e. ``1408 // 88 = 16`` heads, LayerNorm eps 1e-6, exact
GELU; the Q-Former is ``bert-base-uncased``: 64-wide heads, eps 1e-12), and ``--config``
(a transformers ``Blip2Config``) overrides any of it. The language model's config is its own
``config.json`` with LAVIS's generation-time changes:

* OPT: ``eos_token_id`` is the newline token (``Blip2OPT.eos_token_id = tokenizer("\\n")``);
* Flan-T5: ``dense_act_fn="gelu"`` (LAVIS overrides T5's ``gelu_new``) and ``bos_token_id=1``
  (as transformers' conversion script sets it).

The processor reproduces LAVIS's eval preprocessing (``blip_image_eval``: a bicubic resize to
the square ``image_size``, CLIP mean/std; 224, or 364 for the COCO caption models, read from
``pos_embed``) and prepends one ``<image>`` token per query, which the transformers 5 model
replaces with the Q-Former's projected outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ...conversion.hf_files import write_hf_files
from ...errors import ConfigError
from ...options import LoadOptions, deep_merge
from .checkpoint import QFORMER_LAYER, VIT_BLOCK, OriginalBlip2

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
EVA_HEAD_DIM = 88  # eva_vit.py: num_heads=1408//88
BERT_HEAD_DIM = 64  # bert-base-uncased: 768 / 12
IMAGE_TOKEN = "<image>"


@dataclass
class Target:
    """Everything about the output that is known before any tensor is read."""

    hf_config: object
    tokenizer: object
    processor: object
    generation_config: dict
    image_size: int
    tie_lm_head: bool  # the LM's output layer is its input embedding (OPT; T5 with tied embeddings)



def vision_fields(ckpt: OriginalBlip2) -> dict:
    """``Blip2VisionConfig`` fields from the EVA ViT's shapes."""
    hidden = ckpt.shape("visual_encoder.cls_token")[-1]
    positions = ckpt.shape("visual_encoder.pos_embed")[1]
    patch = ckpt.shape("visual_encoder.patch_embed.proj.weight")[-1]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ConfigError(f"{ckpt.path}: visual_encoder.pos_embed has {positions} positions, not 1 + a square grid")
    return {"hidden_size": hidden, "intermediate_size": ckpt.shape("visual_encoder.blocks.0.mlp.fc1.weight")[0],
            "num_hidden_layers": len(ckpt.layers(VIT_BLOCK)), "num_attention_heads": max(1, hidden // EVA_HEAD_DIM),
            "image_size": side * patch, "patch_size": patch, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
            "qkv_bias": "visual_encoder.blocks.0.attn.q_bias" in ckpt.source.keys()}


def qformer_fields(ckpt: OriginalBlip2) -> dict:
    """``Blip2QFormerConfig`` fields from the Q-Former's shapes; cross-attention layers give the frequency."""
    names = ckpt.source.keys()
    layers = ckpt.layers(QFORMER_LAYER)
    if layers != list(range(len(layers))):
        raise ConfigError(f"{ckpt.path}: the Q-Former's layers are {layers}, not 0..{len(layers) - 1}",
                          hint="the checkpoint is incomplete; download or copy it again")
    cross = [i for i in layers if f"Qformer.bert.encoder.layer.{i}.crossattention.self.query.weight" in names]
    freq = next((f for f in range(1, len(layers) + 1) if cross == [i for i in layers if i % f == 0]), None)
    if freq is None:
        raise ConfigError(f"{ckpt.path}: the Q-Former has cross-attention in layers {cross}, which is not every "
                          "n-th layer from 0 (LAVIS: layer_num % cross_attention_freq == 0)")
    hidden = ckpt.shape("query_tokens")[-1]
    word = "Qformer.bert.embeddings.word_embeddings.weight"
    position = "Qformer.bert.embeddings.position_embeddings.weight"
    return {"hidden_size": hidden, "num_hidden_layers": len(layers),
            "num_attention_heads": max(1, hidden // BERT_HEAD_DIM),
            "intermediate_size": ckpt.shape("Qformer.bert.encoder.layer.0.intermediate_query.dense.weight")[0],
            "cross_attention_frequency": freq,
            "encoder_hidden_size": ckpt.shape(f"Qformer.bert.encoder.layer.{cross[0]}.crossattention.self.key.weight")[1],
            "vocab_size": ckpt.shape(word)[0] if word in names else 30522,
            "max_position_embeddings": ckpt.shape(position)[0] if position in names else 512,
            "layer_norm_eps": 1e-12, "hidden_act": "gelu"}


def check_depth(ckpt: OriginalBlip2, fields: dict, override: dict, what: str, source: str) -> None:
    """``--config`` may change what no shape tells (heads), never what the weights fix (depth, widths)."""
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size"):
        if key in override and override[key] != fields[key]:
            raise ConfigError(f"--config sets {what}.{key}={override[key]} but {ckpt.path.name} has {fields[key]} "
                              f"({source})", hint=f"remove {key} from --config, or pass the checkpoint it describes")


def language_config(ckpt: OriginalBlip2, tokenizer) -> tuple[dict, bool]:
    """The language model's config.json with LAVIS's changes; and whether its head is tied to the embedding."""
    text = {k: v for k, v in ckpt.lm_config.items() if k not in ("architectures", "_name_or_path", "transformers_version",
                                                                   "torch_dtype", "dtype")}
    if ckpt.lm.eos_at_newline:
        newline = tokenizer("\n", add_special_tokens=False).input_ids
        text["eos_token_id"] = newline[0]  # Blip2OPT.generate stops at "\n"
    text.update(ckpt.lm.text_config_changes)  # blip2_t5.py: t5_config.dense_act_fn = "gelu"
    return text, text.get("tie_word_embeddings", True)


def target_for(ckpt: OriginalBlip2, options: LoadOptions) -> Target:
    from transformers import AutoTokenizer, Blip2Config, Blip2Processor

    override = options.config or {}
    vision = vision_fields(ckpt)
    qformer = qformer_fields(ckpt)
    check_depth(ckpt, vision, override.get("vision_config") or {}, "vision_config", "visual_encoder.blocks.*")
    check_depth(ckpt, qformer, override.get("qformer_config") or {}, "qformer_config", "Qformer.bert.encoder.layer.*")
    # the padding side generation needs (a decoder-only model: left), saved with the tokenizer
    side = ckpt.lm.padding_side
    tokenizer = AutoTokenizer.from_pretrained(ckpt.lm_folder, **({"padding_side": side} if side else {}))
    text, tie = language_config(ckpt, tokenizer)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = ckpt.shape(ckpt.prefix + ckpt.lm.embedding)[0]
    if image_token >= rows:
        raise ConfigError(f"{ckpt.lm_folder}: the tokenizer has {image_token} tokens and the embedding {rows} rows: "
                          f"no spare row for {IMAGE_TOKEN}, which transformers' Blip2 needs",
                          hint="use the tokenizer the language model was trained with")
    derived = {"vision_config": vision, "qformer_config": qformer, "text_config": text,
               "num_query_tokens": ckpt.shape("query_tokens")[1], "image_token_index": image_token}
    hf_config = merged_config(Blip2Config, derived, override)
    check_projection(ckpt, ckpt.lm.original_projection, hf_config)
    size = hf_config.vision_config.image_size
    processor = Blip2Processor(image_processor=lavis_image_processor(size), tokenizer=tokenizer,
                               num_query_tokens=hf_config.num_query_tokens)
    return Target(hf_config, tokenizer, processor, generation_config(hf_config, ckpt.lm.causal), size, tie)


def merged_config(config_class, derived: dict, override: dict):
    """``config_class`` (``Blip2Config``, ``InstructBlipConfig``) of the derived fields with ``--config`` over them;
    the text config is the language model's own class, by its ``model_type``."""
    from transformers import AutoConfig

    merged = deep_merge(derived, override)
    text_fields = dict(merged["text_config"])
    merged["text_config"] = AutoConfig.for_model(text_fields.pop("model_type"), **text_fields)
    for key in ("model_type", "architectures", "transformers_version"):
        merged.pop(key, None)
    return config_class(**merged)


def check_projection(ckpt, projection: str, hf_config) -> None:
    """LAVIS's projection into the language model must end at that model's width."""
    width = ckpt.shape(f"{projection}.weight")[0]
    if width != hf_config.text_config.hidden_size:
        raise ConfigError(f"{ckpt.path.name}: {projection} maps to width {width} but the language model in "
                          f"{ckpt.lm_folder} is {hf_config.text_config.hidden_size} wide",
                          hint="--language-model must be the model this checkpoint was trained with")


def lavis_image_processor(size: int):
    """LAVIS's eval preprocessing (``blip_image_eval``) as transformers' BLIP image processor: a bicubic resize to the
    square ``size``, CLIP mean and std."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                                 resample=3, do_convert_rgb=True)


def generation_config(hf_config, causal: bool) -> dict:
    """generation_config.json: the language model's special ids (and a seq2seq model's decoder start)."""
    lm = hf_config.text_config
    generation = {"bos_token_id": lm.bos_token_id, "eos_token_id": lm.eos_token_id, "pad_token_id": lm.pad_token_id}
    if not causal:
        generation["decoder_start_token_id"] = lm.decoder_start_token_id if lm.decoder_start_token_id is not None \
            else lm.pad_token_id
    return generation


def write(folder: Path, target: Target, stored_dtype: str) -> None:
    """config.json (with the language model's real tie flag), generation_config.json, the processor files."""
    config = target.hf_config.to_dict()
    # transformers 5's T5Config always says tie_word_embeddings=True (and keeps the real flag as
    # scale_decoder_outputs); 4.x and vLLM read the flag itself, so write what the model is.
    config["text_config"]["tie_word_embeddings"] = target.tie_lm_head
    write_hf_files(folder, config, "Blip2ForConditionalGeneration", stored_dtype, target.processor,
                   target.generation_config)
