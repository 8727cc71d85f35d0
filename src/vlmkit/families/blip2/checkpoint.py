"""The original BLIP-2 (Salesforce LAVIS) checkpoint forms, presented as one namespace.

LAVIS assembles ``Blip2OPT`` / ``Blip2T5`` from three sources (``blip2.py``, ``blip2_opt.py``,
``blip2_t5.py``), and so does this module, without reading any tensor data:

* the EVA ViT-g visual encoder from ``eva_vit_g.pth`` (``cls_token``, ``pos_embed``,
  ``patch_embed.*``, ``blocks.*``): ``--vision PATH``;
* the OPT / Flan-T5 language model from a transformers folder (config, tokenizer, weights):
  ``--language-model PATH``;
* the LAVIS release ``.pth`` (``{"model": state_dict}``), loaded last with
  ``strict=False`` so that whatever it holds wins: the Q-Former, ``query_tokens``,
  ``ln_vision``, ``opt_proj`` / ``t5_proj``, and for the COCO caption models (``freeze_vit:
  False``) the fine-tuned visual encoder too.

A full state dict (``original_model.state_dict()``, everything in one file) needs no
``--vision``; its language model is inside too, but a ``.pth`` never holds a tokenizer, so
``--language-model`` still names the folder its tokenizer and config come from. Whatever the
form, the result is LAVIS's own namespace (``visual_encoder.*``, ``ln_vision.*``,
``Qformer.bert.*``, ``query_tokens``, ``opt_proj.*``, ``opt_model.model.decoder.*`` /
``t5_proj.*``, ``t5_model.*``), so one rule table converts them all and one reference runs them.
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
from .language_models import LanguageModel, of_projection

PICKLES = (".pth", ".pt", ".bin", ".ckpt")
VISION = "visual_encoder."
QFORMER_LAYER = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.")
VIT_BLOCK = re.compile(r"^visual_encoder\.blocks\.(\d+)\.")
# The modules of LAVIS's EVA VisionTransformer (``eva_vit.py``); anything else in eva_vit_g.pth is
# skipped by its load_state_dict(strict=False) and dropped here by rule, by name.
VIT_MODULES = ("cls_token", "pos_embed", "patch_embed.", "blocks.")
UNUSED_VIT = "eva_unused."


@dataclass
class OriginalBlip2:
    """An original BLIP-2 checkpoint of any form, ready to convert or to run."""

    path: Path
    form: str  # "full" (everything in one state dict) | "parts" (release .pth + --vision + --language-model)
    lm: LanguageModel  # its row (language_models.py)
    source: TensorSource  # LAVIS's namespace (see module docstring)
    lm_folder: Path  # config.json + tokenizer of the language model
    lm_config: dict  # its config.json
    notes: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """``opt_model.`` or ``t5_model.``: where the language model lives in the namespace."""
        return self.lm.original_prefix

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.info(name).shape

    def layers(self, pattern: re.Pattern) -> list[int]:
        return sorted({int(m.group(1)) for n in self.source.keys() if (m := pattern.match(n))})


def lavis_file(path: Path) -> Path | None:
    """The LAVIS ``.pth`` a path names: the file itself, or the only pickle in a folder."""
    if path.is_file():
        return path if path.suffix in PICKLES else None
    if path.is_dir():
        candidates = [p for p in sorted(path.iterdir()) if p.suffix in PICKLES and p.is_file()]
        return candidates[0] if len(candidates) == 1 else None
    return None


# What tells LAVIS's three Q-Former models apart by the keys a state dict holds. The ``blip2``, ``instructblip`` and
# ``blip2_retrieval`` recognisers all ask ``lavis_model``, so no file is recognised by two of them.
WORDS = "Qformer.bert.embeddings.word_embeddings.weight"
STAGE1_HEAD = "Qformer.cls."  # the stage-1 captioning head: Blip2Qformer's; InstructBLIP sets it to None
# the projection into a language model -> the families whose model has it (Blip2OPT / Blip2T5; Blip2VicunaInstruct /
# Blip2T5Instruct); Blip2Qformer has none
LANGUAGE_PROJECTIONS = {"opt_proj.weight": ("blip2",), "t5_proj.weight": ("blip2", "instructblip"),
                        "llm_proj.weight": ("instructblip",)}
# Blip2Qformer (blip2_qformer.py): the text side and both retrieval heads
STAGE1 = ("vision_proj.weight", "text_proj.weight", "itm_head.weight", WORDS)


def lavis_model(names) -> str | None:
    """Which family a LAVIS state dict belongs to, from its key names alone (None: none of them).

    * ``blip2_retrieval``: no projection into a language model, and Blip2Qformer's text side and heads;
    * ``instructblip``: the Q-Former reads the instruction: its word embeddings kept and no stage-1 head
      (``blip2_*_instruct.py``: ``resize_token_embeddings``, ``Qformer.cls = None``), and ``llm_proj`` or ``t5_proj``;
    * ``blip2``: ``opt_proj`` / ``t5_proj`` and a Q-Former that reads no text: no word embeddings (``Blip2OPT`` /
      ``Blip2T5`` set them to None) or, in the releases saved from a stage-1 initialised model, the ``Qformer.cls``
      head beside them.
    """
    names = set(names)
    if "query_tokens" not in names or not any(n.startswith("Qformer.bert.") for n in names):
        return None
    projections = [p for p in LANGUAGE_PROJECTIONS if p in names]
    if not projections:
        return "blip2_retrieval" if all(n in names for n in STAGE1) else None
    if len(projections) > 1:
        return None
    reads_instruction = WORDS in names and not any(n.startswith(STAGE1_HEAD) for n in names)
    family = "instructblip" if reads_instruction else "blip2"
    return family if family in LANGUAGE_PROJECTIONS[projections[0]] else None


def lm_kind(names) -> LanguageModel | None:
    """The language model's row of a BLIP-2 OPT / T5 state dict from its key names (``lavis_model``), or None."""
    names = set(names)
    return of_projection(names) if lavis_model(names) == "blip2" else None


