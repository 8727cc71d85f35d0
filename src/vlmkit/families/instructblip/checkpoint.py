"""The original InstructBLIP (LAVIS ``blip2_vicuna_instruct`` / ``blip2_t5_instruct``) checkpoint, as one namespace.

LAVIS builds the model from four sources, and so does this module, without reading tensor data:

* the EVA ViT-g visual encoder (``eva_vit_g.pth``): ``--vision PATH``, as for plain BLIP-2;
* the language model: a local Vicuna v1.1 folder (``llm_model: "./llm/vicuna-7b"`` in
  ``blip2_instruct_vicuna7b.yaml``) or ``google/flan-t5-xl``: ``--language-model PATH``;
* the Q-Former's tokenizer, ``bert-base-uncased`` (``Blip2Base.init_tokenizer``; LAVIS downloads it):
  a folder named ``bert-base-uncased`` beside the release ``.pth`` (or its ``vocab.txt`` /
  ``tokenizer.json`` beside it), since no LAVIS file carries it;
* the release ``.pth`` (``instruct_blip_vicuna7b_trimmed.pth``, or a fine-tune saved by LAVIS's
  runner): ``query_tokens``, ``ln_vision.*``, the Q-Former *with its text side* and ``llm_proj`` /
  ``t5_proj``, loaded last, so that what it holds wins (a fine-tune with ``freeze_vit: False``
  carries its own ``visual_encoder.*``).

A full state dict (``model.state_dict()`` of the whole ``Blip2VicunaInstruct`` / ``Blip2T5Instruct``,
form ``"full"``) holds the ViT (``visual_encoder.*``) and the language model too (``llm_model.*``,
Vicuna resized to 32,001 rows, ``[PAD]``'s included; ``t5_model.*`` with T5's tied copies): no
``--vision``, and the file's weights win over ``--language-model``'s, which still gives the config
and the tokenizer (no ``.pth`` holds them), as for plain BLIP-2's full form.

What tells it from plain BLIP-2 and from the retrieval model is the keys present
(``families.blip2.checkpoint.lavis_model``, which all three recognisers ask): the Q-Former's word
embeddings without the stage-1 ``Qformer.cls`` head (InstructBLIP keeps the text side because the
Q-Former reads the instruction, and sets ``Qformer.cls`` to None before anything is saved; a BLIP-2
file has either no word embeddings or that head beside them), and ``llm_proj`` or ``t5_proj``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import CheckpointError, ConfigError
from ...options import LoadOptions, read_json
from ...tensors import TensorSource, open_source, resolve
from ...tensors.safe_pickle import peek_state_dict
from ...tensors.views import CombinedSource
from ..blip2.checkpoint import (VISION, language_model_folder, language_model_source, lavis_file, lavis_model,
                                vit_source)

QFORMER_TOKENIZER_DIR = "bert-base-uncased"  # the name LAVIS loads it by, as a folder beside the .pth
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


@dataclass(frozen=True)
class LanguageModel:
    """What differs between ``blip2_vicuna_instruct`` and ``blip2_t5_instruct``."""

    name: str  # "vicuna" | "t5"
    title: str
    projection: str  # LAVIS's linear map into the LM
    prefix: str  # where LAVIS's module holds the LM
    model_types: tuple[str, ...]  # config.json model_type of a --language-model folder that fits
    embedding: str  # the input embedding under the LM's own names
    causal: bool
    known: str  # what LAVIS's config names (hints)


LANGUAGE_MODELS = {
    "vicuna": LanguageModel("vicuna", "Vicuna", "llm_proj", "llm_model.", ("llama",), "model.embed_tokens.weight", True,
                            "a Vicuna v1.1 folder (blip2_instruct_vicuna7b.yaml: llm_model ./llm/vicuna-7b)"),
    "t5": LanguageModel("t5", "Flan-T5", "t5_proj", "t5_model.", ("t5", "mt5"), "shared.weight", False,
                        "google/flan-t5-xl (or -xxl), as blip2_instruct_flant5xl.yaml names it"),
}


@dataclass
class OriginalInstructBlip:
    """An original InstructBLIP checkpoint, ready to convert or to run."""

    path: Path  # the .pth
    form: str  # "parts" (a release: its ViT and language model apart) | "full" (everything in one state dict)
    lm: LanguageModel
    # LAVIS's namespace: visual_encoder.*, ln_vision.*, Qformer.bert.*, query_tokens, llm_proj / t5_proj,
    # llm_model.* / t5_model.*
    source: TensorSource
    lm_folder: Path
    lm_config: dict
    qformer_tokenizer: Path  # bert-base-uncased's tokenizer files
    notes: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.lm.prefix

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.info(name).shape

    def layers(self, pattern: re.Pattern) -> list[int]:
        return sorted({int(m.group(1)) for n in self.source.keys() if (m := pattern.match(n))})


def lm_of(names) -> LanguageModel | None:
    """The language model of an InstructBLIP state dict from its key names (``lavis_model``), or None."""
    names = set(names)
    if lavis_model(names) != "instructblip":
        return None
    return next(lm for lm in LANGUAGE_MODELS.values() if f"{lm.projection}.weight" in names)


def _holds_language_model(names, lm: LanguageModel) -> bool:
    # the rotary buffers LAVIS's LLaMA saves are in a trimmed release too (the runner keeps every buffer)
    return any(n.startswith(lm.prefix) and not n.endswith(".inv_freq") for n in names)


def form_of(path: Path) -> str | None:
    """``"full"`` (the ViT and the language model inside) / ``"parts"`` when ``path`` is an InstructBLIP checkpoint
    (or the folder holding it), else None. Reads no tensor data."""
    file = lavis_file(path)
    tensors = peek_state_dict(file) if file is not None else None
    lm = lm_of(tensors or ())
    if lm is None:
        return None
    inside = _holds_language_model(tensors, lm) and any(n.startswith(VISION) for n in tensors)
    return "full" if inside else "parts"


def open_original(path: Path, options: LoadOptions) -> OriginalInstructBlip:
    """Open an InstructBLIP checkpoint with its parts; checks what can be checked without data.

    Raises:
        CheckpointError / ConfigError: naming the missing part or file and the flag that supplies it.
    """
    file = lavis_file(path)
    main = open_source(file) if file is not None else None
    lm = lm_of(main.keys()) if main is not None else None
    if lm is None:
        raise CheckpointError(f"{path}: not a LAVIS InstructBLIP checkpoint (a .pth holding query_tokens, "
                              "Qformer.bert.* with word embeddings and llm_proj / t5_proj)",
                              hint="`vlmkit inspect` lists what it holds")
    notes: list[str] = []
    parts: list[tuple[str, TensorSource]] = []
    if any(n.startswith(VISION) for n in main.keys()):
        notes.append(f"{file.name} holds its own visual encoder (fine-tuned); it wins over --vision, as in LAVIS")
    elif not options.vision_tower:
        raise ConfigError(f"{file} holds no visual encoder (visual_encoder.*): LAVIS loads EVA ViT-g from "
                          "eva_vit_g.pth first", hint="pass --vision PATH (eva_vit_g.pth, or a state dict of it)")
    else:
        parts.append(("", vit_source(resolve(options.vision_tower))))
    inside = _holds_language_model(main.keys(), lm)
    width = main.info(f"{lm.projection}.weight").shape[0]
    folder = language_model_folder(file, options, lm.model_types, f"{lm.title} ({lm.projection})",
                                   f"{lm.known}, {width} wide", weights_inside=inside)
    if inside:
        notes.append(f"{file.name} holds the language model's weights, which win over --language-model's: "
                     f"{folder.name} gives its config and tokenizer")
    else:
        parts.append(("", language_model_source(folder, lm.prefix)))
    source = CombinedSource([("", main), *parts], path=file) if parts else main
    form = "full" if not parts else "parts"
    return OriginalInstructBlip(file, form, lm, source, folder, read_json(folder / "config.json"),
                                qformer_tokenizer_folder(file), notes)


def qformer_tokenizer_folder(file: Path) -> Path:
    """Where bert-base-uncased's tokenizer files are: ``bert-base-uncased/`` beside the .pth, or beside it."""
    for folder in (file.parent / QFORMER_TOKENIZER_DIR, file.parent):
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    raise ConfigError(f"{file}: the Q-Former reads the instruction with bert-base-uncased's tokenizer, which is in "
                      "no LAVIS file (LAVIS downloads it)",
                      hint=f"copy bert-base-uncased's vocab.txt (or tokenizer.json) and tokenizer_config.json into "
                           f"{file.parent / QFORMER_TOKENIZER_DIR}/")
