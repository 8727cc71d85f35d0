"""The tensor names of a transformers ``Llava`` / ``LlavaNext`` / ``LlavaOnevision`` folder, in every layout
transformers writes (it saves ``LlavaOnevision`` with ``LlavaNext``'s rules, SigLIP's tower with CLIP's).

The published llava-hf repositories, and every folder vlmkit writes, use ``PUBLISHED``: the
names vLLM, llama.cpp's converter and transformers 4.x read. transformers 5 loads all the
layouts below with identical logits, but its ``save_pretrained`` writes (5.25):

* the published names, for a model loaded from published names;
* the CLIP tower without ``vision_model.`` (``vision_tower.embeddings.*``, ``vision_tower.encoder.*``,
  ``vision_tower.pre_layrnorm.*``) for a model built from its config
  (``LlavaForConditionalGeneration(config)`` + its weights, as training scripts and accelerate's
  empty-weight loading do), and for any model loaded from such a folder: the layout sticks;
* the module names (``model.language_model.*``, ``lm_head.weight``, ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``model.image_newline``) with ``save_original_format=False``,
  for a model carrying a PEFT adapter, or with offloaded weights.

Readers that go by tensor name (GGUF export, vLLM's pre-start check) see every folder through
``published``; the layouts are the one table ``ALIASES``.
"""

from __future__ import annotations

from collections.abc import Iterable

from ...errors import CheckpointError
from ...tensors import TensorSource
from ...tensors.views import RenamedSource

PUBLISHED = ("language_model.model.", "language_model.lm_head.", "vision_tower.vision_model.",
             "multi_modal_projector.", "image_newline")

# a prefix of another layout -> the published prefix; the longest alias that starts a name applies
ALIASES = {
    "model.language_model.": "language_model.model.",  # module names
    "lm_head.": "language_model.lm_head.",  # module names
    "model.vision_tower.vision_model.": "vision_tower.vision_model.",  # module names (transformers 4.5x)
    "model.vision_tower.": "vision_tower.vision_model.",  # module names (transformers 5: CLIP lost vision_model.)
    "model.multi_modal_projector.": "multi_modal_projector.",  # module names
    "model.image_newline": "image_newline",  # module names (LlavaNext)
    "vision_tower.": "vision_tower.vision_model.",  # save_pretrained of a model built from its config
}


def published_name(name: str) -> str | None:
    """``name`` in the published layout; None when no layout has it."""
    if name.startswith(PUBLISHED):
        return name
    alias = max((a for a in ALIASES if name.startswith(a)), key=len, default=None)
    return None if alias is None else ALIASES[alias] + name[len(alias):]


def published_names(names: Iterable[str], where: object) -> dict[str, str]:
    """Each name -> its published name (names no layout has are kept as they are).

    Raises:
        CheckpointError: two tensors of ``where`` land on one published name (two layouts mixed).
    """
    mapping: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in names:
        new = published_name(name) or name
        if new in seen:
            raise CheckpointError(f"{where}: tensors '{seen[new]}' and '{name}' are both '{new}' in the published "
                                  "llava-hf layout: the folder mixes two layouts",
                                  hint="save the model again with transformers' save_pretrained into an empty folder")
        seen[new] = name
        mapping[name] = new
    return mapping


def published(source: TensorSource) -> TensorSource:
    """``source`` under the published names (a view: nothing is read or written)."""
    return RenamedSource(source, published_names(source.keys(), source.path))
