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

The folder's tokenizer is the checkpoint's own with ``<image>`` and ``<video>`` added as special tokens and the
vocabulary grown to rows + 2, padded to 64, as transformers' ``convert_llava_onevision_weights_to_hf.py`` does
(``docs/design/families-next.md`` §4.5; the new rows drawn as ``convert.EmbeddingDistribution`` says); the chat
template is the original's (``qwen_1_5`` for the released models) and the processor is ``LlavaOnevisionProcessor``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ... import dtypes
from ...conversion import Conversion
from ...errors import ConfigError
from ...options import LoadOptions
from ...runtime import templates
from ...runtime.vocab import open_vocab
from . import ONEVISION_ARCHITECTURE as ARCHITECTURE
from . import anyres_max, convert, hf_output, image_path, layout
from .checkpoint import MULTIMODAL_FIELDS, OriginalCheckpoint

VIDEO_TOKEN = "<video>"
VIDEO_WARNING = "video: "  # how video_differences' notes begin, in convert's warnings and the folder's manifest


def is_onevision(ckpt: OriginalCheckpoint) -> bool:
    """A checkpoint whose transformers class is LlavaOnevision: the SigLIP tower (``hf_config`` then refuses, by
    name, what transformers' OneVision does not do)."""
    return ckpt.vision_config.get("model_type") == "siglip_vision_model"


def hf_config(ckpt: OriginalCheckpoint, *, image_token_index: int, video_token_index: int, vocab_size: int | None = None,
              pad_token_id: int | None = None):
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
    # every language-model field, as hf_output.target_for passes them: transformers 5 turns the original's
    # rope_theta into rope_parameters (a filter on Qwen2Config's own keys would lose it)
    text = {k: v for k, v in config.items()
            if k not in MULTIMODAL_FIELDS and k not in ("model_type", "architectures", "_name_or_path")}
    text |= {k: v for k, v in (("vocab_size", vocab_size), ("pad_token_id", pad_token_id)) if v is not None}
    text_config = AutoConfig.for_model(ckpt.row.hf_model_type, **text)
    vision = SiglipVisionConfig(**{k: v for k, v in ckpt.vision_config.items() if k != "model_type"})
    canvases = image_path.image_config(ckpt).grid_pinpoints
    return LlavaOnevisionConfig(
        text_config=text_config.to_dict(), vision_config=vision.to_dict(), image_token_index=image_token_index,
        video_token_index=video_token_index, projector_hidden_act="gelu", vision_feature_select_strategy="full",
        vision_feature_layer=-1, vision_aspect_ratio=ratio, image_grid_pinpoints=[[h, w] for w, h in canvases],
        multimodal_projector_bias=True, tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))


def differences(ckpt: OriginalCheckpoint) -> list[str]:
    """What transformers' OneVision does differently from the original for this checkpoint
    (``docs/design/families-next.md`` §3.3; the unpad rounding is LLaVA-NeXT's note), as verify notes."""
    notes = ["image_grid_pinpoints written as (height, width), as transformers reads them: every canvas choice "
             "is the original's, but the list differs from llava-hf's published one"]
    try:
        notes += [f"video: {n}" for n in image_path.video_config(ckpt).notes]
    except ConfigError:
        pass  # video_differences says why
    return notes + video_differences(ckpt)


def video_differences(ckpt: OriginalCheckpoint) -> list[str]:
    """Where transformers' OneVision video path (``get_video_features``: frames pooled bilinearly to
    ``ceil(side / 2)``, one ``image_newline`` after all frames) computes something else than the original does for
    this checkpoint's ``config.json``, each naming the field; empty when they agree."""
    try:
        video = image_path.video_config(ckpt)
    except ConfigError as e:
        return [f"{VIDEO_WARNING}the original cannot read this checkpoint's video fields ({e})"]
    notes = []
    if video.pool_mode != "bilinear":
        notes.append(f"{VIDEO_WARNING}the original pools frames with mm_spatial_pool_mode {video.pool_mode!r}, "
                     "transformers always bilinearly: video features differ")
    if video.newline_position != "one_token":
        notes.append(f"{VIDEO_WARNING}the original places newlines by mm_newline_position "
                     f"{video.newline_position!r}, transformers one after all frames: video token sequences differ")
    return notes


