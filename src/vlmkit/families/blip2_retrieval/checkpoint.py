"""The BLIP-2 stage-1 checkpoints of LAVIS (the Q-Former retrieval model), presented as one namespace.

LAVIS's ``Blip2Qformer`` (``blip2_qformer.py``), which ``blip2_image_text_matching`` /
``blip2_feature_extractor`` subclass, holds the EVA ViT-g, ``ln_vision``, the Q-Former with its
text side (``Qformer.bert.*`` with word and position embeddings, ``Qformer.cls.*``),
``query_tokens``, ``vision_proj`` / ``text_proj`` (to ``embed_dim``, 256), ``itm_head`` and
``temp``; and no projection into a language model (``opt_proj`` / ``t5_proj`` / ``llm_proj``:
those are the ``blip2`` family's and InstructBLIP's). Where the parts come from, as LAVIS loads them:

* ``blip2_pretrained.pth`` (``pretrain``, ``freeze_vit: True``): LAVIS's runner saves only
  trained parameters, so the frozen ViT is not in it: it comes from ``eva_vit_g.pth``
  (``--vision``), as ``create_eva_vit_g`` loads it;
* ``blip2_finetune_coco.pth`` (``coco``, ``freeze_vit: False``, 364 px) and any full
  ``original_model.state_dict()``: the ViT is inside and wins over ``--vision``;
* the tokenizer: ``Blip2Base.init_tokenizer`` is ``bert-base-uncased``'s with ``[DEC]`` added as
  BOS (30523 tokens, the rows of the Q-Former's word embeddings); no ``.pth`` carries it, so
  ``--language-model`` names a local ``bert-base-uncased`` folder (LAVIS loads it from the hub).

The file finding and the ViT part are the ``blip2`` family's (``families/blip2/checkpoint.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import CheckpointError, ConfigError
from ...tensors import TensorSource, open_source, resolve
from ...tensors.safe_pickle import peek_state_dict
from ...tensors.views import CombinedSource
from ..blip2.checkpoint import VISION, lavis_file, lavis_model, vit_source

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


@dataclass
class OriginalRetrieval:
    """An original BLIP-2 retrieval checkpoint of any form, ready to convert or to run."""

    path: Path
    form: str  # "full" (the ViT inside) | "parts" (the ViT from --vision)
    source: TensorSource  # LAVIS's namespace: visual_encoder.*, ln_vision.*, Qformer.*, query_tokens, heads
    tokenizer_folder: Path  # bert-base-uncased's tokenizer files
    notes: list[str] = field(default_factory=list)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.info(name).shape

    def layers(self, pattern: re.Pattern) -> list[int]:
        return sorted({int(m.group(1)) for n in self.source.keys() if (m := pattern.match(n))})


def is_stage1(names) -> bool:
    """LAVIS's key names of a ``Blip2Qformer``: Q-Former with its text side, both projections, the ITM head, and no
    projection into a language model (``lavis_model``)."""
    return lavis_model(names) == "blip2_retrieval"


def form_of(path: Path) -> str | None:
    """``"full"`` / ``"parts"`` when ``path`` is a LAVIS stage-1 checkpoint, else None. Reads no tensor data."""
    file = lavis_file(path)
    tensors = peek_state_dict(file) if file is not None else None
    if not tensors or not is_stage1(tensors):
        return None
    return "full" if any(n.startswith(VISION) for n in tensors) else "parts"


def open_original(path: Path, options) -> OriginalRetrieval:
    """Open an original BLIP-2 retrieval checkpoint; checks what can be checked without data.

    Raises:
        CheckpointError / ConfigError: naming the missing part or file and the flag that supplies it.
    """
    file = lavis_file(path)
    main = open_source(file) if file is not None else None
    if main is None or not is_stage1(main.keys()):
        raise CheckpointError(f"{path}: not a LAVIS BLIP-2 stage-1 checkpoint (a .pth holding query_tokens, "
                              "Qformer.bert.* with word embeddings, vision_proj, text_proj and itm_head)",
                              hint="`vlmkit inspect` lists what the file holds")
    notes: list[str] = []
    names = set(main.keys())
    has_vit = any(n.startswith(VISION) for n in names)
    if has_vit and "visual_encoder.cls_token" not in names:
        raise CheckpointError(f"{file}: its visual_encoder.* is not LAVIS's EVA ViT-g (no visual_encoder.cls_token); "
                              "the ViT-L variant (blip2_pretrain_vitL) is not supported")
    if has_vit and options.vision_tower:
        notes.append(f"{file.name} holds its own visual encoder (fine-tuned); it wins over --vision, as in LAVIS")
    parts: list[tuple[str, TensorSource]] = []
    if not has_vit:
        if not options.vision_tower:
            raise ConfigError(f"{file} holds no visual encoder (visual_encoder.*): LAVIS trains it frozen and loads "
                              "EVA ViT-g from eva_vit_g.pth", hint="pass --vision PATH (eva_vit_g.pth)")
        parts.append(("", vit_source(resolve(options.vision_tower))))
    source = CombinedSource([("", main), *parts], path=file) if parts else main
    width, ln = source.info("visual_encoder.cls_token").shape[-1], source.info("ln_vision.weight").shape[0]
    if width != ln:
        where = "--vision " + str(options.vision_tower) if parts else file.name
        raise ConfigError(f"{file.name}: ln_vision is {ln} wide but the visual encoder ({where}) is {width}: "
                          "the Q-Former was trained on another vision encoder",
                          hint="pass the ViT this checkpoint was trained with")
    return OriginalRetrieval(file, "parts" if parts else "full", source, _tokenizer_folder(file, options), notes)


def _tokenizer_folder(file: Path, options) -> Path:
    hint = "pass --language-model PATH: a local bert-base-uncased folder (vocab.txt or tokenizer.json)"
    if not options.model_base:
        raise ConfigError(f"{file}: the Q-Former's tokenizer is in no LAVIS checkpoint (LAVIS loads "
                          "bert-base-uncased's from the hub and adds [DEC])", hint=hint)
    folder = resolve(options.model_base)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"--language-model {folder}: no tokenizer (vocab.txt or tokenizer.json)", hint=hint)
    return folder
