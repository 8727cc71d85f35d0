"""BLIP-2's chat backend: a transformers ``Blip2ForConditionalGeneration`` folder or the LAVIS checkpoint itself.

It gives generation the runtime's small surface (``runtime.generation.LanguageModel``) plus
``prompt_ids`` and ``image_features``; what differs between OPT and Flan-T5 is read from the
language model's row (``language_models.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ... import dtypes
from ...errors import ConfigError, VlmkitError
from ...runtime import images
from ...runtime.generation import with_cache
from ...runtime.messages import Turn
from ...runtime.tokens import IMAGE_TOKEN_INDEX
from . import hf_output
from .checkpoint import open_original
from .language_models import of_transformers
from .reference import OriginalBlip2Model, lavis_eval_pixels


class Blip2Backend:
    """BLIP-2 with OPT or Flan-T5: a transformers ``Blip2ForConditionalGeneration`` folder, or the
    original LAVIS checkpoint run through vlmkit's reference of LAVIS's forward (``reference.py``).

    The projected query outputs come before the prompt, as BLIP-2 does; the prompt is LAVIS's
    question-answering form (the language model's row), turns joined with a space (LAVIS itself is
    single-turn). OPT decodes them; Flan-T5's encoder reads them and its decoder generates from
    the start token (``generation.Seq2SeqBatch``). Greedy tokens are LAVIS's ``generate(num_beams=1)``'s.

    InstructBLIP's backend is this class with its own hooks: ``_load_original`` and ``_from_transformers`` (they set
    ``_features``, the image features of a PIL image, which read the instruction there), ``_language_settings`` and
    ``prompt_ids``.
    """

    kind = "blip2"
    title = "BLIP-2"
    transformers_class = "Blip2ForConditionalGeneration"  # what a converted folder loads as
    asks = "question"  # what the user's text is to the model (messages)

    def __init__(self, path: Path, options, *, original: bool = False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.device = options.device
        self.image_max_pixels = images.DEFAULT_MAX_PIXELS
        if original:
            if options.dtype not in (None, "F32"):
                raise ConfigError(
                    f"{path}: an original {self.title} checkpoint runs in float32 (as LAVIS on the CPU); "
                    f"--dtype {options.dtype} applies to converted folders",
                    hint="leave out --dtype, or convert it (vlmkit convert ... --dtype) and run the folder")
            self._load_original(path, options)
        else:
            self._load_transformers(path, options)
        self.max_context = getattr(self.language_model.config, "max_position_embeddings", None)
        self.decoder_start_token_id = getattr(self.language_model.config, "decoder_start_token_id", None)
        self._language_settings()

    def _language_settings(self) -> None:
        """What the language model's row says: seq2seq or causal, LAVIS's min_length, the question form."""
        self.encoder_decoder = not self.lm.causal
        # LAVIS's generate passes min_length=1, as transformers counts it (see the row)
        self.min_new_tokens = self.lm.min_new_tokens
        self.template, self.question = self.lm.prompt

    def _load_transformers(self, path: Path, options) -> None:
        import transformers
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path)
        model = getattr(transformers, self.transformers_class).from_pretrained(
            path, dtype=dtypes.torch_dtype(options.dtype)).to(options.device).eval()
        self.tokenizer = self.processor.tokenizer
        eos = model.generation_config.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.marker = self.filler = model.config.image_token_id
        self.preprocessing = repr(self.processor.image_processor.to_dict())
        self.language_model = model.language_model
        self._from_transformers(model)

    def _from_transformers(self, model) -> None:
        """What a loaded transformers model gives beyond the common: the language model's row, the image features."""
        self.lm = of_transformers(model.config.use_decoder_only_language_model)

        def features(pil):
            pixels = self.processor.image_processor(images=[pil], return_tensors="pt")["pixel_values"]
            return model.get_image_features(pixel_values=pixels.to(self.device, model.dtype)).pooler_output[0]

        self._features = features

    def _load_original(self, path: Path, options) -> None:
        """LAVIS's model, float32 as LAVIS runs it on the CPU (``reference.py``)."""
        ckpt = open_original(path, options)
        cfg = hf_output.target_for(ckpt, options).hf_config
        model = OriginalBlip2Model.load(ckpt, cfg.vision_config.to_dict(), cfg.qformer_config.to_dict(),
                                        cfg.text_config).to(options.device)
        self.lm = ckpt.lm
        self.tokenizer = model.tokenizer
        self.eos_token_ids = {model.eos_token_id}
        self.marker, self.filler = IMAGE_TOKEN_INDEX, self.tokenizer.pad_token_id
        self.preprocessing = f"LAVIS blip_image_eval {model.image_size}"
        self.language_model = model.language_model
        self._features = lambda pil: model.query_embeds(lavis_eval_pixels(pil, model.image_size).to(self.device))[0]

    def _image_count(self, turns: list[Turn]) -> int:
        """The images of a conversation: none, or one with the first turn (LAVIS's models read one)."""
        n_images = sum(len(t.images) for t in turns)
        if n_images > 1 or (n_images == 1 and not turns[0].images):
            raise VlmkitError(f"{self.title} reads one image, given with the first {self.asks}")
        return n_images

    def prompt_ids(self, turns: list[Turn]) -> list[int]:
        n_images = self._image_count(turns)
        parts = []
        for t in turns:
            if t.role == "user":
                parts.append(self.question.format(t.text) if t.text else "")
            elif t.role == "assistant":
                parts.append(t.text)
        ids = self.tokenizer(" ".join(p for p in parts if p)).input_ids
        return ([self.marker] if n_images else []) + ids

    def image_features(self, image) -> torch.Tensor:
        """The projected query outputs (``_features``, set by the loader: a function of the PIL image)."""
        pil = images.load_image(image, max_pixels=self.image_max_pixels)
        with torch.no_grad():
            return self._features(pil)

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
