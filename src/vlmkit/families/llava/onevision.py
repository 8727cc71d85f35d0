"""An original LLaVA-OneVision checkpoint -> transformers ``LlavaOnevisionForConditionalGeneration`` (config, tensors,
image processor), in the published ``llava-hf/llava-onevision-*`` layout.

The tensors take LLaVA's own rules (``convert.rules_for``): the published OneVision names are the
LLaVA-NeXT ones (``language_model.model.*``, ``language_model.lm_head.weight``,
``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``, ``image_newline``), as the
transformers conversion script's ``KEYS_TO_MODIFY_MAPPING`` produces them. The config says what the
original does without saying it (``docs/design/families-next.md`` §2, §5): the trimmed SigLIP tower,
``vision_feature_layer`` -1 of it with every token (``"full"``), ``anyres_max_N``, and the pinpoints
swapped into transformers' (height, width) order, which makes every canvas choice the original's.
The image processor writes SigLIP's mean/std explicitly (the class defaults are CLIP's).

The tokenizer, chat template and processor wrapper come with the Qwen2 row's BPE path.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...conversion import Conversion
from ...errors import ConfigError
from . import anyres_max, convert, image_path, layout
from .checkpoint import MULTIMODAL_FIELDS, OriginalCheckpoint

ARCHITECTURE = "LlavaOnevisionForConditionalGeneration"


def hf_config(ckpt: OriginalCheckpoint, *, image_token_index: int, video_token_index: int):
    """The ``LlavaOnevisionConfig`` of the checkpoint.

    Raises:
        ConfigError: the checkpoint is not a SigLIP + ``anyres_max_N`` + ``spatial_unpad`` one, or asks for
            what transformers' OneVision does not do (``add_faster_video``).
    """
    from transformers import AutoConfig, LlavaOnevisionConfig, SiglipVisionConfig

    config = ckpt.config
    ratio = config.get("image_aspect_ratio")
    problems = []
    if anyres_max.max_patches(ratio) is None:
        problems.append(f"image_aspect_ratio {ratio!r} (OneVision: anyres_max_N)")
    if config.get("mm_patch_merge_type") != "spatial_unpad":
        problems.append(f"mm_patch_merge_type {config.get('mm_patch_merge_type')!r} (OneVision: spatial_unpad)")
    if ckpt.vision_config.get("model_type") != "siglip_vision_model":
        problems.append("a CLIP tower (OneVision: SigLIP)")
    if config.get("add_faster_video"):
        problems.append("add_faster_video true (transformers has no slow/fast frame tokens)")
    if problems:
        raise ConfigError(f"{ckpt.path}/config.json: not convertible to {ARCHITECTURE}: {'; '.join(problems)}")
    known = set(AutoConfig.for_model(ckpt.row.hf_model_type).to_dict())
    text = {k: v for k, v in config.items() if k in known and k not in MULTIMODAL_FIELDS}
    text_config = AutoConfig.for_model(ckpt.row.hf_model_type, **text)
    vision = SiglipVisionConfig(**{k: v for k, v in ckpt.vision_config.items() if k != "model_type"})
    canvases = image_path.image_config(ckpt).grid_pinpoints
    return LlavaOnevisionConfig(
        text_config=text_config.to_dict(), vision_config=vision.to_dict(), image_token_index=image_token_index,
        video_token_index=video_token_index, projector_hidden_act="gelu", vision_feature_select_strategy="full",
        vision_feature_layer=-1, vision_aspect_ratio=ratio, image_grid_pinpoints=[[h, w] for w, h in canvases],
        multimodal_projector_bias=True, tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))


def image_processor(ckpt: OriginalCheckpoint):
    """transformers' ``LlavaOnevisionImageProcessorPil`` giving the original's pixels (mean/std written out)."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    cfg = image_path.image_config(ckpt)
    return LlavaOnevisionImageProcessorPil(
        image_mean=list(cfg.mean), image_std=list(cfg.std), rescale_factor=cfg.rescale, resample=3,
        size={"height": cfg.size, "width": cfg.size}, image_grid_pinpoints=[[h, w] for w, h in cfg.grid_pinpoints],
        do_pad=True, do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True)


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the target model under the published names (meta device: no memory)."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    state = model.state_dict()
    return {new: tuple(state[old].shape) for old, new in layout.published_names(state, ARCHITECTURE).items()
            if not (config.tie_word_embeddings and new == "language_model.lm_head.weight")}


def tensors(ckpt: OriginalCheckpoint, config, *, seed: int = 0) -> Conversion:
    """The tensors (and ``config.json`` + ``preprocessor_config.json``) of the converted folder."""
    rules, act = convert.rules_for(ckpt, config.text_config.vocab_size, seed)
    if act != "gelu":
        raise ConfigError(f"{ckpt.path}/config.json: mm_projector_type {ckpt.config.get('mm_projector_type')!r}; "
                          "transformers' OneVision projector is Linear -> GELU -> Linear (mlp2x_gelu)")
    processor = image_processor(ckpt)

    def write(folder: Path) -> None:
        data = config.to_dict()
        data["architectures"] = [ARCHITECTURE]
        (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        processor.save_pretrained(folder)

    return Conversion(ckpt.source, rules, expected=expected_tensors(config), write_extras=write,
                      summary=f"LLaVA-OneVision ({ckpt.form} checkpoint, {ckpt.backbone} backbone)",
                      assumptions=list(ckpt.assumptions))
