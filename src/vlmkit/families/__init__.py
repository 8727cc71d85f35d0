"""Model families, found through a plain table.

``ARCHITECTURES`` maps a config's ``architectures`` entry to the module that knows the
family; ``RECOGNISERS`` lists modules to ask, in order, for checkpoints without one
(original research checkpoints, bare state dicts). Adding a family is adding its
module here: nothing in ``convert/`` or ``cli.py`` changes.

A family module provides:
    NAME: str
    recognise(path: Path, config: dict | None) -> bool
    conversion(path: Path, options: LoadOptions) -> vlmkit.convert.Conversion
    describe(path: Path, config: dict | None) -> dict   (shown by ``vlmkit inspect``)
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

ARCHITECTURES: dict[str, str] = {
    "LlavaLlamaForCausalLM": "llava",
    "LlavaMistralForCausalLM": "llava",
    "LlavaQwenForCausalLM": "llava",
    "CLIPModel": "clip",
}
RECOGNISERS: list[str] = ["llava", "blip2", "flava"]


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


def detect(path: Path, config: dict | None = None) -> ModuleType | None:
    """The family module that recognises ``path``, or None."""
    config = config if config is not None else read_config(path)
    for arch in (config or {}).get("architectures") or []:
        if arch in ARCHITECTURES:
            return load(ARCHITECTURES[arch])
    for name in RECOGNISERS:
        module = load(name)
        if module.recognise(path, config):
            return module
    return None