def video_refusal(folder: Path) -> str | None:
    """Why a video on this converted folder would not be the original's answer: ``video_differences`` of its source,
    as ``vlmkit convert`` kept them in the folder's manifest (``provenance.warnings``); None when they agree, or for
    a folder vlmkit did not write (a published one: what transformers computes is all it defines)."""
    from ...conversion.output import MANIFEST, read_manifest

    if not (Path(folder) / MANIFEST).exists():
        return None
    warnings = (read_manifest(folder).get("provenance") or {}).get("warnings") or []
    differ = [w.removeprefix(VIDEO_WARNING) for w in warnings if w.startswith(VIDEO_WARNING)]
    return "; ".join(differ) or None


def frame_processor(folder: Path):
    """What the folder's ``LlavaOnevisionVideoProcessor`` does to each frame (RGB, resize, rescale, normalize), as
    transformers' PIL backend: the class reads its fields (``video_preprocessor_config.json``, absent ones its class
    defaults) but processes only with torchvision, which vlmkit does not need. The one difference: the class resizes
    with torchvision's antialiased bicubic, PIL's bicubic here (the original's SigLIP processor resizes with PIL)."""
    from transformers.image_processing_backends import PilBackend
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    try:
        fields = LlavaOnevisionVideoProcessor.from_pretrained(folder).to_dict()
    except OSError as e:
        raise ConfigError(f"{folder}: no video processor fields ({str(e).splitlines()[0]})",
                          hint="convert the original again with vlmkit convert: it writes "
                               "video_preprocessor_config.json") from None
    return PilBackend(**{k: fields.get(k) for k in (
        "do_convert_rgb", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
        "rescale_factor", "do_normalize", "image_mean", "image_std")})


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


def video_processor_fields(ckpt: OriginalCheckpoint) -> dict:
    """``video_preprocessor_config.json``: ``LlavaOnevisionVideoProcessor`` with the original's frame preprocessing
    (each frame squashed to the tower's size, bicubic, SigLIP's mean/std). Written field by field (the class needs
    torchvision) and never left to the class defaults, which are CLIP's mean/std."""
    cfg = image_path.image_config(ckpt)
    return {"video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": "LlavaOnevisionProcessor",
            "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
            "do_sample_frames": False, "size": {"height": cfg.size, "width": cfg.size}, "resample": 3,
            "rescale_factor": cfg.rescale, "image_mean": list(cfg.mean), "image_std": list(cfg.std)}


