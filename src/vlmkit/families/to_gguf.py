"""Which family module writes (and verifies) GGUF for a checkpoint: two plain tables.

``GGUF_WRITERS`` maps a family's ``NAME`` (from ``families.find``, which also recognises a
family's own transformers folders) to its GGUF module under ``vlmkit.families``. A GGUF module provides ``conversion(path, options, gguf_options)`` and may
provide ``verify(original, folder, options, probes, max_new_tokens=...)``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from ..conversion.gguf_sink import GGUFConversion, GGUFOptions
from ..errors import ConfigError
from ..options import LoadOptions
from ..tensors import resolve
from . import find, read_config

GGUF_WRITERS = {"llava": "llava.gguf", "clip": "clip.gguf"}
GGUF_VERIFIERS = {"llava": "llava.gguf_parity", "clip": "clip.gguf_parity"}


def family_of(path: Path) -> str | None:
    """The family name for GGUF purposes: ``llava.projector`` files, vlmkit families, transformers folders."""
    found = find(path, read_config(path))
    return found.name if found is not None else None


def _module(table: dict[str, str], name: str | None, path: Path, what: str) -> ModuleType:
    if name not in table:
        raise ConfigError(f"{path}: vlmkit {what} GGUF for {', '.join(sorted(table))} models; this is "
                          f"{'a ' + name + ' model' if name else 'not one of them'}",
                          hint="`vlmkit inspect` shows what it is")
    return importlib.import_module(f"{__package__}.{table[name]}")


def prepare(source: str | Path, options: LoadOptions | None = None,
            gguf_options: GGUFOptions | None = None) -> GGUFConversion:
    """The GGUF conversion of ``source`` (its family's GGUF module decides the files)."""
    path = resolve(source)
    return _module(GGUF_WRITERS, family_of(path), path, "writes").conversion(
        path, options or LoadOptions(), gguf_options or GGUFOptions())


def is_gguf_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any(path.glob("*.gguf"))


def verify(original: str | Path, folder: str | Path, options: LoadOptions, probes, *, max_new_tokens: int = 8):
    """Parity report of a GGUF folder against the model it was converted from."""
    path = resolve(original)
    return _module(GGUF_VERIFIERS, family_of(path), path, "verifies").verify(
        path, Path(folder), options, probes, max_new_tokens=max_new_tokens)


def convert(source: str | Path, destination: str | Path, *, type_name: str | None = None,
            options: LoadOptions | None = None, gguf_options: GGUFOptions | None = None, force: bool = False,
            dry_run: bool = False, progress=None):
    """``vlmkit convert SOURCE DESTINATION --to gguf`` as a function.

    Example:
        >>> from vlmkit.families.to_gguf import convert                                  # doctest: +SKIP
        >>> convert("llava-v1.5-7b", "llava-gguf", type_name="q8_0",
        ...         options=LoadOptions(vision_tower="clip-vit-large-patch14-336")).files  # doctest: +SKIP
        {'llava-v1.5-7b-q8_0.gguf': '...', 'mmproj-llava-v1.5-7b-q8_0.gguf': '...'}

    Returns:
        ``vlmkit.conversion.Result`` (its ``plan`` is the ``GGUFPlan``).
    """
    from ..conversion import gguf_sink, output

    return gguf_sink.run(prepare(source, options, gguf_options), destination, type_name=type_name, force=force,
                         dry_run=dry_run, progress=progress, provenance=output.provenance(options or LoadOptions()))
