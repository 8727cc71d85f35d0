"""Model families: the one door between the shared layers and what a model family *is*.

``find(path)`` asks each family in ``FAMILIES`` whether it recognises the path and in which
*form* (an original checkpoint, a LoRA run, a transformers folder, ...). The family's
``FORMS`` table says which capabilities that form has; ``require(path, capability)`` returns
the ``Found`` or refuses with one message shape naming the path, what it is and what vlmkit can
do with it. The shared layers (``runtime/``, ``data/``, ``train/``, ``serve/``, ``conversion/``,
``cli.py``) never import a family subpackage: they call ``found.family.<capability>(found, ...)``.

Adding a family is adding its package here and its name to ``FAMILIES``. A family package provides:

    NAME: str
    FORMS: dict[str, tuple[str, ...]]        form -> the capabilities that form has
    recognise(path, config) -> str | None     the form, or None
    and one module-level function per capability it has, each taking the ``Found`` first:
    describe(found) -> dict                                   (``vlmkit inspect``)
    conversion(found, options) -> conversion.engine.Conversion (``--to hf``)
    gguf(found, options, gguf_options) -> GGUFConversion       (``--to gguf``)
    verify(found, converted, options, probes, *, max_new_tokens) -> parity Report
    chat_backend(found, options) -> a runtime backend          (chat, serve)
    data_model(found, options, *, max_length) -> data.model.DataModel
    training(found, options, ...)                              (train)
    vllm_view(found), card_kind(found)
    score(found, options) -> runtime.scoring.Scorer             (vlmkit score, serve's /v1/score)
and, for the registry walk (tests/test_registry_walk.py): ``variants()``, ``make_tiny(folder, variant)``,
``tiny_options(folder, variant)``, ``REVERSIBLE``, ``GENERATES``.

A capability function never shares its name with a submodule of its package (importing the submodule
would replace the function): the GGUF writer is ``gguf_export.py``, the tiny builders ``tiny.py``.
Family packages are imported on first use, so ``import vlmkit.families`` costs nothing.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..errors import ConfigError

# the order in which they are asked: instructblip before blip2 (a Flan-T5 InstructBLIP has t5_proj too)
FAMILIES: tuple[str, ...] = ("llava", "instructblip", "blip2", "flava", "clip", "blip2_retrieval")

# What each capability lets a user do, for the refusal message.
CAPABILITIES: dict[str, str] = {
    "describe": "describe it (vlmkit inspect)",
    "conversion": "convert it to transformers (--to hf)",
    "gguf": "convert it to GGUF (--to gguf)",
    "verify": "verify a conversion of it",
    "chat_backend": "chat with it and serve it",
    "data_model": "tokenize data for it",
    "training": "train from it",
    "vllm_view": "serve it with vLLM",
    "card_kind": "write its model card",
    "score": "score images against texts (vlmkit score, vlmkit serve's /v1/score)",
}


@dataclass(frozen=True)
class Found:
    """A path a family recognised, and in which form."""

    family: ModuleType
    path: Path
    config: dict | None
    form: str

    @property
    def name(self) -> str:
        return self.family.NAME

    def can(self, capability: str) -> bool:
        return capability in self.family.FORMS.get(self.form, ()) and hasattr(self.family, capability)

    def abilities(self) -> list[str]:
        return [c for c in CAPABILITIES if self.can(c)]


def read_config(path: Path) -> dict | None:
    """The ``config.json`` beside a checkpoint (in the folder, or beside the file), if any."""
    folder = path if path.is_dir() else path.parent
    file = folder / "config.json"
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError:
        return None


def load(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def families() -> list[ModuleType]:
    """Every family package, in recognition order (the registry walk test, the README table)."""
    return [load(name) for name in FAMILIES]


def find(path: Path, config: dict | None = None) -> Found | None:
    """The family and form that recognise ``path``, or None."""
    path = Path(path)
    config = config if config is not None else read_config(path)
    for family in families():
        form = family.recognise(path, config)
        if form is not None:
            return Found(family, path, config, form)
    return None


def can(found: Found | None, capability: str) -> bool:
    return found is not None and found.can(capability)


def require(path: Path, capability: str, config: dict | None = None) -> Found:
    """``find(path)`` when its form has ``capability``; else one ConfigError saying what it is and what it can do."""
    if capability not in CAPABILITIES:
        raise ValueError(f"unknown capability {capability!r}")
    found = find(path, config)
    if found is not None and found.can(capability):
        return found
    wanted = CAPABILITIES[capability]
    if found is None:
        names = ", ".join(FAMILIES)
        raise ConfigError(f"{path}: vlmkit cannot {wanted}: no family it knows ({names}) recognises it",
                          hint="`vlmkit inspect` shows what it is")
    able = "; ".join(CAPABILITIES[c] for c in found.abilities())
    able = f"it can {able}" if able else "it can do nothing else with it"
    raise ConfigError(f"{path}: a {found.name} checkpoint ({found.form} form); vlmkit cannot {wanted}: {able}",
                      hint="`vlmkit inspect` shows what it is")