def expected_tensors(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of the target model under the published names (meta device: no memory)."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    state = model.state_dict()
    return {new: tuple(state[old].shape) for old, new in layout.published_names(state, ARCHITECTURE).items()
            if not (config.tie_word_embeddings and new == "language_model.lm_head.weight")}


def tokenizer(ckpt: OriginalCheckpoint):
    """The checkpoint's tokenizer with ``<image>`` and ``<video>`` added as special tokens (the OneVision script's)."""
    from transformers import AddedToken

    if ckpt.row.tokenizer != "bpe":
        raise ConfigError(f"{ckpt.tokenizer_folder}: a {ckpt.backbone} tokenizer; transformers' OneVision is "
                          "converted with its byte-level BPE (Qwen2) tokenizer")
    tok = hf_output.CONVERTED_TOKENIZERS["bpe"](ckpt.tokenizer_folder, False)
    tok.add_tokens([AddedToken(VIDEO_TOKEN, special=True, normalized=False)], special_tokens=True)
    tok.padding_side = "left"  # generation pads on the left, as the llava-hf releases do
    return tok


def target(ckpt: OriginalCheckpoint, options: LoadOptions):
    """``(hf config, tokenizer, template, generation config)`` of the converted folder, before any tensor is read."""
    tok = tokenizer(ckpt)
    rows = ckpt.source.info("model.embed_tokens.weight").shape[0]
    if len(tok) - 2 > rows:
        raise ConfigError(f"{ckpt.tokenizer_folder}: the tokenizer has {len(tok) - 2} tokens but the model's "
                          f"embedding has {rows} rows", hint="use the tokenizer the model was trained with")
    vocab = hf_output.padded_vocab(rows, max(2, len(tok) - rows))
    config = hf_config(ckpt, image_token_index=tok.convert_tokens_to_ids(hf_output.IMAGE_TOKEN),
                       video_token_index=tok.convert_tokens_to_ids(VIDEO_TOKEN), vocab_size=vocab,
                       pad_token_id=tok.pad_token_id)
    template = hf_output.template_for(ckpt, options)
    stops = sorted(templates.stop_ids(template, open_vocab(ckpt.tokenizer_folder, ckpt.row.tokenizer)))
    generation = {"bos_token_id": tok.bos_token_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
                  "pad_token_id": tok.pad_token_id}
    return config, tok, template, generation


def chat_template(ckpt: OriginalCheckpoint, template: str) -> str:
    """The converted folder's chat template: the original ``template`` (its name in a Jinja comment, for
    ``vlmkit inspect`` and the runtime), with the legacy flag ``hf_output.target_for`` reads."""
    legacy = hf_output.original_tokenizer_legacy(ckpt.tokenizer_folder)
    return templates.marker(template) + templates.chat_template(template, legacy_tokenizer=legacy)


def conversion(ckpt: OriginalCheckpoint, options: LoadOptions) -> Conversion:
    """``vlmkit convert --to hf`` of a OneVision checkpoint: tensors, config, tokenizer, processor, chat template."""
    config, tok, template, generation = target(ckpt, options)
    tower = ckpt.vision_config
    files = _processor_files(ckpt, tok, template, (tower["image_size"] // tower["patch_size"]) ** 2)
    dtype = options.dtype or (ckpt.lora.base_dtype if ckpt.lora else None)
    conversion = tensors(ckpt, config, seed=options.seed, dtype=dtype, processor_files=files, generation=generation,
                         summary=f"template {template}")
    conversion.warnings.extend(video_differences(ckpt))  # images convert faithfully; videos would not
    return conversion


def _processor_files(ckpt: OriginalCheckpoint, tok, template: str, base_tokens: int):
    """Writes what ``LlavaOnevisionProcessor.save_pretrained`` writes for images and text: the tokenizer, the chat
    template, ``processor_config.json``. Written field by field because transformers will not build the
    processor without torchvision (its video processor needs it; the image path does not): see ``processor``."""
    fields = {"processor_class": "LlavaOnevisionProcessor", "num_image_tokens": base_tokens,
              "vision_feature_select_strategy": "full", "vision_aspect_ratio": ckpt.config["image_aspect_ratio"],
              "image_token": hf_output.IMAGE_TOKEN, "video_token": VIDEO_TOKEN}
    chat = chat_template(ckpt, template)

    def write(folder: Path) -> None:
        tok.save_pretrained(folder)
        templates.write_chat_template(folder, chat)
        (folder / "processor_config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")

    return write


def processor(folder: Path):
    """transformers' ``LlavaOnevisionProcessor`` of a converted folder, for images and text: through
    ``AutoProcessor`` where torchvision is installed, else built from the folder's own files with no video
    processor (transformers' constructor insists on one only to type-check it)."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionProcessor

    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(folder)

    class ImagesOnly(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, name, argument):
            return None if name == "video_processor" and argument is None else \
                super().check_argument_for_proper_class(name, argument)

    fields = json.loads((Path(folder) / "processor_config.json").read_text())
    fields.pop("processor_class", None)
    return ImagesOnly(image_processor=AutoImageProcessor.from_pretrained(folder, backend="pil"),
                      tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=None,
                      chat_template=templates.read_chat_template(folder), **fields)


def tensors(ckpt: OriginalCheckpoint, config, *, seed: int = 0, dtype: str | None = None, processor_files=None,
            generation: dict | None = None, summary: str = "") -> Conversion:
    """The tensors and ``config.json`` + ``preprocessor_config.json`` of the converted folder; with
    ``processor_files`` and ``generation`` (``conversion``) the tokenizer, processor and generation config too."""
    rules, act = convert.rules_for(ckpt, config.text_config.vocab_size, seed)
    if act != "gelu":
        raise ConfigError(f"{ckpt.path}/config.json: mm_projector_type {ckpt.config.get('mm_projector_type')!r}; "
                          "transformers' OneVision projector is Linear -> GELU -> Linear (mlp2x_gelu)")
    images_only = image_processor(ckpt)
    video_processor = video_processor_fields(ckpt)

    def write(folder: Path) -> None:
        data = config.to_dict()
        data["architectures"] = [ARCHITECTURE]
        data["torch_dtype"] = dtypes.config_name(dtype or ckpt.source.info("model.embed_tokens.weight").dtype)
        data.pop("dtype", None)
        (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if generation is not None:
            (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if processor_files is not None:
            processor_files(folder)
        # transformers 5 nests the image processor in processor_config.json; 4.x and vLLM read this file
        images_only.save_pretrained(folder)
        (folder / "video_preprocessor_config.json").write_text(json.dumps(video_processor, indent=2) + "\n")

    return Conversion(ckpt.source, rules, expected=expected_tensors(config), write_extras=write, dtype=dtype,
                      summary=f"LLaVA-OneVision ({ckpt.form} checkpoint, {ckpt.backbone} backbone"
                              + "".join(f"; {n}" for n in [summary, *ckpt.notes] if n) + ")",
                      assumptions=list(ckpt.assumptions))
