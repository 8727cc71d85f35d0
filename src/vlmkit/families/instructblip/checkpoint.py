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

What tells it from plain BLIP-2 (``families.blip2``): ``llm_proj`` (Blip2OPT/Blip2T5 have
``opt_proj`` / ``t5_proj``), or ``t5_proj`` together with the Q-Former's word embeddings and no
``Qformer.cls`` (InstructBLIP keeps the text side because the Q-Former reads the instruction, and
sets ``Qformer.cls`` to None before anything is saved; a BLIP-2 file has either no word embeddings
(Blip2T5 sets them to None) or the stage-1 ``Qformer.cls`` head beside them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import CheckpointError, ConfigError
from ...options import LoadOptions, read_json
from ...tensors import TensorSource, open_source, resolve
from ...tensors.safe_pickle import peek_state_dict
from ...tensors.views import CombinedSource, RenamedSource
from ..blip2.checkpoint import VISION, _lavis_file, _vit_source

WORDS = "Qformer.bert.embeddings.word_embeddings.weight"
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

    path: Path  # the release .pth
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
    """The language model of an InstructBLIP state dict from its key names, or None (see the module docstring)."""
    names = set(names)
    if "query_tokens" not in names or WORDS not in names:
        return None
    if "llm_proj.weight" in names:
        return LANGUAGE_MODELS["vicuna"]
    if "t5_proj.weight" in names and not any(n.startswith("Qformer.cls.") for n in names):
        return LANGUAGE_MODELS["t5"]
    return None


def form_of(path: Path) -> str | None:
    """``"parts"`` when ``path`` is an InstructBLIP release ``.pth`` (or the folder holding it), else None."""
    file = _lavis_file(path)
    tensors = peek_state_dict(file) if file is not None else None
    return "parts" if lm_of(tensors or ()) is not None else None


def open_original(path: Path, options: LoadOptions) -> OriginalInstructBlip:
    """Open an InstructBLIP release with its parts; checks what can be checked without data.

    Raises:
        CheckpointError / ConfigError: naming the missing part or file and the flag that supplies it.
    """
    file = _lavis_file(path)
    main = open_source(file) if file is not None else None
    lm = lm_of(main.keys()) if main is not None else None
    if lm is None:
        raise CheckpointError(f"{path}: not a LAVIS InstructBLIP checkpoint (a .pth holding query_tokens, "
                              "Qformer.bert.* with word embeddings and llm_proj / t5_proj)",
                              hint="`vlmkit inspect` lists what it holds")
    if any(n.startswith(lm.prefix) and not n.endswith(".inv_freq") for n in main.keys()):
        raise CheckpointError(f"{file}: holds the language model's weights ({lm.prefix}*); vlmkit converts the "
                              "released form, whose language model is frozen and saved apart",
                              hint=f"pass the trimmed .pth LAVIS releases and --language-model ({lm.known})")
    notes: list[str] = []
    parts: list[tuple[str, TensorSource]] = []
    if any(n.startswith(VISION) for n in main.keys()):
        notes.append(f"{file.name} holds its own visual encoder (fine-tuned); it wins over --vision, as in LAVIS")
    elif not options.vision_tower:
        raise ConfigError(f"{file} holds no visual encoder (visual_encoder.*): LAVIS loads EVA ViT-g from "
                          "eva_vit_g.pth first", hint="pass --vision PATH (eva_vit_g.pth, or a state dict of it)")
    else:
        parts.append(("", _vit_source(resolve(options.vision_tower))))
    folder = _lm_folder(file, lm, main, options)
    parts.append(("", _lm_source(folder, lm)))
    source = CombinedSource([("", main), *parts], path=file)
    return OriginalInstructBlip(file, lm, source, folder, read_json(folder / "config.json"),
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


def _lm_folder(file: Path, lm: LanguageModel, main: TensorSource, options: LoadOptions) -> Path:
    width = main.info(f"{lm.projection}.weight").shape[0]
    if not options.model_base:
        raise ConfigError(f"{file}: InstructBLIP's {lm.title} is in no LAVIS release (it is frozen and saved apart)",
                          hint=f"pass --language-model PATH: {lm.known}, {width} wide (config.json, tokenizer, weights)")
    folder = resolve(options.model_base)
    if not (folder / "config.json").exists():
        raise ConfigError(f"--language-model {folder}: no config.json", hint=f"pass {lm.known}")
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type not in lm.model_types:
        raise ConfigError(f"--language-model {folder}: model_type {model_type!r}, but {file.name} was trained with "
                          f"{lm.title} ({lm.projection})", hint=f"pass {lm.known}")
    return folder


def _lm_source(folder: Path, lm: LanguageModel) -> TensorSource:
    """The language model folder's weights under ``llm_model.`` / ``t5_model.``, as LAVIS's module holds them."""
    try:
        source = open_source(folder)
    except CheckpointError as e:
        raise ConfigError(f"--language-model {folder}: no weights ({e.message})",
                          hint="InstructBLIP releases hold no language model, so the folder must hold its weights") \
            from None
    return RenamedSource(source, {name: lm.prefix + name for name in source.keys()})
