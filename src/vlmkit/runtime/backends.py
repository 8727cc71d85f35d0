"""How models run: LLaVA and BLIP-2 (OPT, Flan-T5), as the original checkpoint or a transformers folder.

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

from .. import dtypes
from ..errors import ConfigError, VlmkitError
from ..options import check_device, read_json
from ..tensors import open_source
from . import images, templates
from .generation import with_cache
from .messages import Turn
from .tokens import IMAGE_TOKEN_INDEX


def _template_messages(turns: list[Turn]) -> list[tuple[str, str | None]]:
    """(role, text) pairs with ``<image>\\n`` before a user text per image, as the original cli does."""
    out = []
    for t in turns:
        text = templates.with_image(t.text, len(t.images)) if t.images else t.text
        out.append((t.role, text))
    return out + [("assistant", None)]


class OriginalBackend:
    """An original LLaVA checkpoint run directly (``families.llava.reference.OriginalLlava``)."""

    kind = "original"

    def __init__(self, path: Path, options):
        from ..families.llava.checkpoint import open_original
        from ..families.llava.hf_output import template_for
        from ..families.llava.reference import OriginalLlava

        ckpt = open_original(path, options)
        dtype = dtypes.torch_dtype(options.dtype)
        self.model = OriginalLlava.load(ckpt, dtype=dtype, device=options.device)
        self.device = options.device
        self.template = template_for(ckpt, options)
        self.tokenizer = self.model.tokenizer
        self.eos_token_ids = {self.tokenizer.eos_token_id}
        self.max_context = ckpt.config.get("tokenizer_model_max_length") or ckpt.config.get("max_position_embeddings")
        self.image_max_pixels = images.DEFAULT_MAX_PIXELS
        self.marker = IMAGE_TOKEN_INDEX
        self.filler = self.tokenizer.unk_token_id
        self.preprocessing = repr(self.model.image_config)

    def prompt_ids(self, turns: list[Turn]) -> list[int]:
        prompt = templates.render(self.template, _template_messages(turns))
        return self.model.prompt_ids(prompt)

    def image_features(self, image) -> torch.Tensor:
        pixels, sizes = images.preprocess([images.load_image(image, max_pixels=self.image_max_pixels)],
                                          self.model.image_config)
        return self.model.image_features(pixels.to(self.device) if isinstance(pixels, torch.Tensor) else pixels,
                                         sizes)[0]

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.get_input_embeddings()(ids.to(self.device))

    def forward(self, embeds, attention_mask, position_ids, past):
        out, cache = with_cache(self.model.language_model, past, inputs_embeds=embeds, attention_mask=attention_mask,
                                position_ids=position_ids, logits_to_keep=1)
        return out.logits, cache

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class TransformersBackend:
    """A transformers ``Llava`` / ``LlavaNext`` folder (vlmkit's output, or a published llava-hf one)."""

    kind = "transformers"

    def __init__(self, path: Path, options):
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        dtype = dtypes.torch_dtype(options.dtype)
        self.processor = AutoProcessor.from_pretrained(path)
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
            content = [{"type": "image"} for _ in t.images] + ([{"type": "text", "text": t.text}] if t.text else [])
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


# LAVIS's question-answering prompts: OPT as the BLIP-2 model cards ask, Flan-T5 as LAVIS's
# zero-shot VQA configs do (lavis/projects/blip2/eval/vqav2_zeroshot_flant5xl_eval.yaml).
BLIP2_PROMPTS = {"opt": ("blip2_qa", "Question: {} Answer:"), "t5": ("blip2_t5_qa", "Question: {} Short answer:")}


class Blip2Backend:
    """BLIP-2 with OPT or Flan-T5: a transformers ``Blip2ForConditionalGeneration`` folder, or the
    original LAVIS checkpoint run through vlmkit's reference of LAVIS's forward (``families.blip2``).

    The projected query outputs come before the prompt, as BLIP-2 does; the prompt is LAVIS's
    question-answering form (``BLIP2_PROMPTS``), turns joined with a space (LAVIS itself is
    single-turn). OPT decodes them; Flan-T5's encoder reads them and its decoder generates from
    the start token (``generation.Seq2SeqBatch``). Greedy tokens are LAVIS's ``generate(num_beams=1)``'s.
    """

    kind = "blip2"

    def __init__(self, path: Path, options, *, original: bool = False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.device = options.device
        if original:
            self._load_original(path, options)
        else:
            self._load_transformers(path, options)
        self.encoder_decoder = self.lm_kind == "t5"
        # LAVIS's generate passes min_length=1. transformers counts it over the ids it was given:
        # none for OPT (inputs_embeds only), so EOS cannot come first; the decoder start token for
        # T5, so it asks nothing more there.
        self.min_new_tokens = 1 if self.lm_kind == "opt" else 0
        self.template, self.question = BLIP2_PROMPTS[self.lm_kind]
        self.max_context = getattr(self.language_model.config, "max_position_embeddings", None)
        self.decoder_start_token_id = getattr(self.language_model.config, "decoder_start_token_id", None)
        self.image_max_pixels = images.DEFAULT_MAX_PIXELS

    def _load_transformers(self, path: Path, options) -> None:
        from transformers import AutoProcessor, Blip2ForConditionalGeneration

        dtype = dtypes.torch_dtype(options.dtype)
        self.processor = AutoProcessor.from_pretrained(path)
        model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype).to(options.device).eval()
        self.lm_kind = "opt" if model.config.use_decoder_only_language_model else "t5"
        self.tokenizer = self.processor.tokenizer
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.marker = self.filler = model.config.image_token_id
        self.preprocessing = repr(self.processor.image_processor.to_dict())
        self.language_model = model.language_model

        def features(pixels):
            return model.get_image_features(pixel_values=pixels.to(self.device, model.dtype)).pooler_output[0]

        def pixels(pil):
            return self.processor.image_processor(images=[pil], return_tensors="pt")["pixel_values"]

        self._features, self._pixels = features, pixels

    def _load_original(self, path: Path, options) -> None:
        """LAVIS's model, float32 as LAVIS runs it on the CPU (``reference.py``)."""
        from ..families.blip2 import hf_output
        from ..families.blip2.checkpoint import open_original
        from ..families.blip2.reference import OriginalBlip2Model, lavis_eval_pixels

        if options.dtype not in (None, "F32"):
            raise ConfigError(f"{path}: an original BLIP-2 checkpoint runs in float32 (as LAVIS on the CPU); "
                              f"--dtype {options.dtype} applies to converted folders",
                              hint="leave out --dtype, or convert it (vlmkit convert ... --dtype) and run the folder")
        ckpt = open_original(path, options)
        cfg = hf_output.target_for(ckpt, options).hf_config
        model = OriginalBlip2Model.load(ckpt, cfg.vision_config.to_dict(), cfg.qformer_config.to_dict(),
                                        cfg.text_config).to(options.device)
        self.lm_kind = ckpt.lm
        self.tokenizer = model.tokenizer
        self.eos_token_ids = {model.eos_token_id}
        self.marker, self.filler = IMAGE_TOKEN_INDEX, self.tokenizer.pad_token_id
        self.preprocessing = f"LAVIS blip_image_eval {model.image_size}"
        self.language_model = model.language_model
        self._features = lambda pixels: model.query_embeds(pixels.to(self.device))[0]
        self._pixels = lambda pil: lavis_eval_pixels(pil, model.image_size)

    def prompt_ids(self, turns: list[Turn]) -> list[int]:
        n_images = sum(len(t.images) for t in turns)
        if n_images > 1 or (n_images == 1 and not turns[0].images):
            raise VlmkitError("BLIP-2 reads one image, given with the first question")
        parts = []
        for t in turns:
            if t.role == "user":
                parts.append(self.question.format(t.text) if t.text else "")
            elif t.role == "assistant":
                parts.append(t.text)
        ids = self.tokenizer(" ".join(p for p in parts if p)).input_ids
        return ([self.marker] if n_images else []) + ids

    def image_features(self, image) -> torch.Tensor:
        pixels = self._pixels(images.load_image(image, max_pixels=self.image_max_pixels))
        with torch.no_grad():
            return self._features(pixels)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids.to(self.device))

    def forward(self, embeds, attention_mask, position_ids, past):
        out, cache = with_cache(self.language_model, past, inputs_embeds=embeds, attention_mask=attention_mask,
                                position_ids=position_ids, logits_to_keep=1)
        return out.logits, cache

    def encode(self, embeds: torch.Tensor) -> torch.Tensor:
        """Flan-T5's encoder over the queries and the prompt: ``[1, L, H]``."""
        return self.language_model.get_encoder()(inputs_embeds=embeds).last_hidden_state

    def decoder_forward(self, ids, attention_mask, encoder_states, encoder_mask, past):
        """One decoder step of Flan-T5 (``ids [B, 1]``): logits and the ``EncoderDecoderCache``."""
        out, cache = with_cache(self.language_model, past, encoder_outputs=(encoder_states,),
                                attention_mask=encoder_mask, decoder_input_ids=ids,
                                decoder_attention_mask=attention_mask)
        return out.logits, cache

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def backend_for(path: Path, options):
    """The backend that runs ``path``: an original LLaVA or BLIP-2 checkpoint, or a transformers folder."""
    from ..families.blip2.checkpoint import form_of as blip2_form
    from ..families.llava.checkpoint import form_of

    check_device(options.device)
    if form_of(path) is not None:
        return OriginalBackend(path, options)
    if blip2_form(path) is not None:  # a LAVIS checkpoint
        return Blip2Backend(path, options, original=True)
    config = path / "config.json"
    architectures = read_json(config).get("architectures", []) if config.exists() else []
    if architectures:  # vlmkit's readers check the weights (headers, sizes) as inspect and convert do
        open_source(path).close()
    if any(a in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration") for a in architectures):
        return TransformersBackend(path, options)
    if "Blip2ForConditionalGeneration" in architectures:
        return Blip2Backend(path, options)
    raise VlmkitError(f"{path}: vlmkit can run original LLaVA and BLIP-2 (LAVIS) checkpoints and transformers "
                      f"Llava / LlavaNext / Blip2 folders; this is {architectures or 'not a model folder'}",
                      hint="`vlmkit inspect` shows what it is")
