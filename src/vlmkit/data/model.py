"""What the data commands need from a model, read without loading any weights.

``--model`` gives the tokenizer, the conversation template, the training length and the
number of features each image becomes (for token statistics), from an original checkpoint
(its family's ``data_model``, e.g. ``families/llava/data.py``: the slow tokenizer, ``mm_*``
fields and CLIP config) or a transformers Llava / LlavaNext folder (its tokenizer, chat
template and processor). The loading options (``--template``, ``--vision-tower``, ``--model-base``) mean
what they mean for every other command.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..options import LoadOptions
from .encoders import Encoder, TransformersEncoder

DEFAULT_MAX_LENGTH = 2048  # --model_max_length of LLaVA's released training scripts
_SANE_LENGTH = 10_000_000  # tokenizer configs write 1e30 for "no limit"


@dataclass
class DataModel:
    """A model seen from its data: tokenizer, template, length limit, image features.

    Attributes:
        path: the model folder.
        kind: "original" or "transformers".
        template: the conversation template the training uses.
        encoder: the tokenizer.
        max_length: ``model_max_length`` of the training.
        max_length_from: where ``max_length`` came from (for the report).
        fixed_image_tokens: features per image when they do not depend on the image (LLaVA-1.5).
        spec: ``(path, options, max_length)`` that ``load_data_model`` was called with: how worker processes
            load the same model (``pool.ordered_map``); None for a model built by hand.
    """

    path: Path
    kind: str
    template: str
    encoder: Encoder
    max_length: int
    max_length_from: str
    fixed_image_tokens: int | None
    sized_image_tokens: Callable[[tuple[int, int]], int] | None = None
    spec: tuple | None = None

    def image_tokens(self, size_wh: tuple[int, int] | None = None) -> int | None:
        """Features one image becomes; anyres needs the image's (width, height), else None."""
        if self.fixed_image_tokens is not None:
            return self.fixed_image_tokens
        return self.sized_image_tokens(size_wh) if size_wh is not None and self.sized_image_tokens else None


def load_data_model(path: str | Path, options: LoadOptions | None = None, *,
                    max_length: int | None = None) -> DataModel:
    """Read what the data commands need from ``path`` (original LLaVA checkpoint or transformers folder).

    Args:
        path: the model folder (or a hub id).
        options: the shared loading options (``--template`` overrides the detected template).
        max_length: ``--max-length``; default: the checkpoint's ``tokenizer_model_max_length``, else the
            tokenizer's ``model_max_length``, else 2048.

    Raises:
        ConfigError / CheckpointError: naming the file or field and the flag that fixes it.
    """
    from .. import families
    from ..tensors import resolve

    options = options or LoadOptions()
    folder = resolve(path)
    found = families.find(folder)
    if families.can(found, "data_model"):  # an original checkpoint: its family reads it
        model = found.family.data_model(found, options, max_length=max_length)
    else:
        model = _transformers(folder, options, max_length)
    model.spec = (str(folder), options, max_length)
    return model


def _length(explicit: int | None, config: dict, tokenizer_config: dict) -> tuple[int, str]:
    if explicit is not None:
        if explicit <= 0:
            raise ConfigError(f"--max-length {explicit} must be positive")
        return explicit, "--max-length"
    if config.get("tokenizer_model_max_length"):
        return int(config["tokenizer_model_max_length"]), "config.json tokenizer_model_max_length"
    value = tokenizer_config.get("model_max_length")
    if isinstance(value, (int, float)) and 0 < value < _SANE_LENGTH:
        return int(value), "tokenizer_config.json model_max_length"
    return DEFAULT_MAX_LENGTH, "default (LLaVA's training scripts)"


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _transformers(folder: Path, options: LoadOptions, max_length: int | None) -> DataModel:
    from ..runtime.templates import get_template, marked_name, read_chat_template

    config = _read(folder / "config.json")
    architectures = config.get("architectures") or []
    if not any(a in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration") for a in architectures):
        raise ConfigError(f"{folder}: neither an original LLaVA checkpoint nor a transformers Llava / LlavaNext "
                          f"folder (architectures {architectures or 'missing'})",
                          hint="`vlmkit inspect` shows what it is")
    template = options.template or marked_name(read_chat_template(folder))
    if template is None:
        raise ConfigError(f"{folder}: its chat template does not name an original LLaVA template",
                          hint="pass --template (e.g. llava_v1, mistral_instruct, chatml_direct)")
    template = get_template(template).name
    encoder = TransformersEncoder.from_folder(folder)
    length, source = _length(max_length, config, _read(folder / "tokenizer_config.json"))
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)

    def count(size_wh: tuple[int, int]) -> int:
        width, height = size_wh
        return int(processor._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens[0])

    if "LlavaNextForConditionalGeneration" in architectures:
        return DataModel(folder, "transformers", template, encoder, length, source, None, count)
    crop = config.get("vision_config", {}).get("image_size", 336)
    return DataModel(folder, "transformers", template, encoder, length, source, count((crop, crop)))
