"""How LLaVA runs: the original checkpoint (vlmkit's reference of the original forward) or a
transformers ``Llava`` / ``LlavaNext`` / ``LlavaOnevision`` folder.

Both give generation the same small surface (``runtime.generation.LanguageModel``) plus
``prompt_ids`` (the conversation as ids with one placeholder per image) and
``image_features`` (one image -> its projected features, in the model's own layout). The
original backend uses the original templates, tokenisation and preprocessing
(``runtime.templates`` / ``tokens`` / ``images``), exactly what ``vlmkit verify`` measures;
the transformers backend uses the folder's processor and chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ... import dtypes
from ...errors import ConfigError
from ...runtime import images, templates
from ...runtime.generation import with_cache
from ...runtime.messages import MessageError, Turn, Video, template_messages
from ...runtime.tokens import IMAGE_TOKEN_INDEX


class OriginalBackend:
    """An original LLaVA checkpoint run directly (``families.llava.reference.OriginalLlava``)."""

    kind = "original"

    def __init__(self, path: Path, options):
        from .checkpoint import open_original
        from .hf_output import template_for
        from .reference import OriginalLlava

        ckpt = open_original(path, options)
        dtype = dtypes.torch_dtype(options.dtype)
        self.model = OriginalLlava.load(ckpt, dtype=dtype, device=options.device)
        self.device = options.device
        self.template = template_for(ckpt, options)
        self.vocab = self.model.vocab
        self.eos_token_ids = set(templates.stop_ids(self.template, self.vocab))
        self.max_context = ckpt.config.get("tokenizer_model_max_length") or ckpt.config.get("max_position_embeddings")
        self.image_max_pixels = images.DEFAULT_MAX_PIXELS
        self.marker = IMAGE_TOKEN_INDEX
        # any id fills the image slots before the features replace them; Qwen2 and Llama 3 have no unk
        self.filler = next((i for i in (self.vocab.unk_id, self.vocab.pad_id, self.vocab.eos_id) if i is not None), 0)
        self.preprocessing = repr(self.model.image_config)

    def prompt_ids(self, turns: list[Turn]) -> list[int]:
        prompt = templates.render(self.template, template_messages(turns))
        return self.model.prompt_ids(prompt)

    def image_features(self, image) -> torch.Tensor:
        pixels, sizes = images.preprocess([images.load_image(image, max_pixels=self.image_max_pixels)],
                                          self.model.image_config)
        return self.model.image_features(pixels.to(self.device) if isinstance(pixels, torch.Tensor) else pixels,
                                         sizes)[0]

    def video_features(self, frames: list) -> torch.Tensor:
        """One video given as its frames: one placeholder, the original's pooled frame features."""
        return self.model.video_features([images.load_image(f, max_pixels=self.image_max_pixels) for f in frames])

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.get_input_embeddings()(ids.to(self.device))

    def forward(self, embeds, attention_mask, position_ids, past):
        out, cache = with_cache(self.model.language_model, past, inputs_embeds=embeds, attention_mask=attention_mask,
                                position_ids=position_ids, logits_to_keep=1)
        return out.logits, cache

    def decode(self, ids: list[int]) -> str:
        return self.vocab.decode(ids, skip_special=True)


class TransformersBackend:
    """A transformers ``Llava`` / ``LlavaNext`` / ``LlavaOnevision`` folder (vlmkit's output, or a published llava-hf
    one). ``processor``: the folder's processor where ``AutoProcessor`` cannot build it (OneVision without
    torchvision: ``onevision.processor``)."""

    kind = "transformers"

    def __init__(self, path: Path, options, processor=None):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        dtype = dtypes.torch_dtype(options.dtype)
        self.processor = processor if processor is not None else AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(options.device).eval()
        self.device = options.device
        self.tokenizer = self.processor.tokenizer
        if options.template:  # an original template, tokenised the way the converted tokenizer needs
            legacy = bool(getattr(self.tokenizer, "legacy", True))
            self.processor.chat_template = templates.chat_template(
                templates.get_template(options.template).name, legacy_tokenizer=legacy)
        self.template = templates.marked_name(self.processor.chat_template)
        config = self.model.config
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos if eos is not None else self.tokenizer.eos_token_id])
        self.max_context = getattr(config.text_config, "max_position_embeddings", None)
        self.marker = config.image_token_index
        self.filler = config.image_token_index
        self.image_max_pixels = images.DEFAULT_MAX_PIXELS
        self.preprocessing = repr(self.processor.image_processor.to_dict())

    def prompt_ids(self, turns: list[Turn]) -> list[int]:
        messages = []
        for t in turns:
            content = [{"type": "video" if isinstance(i, Video) else "image"} for i in t.images]
            content += [{"type": "text", "text": t.text}] if t.text else []
            messages.append({"role": t.role, "content": content})
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer(text).input_ids

    def image_features(self, image) -> torch.Tensor:
        pil = images.load_image(image, max_pixels=self.image_max_pixels)
        inputs = self.processor.image_processor(images=[pil], return_tensors="pt")
        kwargs = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device, self.model.dtype),
                                                **kwargs)
        features = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features), 0)
        return features.reshape(-1, features.shape[-1])

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids.to(self.device))

    def forward(self, embeds, attention_mask, position_ids, past):
        out, cache = with_cache(self.model, past, inputs_embeds=embeds, attention_mask=attention_mask,
                                position_ids=position_ids, logits_to_keep=1)
        return out.logits, cache

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class OnevisionBackend(TransformersBackend):
    """A ``LlavaOnevision`` folder: images as ``TransformersBackend``, and a video as transformers' OneVision reads it
    (its video processor's fields per frame: ``onevision.frame_processor``; ``get_video_features``: every frame's
    features pooled bilinearly, one ``image_newline`` after all frames), at the one ``<video>`` of the chat template.
    A folder converted from an original whose video path is another (``onevision.video_refusal``) refuses videos."""

    def __init__(self, path: Path, options):
        from . import onevision

        super().__init__(path, options, processor=onevision.processor(path))
        self.path = path
        self.video_token = self.model.config.video_token_index

    def prompt_ids(self, turns: list[Turn]) -> list[int]:
        for i, t in enumerate(turns):
            kinds = [isinstance(image, Video) for image in t.images]
            if kinds != sorted(kinds):  # features are spliced in the turn's order, placeholders in the template's
                raise MessageError(f"messages[{i}]: a video before an image; the folder's chat template places a "
                                   "message's images before its videos", hint="give the message's images first")
        # the one <video> id takes the video's features as an <image> id takes an image's
        return [self.marker if i == self.video_token else i for i in super().prompt_ids(turns)]

    def video_features(self, frames: list) -> torch.Tensor:
        """One video given as its frames: ``[frames x pooled tokens + 1, hidden]``. The folder's files are read here,
        not at load: a folder whose video side is refused or unreadable still answers about images."""
        from . import onevision

        refusal = onevision.video_refusal(self.path)
        if refusal:
            raise ConfigError(f"{self.path}: a video on this converted folder would not be the original's answer: "
                              f"{refusal}",
                              hint="chat about videos with the original checkpoint (vlmkit chat ORIGINAL --video ...); "
                                   "images on this folder are the original's")
        pil = [images.load_image(f, max_pixels=self.image_max_pixels) for f in frames]
        pixels = onevision.frame_processor(self.path)(pil, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = self.model.get_video_features(pixel_values_videos=pixels[None].to(self.device, self.model.dtype))
        return out.pooler_output[0]