def form_of(path: Path) -> str | None:
    """``"full"`` / ``"parts"`` when ``path`` is a LAVIS BLIP-2 OPT/T5 checkpoint, else None. Reads no tensor data."""
    file = lavis_file(path)
    tensors = peek_state_dict(file) if file is not None else None
    kind = lm_kind(tensors or ())
    if kind is None:
        return None
    inside = any(n.startswith(kind.original_prefix) for n in tensors) and any(n.startswith(VISION) for n in tensors)
    return "full" if inside else "parts"


def open_original(path: Path, options: LoadOptions) -> OriginalBlip2:
    """Open an original BLIP-2 checkpoint of any form; checks what can be checked without data.

    Raises:
        CheckpointError / ConfigError: naming the missing part or file and the flag that supplies it.
    """
    file = lavis_file(path)
    if file is None:
        raise CheckpointError(f"{path}: not a LAVIS BLIP-2 checkpoint (a .pth holding query_tokens, "
                              "Qformer.bert.* and opt_proj / t5_proj)")
    main = open_source(file)
    lm = lm_kind(main.keys())
    if lm is None:
        raise CheckpointError(f"{file}: no query_tokens / Qformer.bert.* / opt_proj or t5_proj: not BLIP-2 OPT or T5",
                              hint="`vlmkit inspect` lists what the file holds")
    notes: list[str] = []
    parts: list[tuple[str, TensorSource]] = []
    has_vit = any(n.startswith(VISION) for n in main.keys())
    if options.vision_tower and has_vit:
        notes.append(f"{file.name} holds its own visual encoder (fine-tuned); it wins over --vision, as in LAVIS")
    elif not has_vit:
        if not options.vision_tower:
            raise ConfigError(f"{file} holds no visual encoder (visual_encoder.*): LAVIS loads EVA ViT-g from "
                              "eva_vit_g.pth first", hint="pass --vision PATH (eva_vit_g.pth, or a state dict of it)")
        parts.append(("", vit_source(resolve(options.vision_tower))))
    lm_folder = _lm_folder(file, lm, main, options)
    has_lm = any(n.startswith(lm.original_prefix) for n in main.keys())
    if has_lm:
        notes.append(f"{file.name} holds the language model's weights; {lm_folder.name} gives its config and tokenizer")
    else:
        parts.append(("", language_model_source(lm_folder, lm.original_prefix, lm.headless)))
    source = CombinedSource([("", main), *parts], path=file) if parts else main
    lm_config = read_json(lm_folder / "config.json")
    form = "full" if not parts else "parts"
    return OriginalBlip2(file, form, lm, source, lm_folder, lm_config, notes)


