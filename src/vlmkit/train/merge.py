"""``vlmkit merge-lora``: a LoRA run + its base -> one standalone model, written as the run's family writes it.

The family that recognises the run (``families.find``; its ``training`` capability) checks the pair
and merges (LLaVA: streamed through the conversion engine, into its original or the llava-hf layout).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .. import families
from ..errors import ConfigError
from ..options import LoadOptions
from ..tensors import resolve

FORMATS = ("original", "transformers")


def merge_lora(adapter: str | Path, base: str | Path, output: str | Path, *, format: str = "original",
               options: LoadOptions | None = None, force: bool = False, progress=None,
               announce: Callable[[str], None] | None = None):
    """Merge the LoRA run ``adapter`` into ``base`` and write one standalone folder.

    Args:
        adapter: the LoRA run folder (LLaVA: ``adapter_config.json``, ``adapter_model.safetensors``,
            ``non_lora_trainables.bin``, ``config.json``).
        base: the model it was trained on.
        output: the new folder (refused if it exists, unless ``force``).
        format: "original" (the family's own layout) or "transformers" (with processor).
        options: loading options (``--vision-tower`` where the CLIP folder moved, ``--dtype``).
        progress: as ``conversion.engine.run``'s.
        announce: receives a note when the base cannot be checked.

    Returns:
        ``conversion.engine.Result``.

    Raises:
        ConfigError: wrong pair or format (before anything is read); PlanError; OutputError.
    """
    if format not in FORMATS:
        raise ConfigError(f"--format {format!r} is unknown", hint=f"use one of: {', '.join(FORMATS)}")
    adapter = resolve(adapter)
    found = families.find(adapter)
    if not families.can(found, "training"):
        raise ConfigError(f"{adapter} is not a LoRA run",
                          hint="merge-lora takes the folder with adapter_config.json + non_lora_trainables.bin")
    composition = found.family.training(found, options or LoadOptions())
    return composition.merge_lora(base, output, format=format, force=force, progress=progress, announce=announce)
