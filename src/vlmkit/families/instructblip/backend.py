"""InstructBLIP's chat backend: the LAVIS release (through ``reference.py``) or a converted transformers folder.

The language-model side is BLIP-2's, and so is the code: ``Blip2Backend``'s loading, image features,
token embedding, decoder step (Vicuna, like OPT, is causal) and Flan-T5 encoder / decoder steps for
the runtime's encoder-decoder batch are inherited. What differs is the image side: the Q-Former reads the
instruction, so an image's features depend on the prompt. ``ChatModel`` asks for the prompt's ids
before the image's features (``ChatModel.prompt``), so ``prompt_ids`` records the text the Q-Former
will read and folds it into ``preprocessing``, the key the feature cache and the prefix cache use:
features are reused only for the same image *and* the same instruction.

The prompt is the instruction as given, as LAVIS's ``generate(samples={"prompt": ...})`` takes it
(no template; the language model and the Q-Former read the same text). LAVIS is single-turn; later
turns are joined with a space, as for BLIP-2. Greedy answers are LAVIS's ``generate`` with
``num_beams=1`` and ``repetition_penalty=1.0`` (its defaults are 5 and 1.5).
"""

from __future__ import annotations

from pathlib import Path

from ...runtime.messages import Turn
from ...runtime.tokens import IMAGE_TOKEN_INDEX
from ..blip2.backend import Blip2Backend


class InstructBlipBackend(Blip2Backend):
    """InstructBLIP with Vicuna (causal) or Flan-T5 (encoder-decoder): ``Blip2Backend`` with its own loaders, whose
    image features read the instruction, and its own prompt."""

    kind = "instructblip"
    title = "InstructBLIP"
    transformers_class = "InstructBlipForConditionalGeneration"
    asks = "instruction"

    def _language_settings(self) -> None:
        self.encoder_decoder = bool(getattr(self.language_model.config, "is_encoder_decoder", False))
        # LAVIS's min_length=1 as transformers counts it: a causal LM given inputs_embeds only counts from 0
        self.min_new_tokens = 0 if self.encoder_decoder else 1
        self.template = "instructblip (the instruction as given)"
        self.instruction = ""
        self.image_preprocessing = self.preprocessing  # what prompt_ids adds the instruction to

    def _from_transformers(self, model) -> None:
        self._ids = lambda text: self.tokenizer(text).input_ids

        def features(pil):
            pixels = self.processor.image_processor(images=[pil], return_tensors="pt")["pixel_values"]
            # LAVIS cuts the instruction to 128 tokens
            text = self.processor.qformer_tokenizer(self.instruction, truncation=True, return_tensors="pt")
            out = model.get_image_features(pixel_values=pixels.to(self.device, model.dtype),
                                           qformer_input_ids=text.input_ids.to(self.device),
                                           qformer_attention_mask=text.attention_mask.to(self.device))
            return out.pooler_output[0]

        self._features = features

    def _load_original(self, path: Path, options) -> None:
        """LAVIS's model, float32 as LAVIS runs it on the CPU (``reference.py``)."""
        from . import hf_output
        from .checkpoint import open_original
        from .reference import OriginalInstructBlipModel, lavis_eval_pixels

        ckpt = open_original(path, options)
        cfg = hf_output.target_for(ckpt, options).hf_config
        model = OriginalInstructBlipModel.load(ckpt, cfg.vision_config.to_dict(),
                                               cfg.qformer_config.to_dict()).to(options.device)
        self.tokenizer = model.tokenizer
        self.eos_token_ids = {model.eos_token_id}
        # the placeholder never reaches the LM; the filler is looked up, then overwritten: any trained row
        self.marker, self.filler = IMAGE_TOKEN_INDEX, model.eos_token_id
        self.preprocessing = f"LAVIS blip_image_eval {model.image_size}"
        self.language_model = model.language_model
        self._ids = model.prompt_ids
        self._features = lambda pil: model.query_embeds(
            lavis_eval_pixels(pil, model.image_size).to(self.device), self.instruction)[0]

    def prompt_ids(self, turns: list[Turn]) -> list[int]:
        n_images = self._image_count(turns)
        self.instruction = " ".join(t.text for t in turns if t.text and t.role in ("user", "assistant"))
        # the Q-Former reads the instruction: the features (and their cache key) depend on it
        self.preprocessing = f"{self.image_preprocessing}; Q-Former text {self.instruction!r}"
        return ([self.marker] if n_images else []) + self._ids(self.instruction)