def vit_source(path: Path) -> TensorSource:
    """eva_vit_g.pth's tensors under ``visual_encoder.``; tensors LAVIS's ViT has no module for are kept aside."""
    source = open_source(path)
    if not any(n in ("cls_token", "pos_embed") for n in source.keys()):
        raise CheckpointError(f"{path}: not an EVA ViT state dict (no cls_token / pos_embed)",
                              hint="--vision takes eva_vit_g.pth, the visual encoder LAVIS downloads")
    mapping = {n: (VISION if n.startswith(VIT_MODULES) else UNUSED_VIT) + n for n in source.keys()}
    return RenamedSource(source, mapping)


def _lm_folder(file: Path, lm: LanguageModel, main: TensorSource, options: LoadOptions) -> Path:
    proj = main.info(f"{lm.original_projection}.weight").shape[0]
    known = lm.known.get(proj, f"the {lm.title} model whose width is {proj}")
    return language_model_folder(file, options, lm.model_types, f"{lm.title} ({lm.original_projection})",
                                 f"a local folder of {known} (LAVIS loads it from the hub)",
                                 weights_inside=any(n.startswith(lm.original_prefix) for n in main.keys()))


def language_model_folder(file: Path, options: LoadOptions, model_types: tuple[str, ...], trained_with: str,
                          known: str, *, weights_inside: bool) -> Path:
    """The ``--language-model`` folder of a LAVIS checkpoint: its config.json and tokenizer, which no ``.pth`` holds,
    and its weights unless the checkpoint holds them. ``trained_with``: the model and its projection, in words;
    ``known``: the folder LAVIS's config names (hints)."""
    if not options.model_base:
        raise ConfigError(f"{file}: the language model's tokenizer and config are in no LAVIS checkpoint",
                          hint=f"pass --language-model PATH: {known} (config.json + tokenizer"
                               f"{'' if weights_inside else ' + weights'})")
    folder = resolve(options.model_base)
    if not (folder / "config.json").exists():
        raise ConfigError(f"--language-model {folder}: no config.json", hint=f"pass {known}")
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type not in model_types:
        raise ConfigError(f"--language-model {folder}: model_type {model_type!r}, but {file.name} was trained with "
                          f"{trained_with}", hint=f"pass {known}")
    return folder


def language_model_source(folder: Path, prefix: str, headless: tuple[str, str] | None = None) -> TensorSource:
    """The ``--language-model`` folder's weights under ``prefix`` (``opt_model.``, ``llm_model.``, ...), as LAVIS's
    module holds them. ``headless``: (start, where) of names saved from the base model (see ``language_models``)."""
    try:
        source = open_source(folder)
    except CheckpointError as e:
        raise ConfigError(f"--language-model {folder}: no weights ({e.message})",
                          hint="the checkpoint has no language model inside, so the folder must hold its weights") from None
    mapping = {}
    for name in source.keys():
        if headless and name.startswith(headless[0]):  # saved from the base model (OPTModel: older hub files)
            mapping[name] = prefix + headless[1] + name
        else:
            mapping[name] = prefix + name
    return RenamedSource(source, mapping)
