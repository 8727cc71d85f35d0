"""Views over readers: several checkpoints as one namespace, or one checkpoint under other names.

Families use these to present what the original code assembles from parts (an LLM
folder + ``mm_projector.bin`` + a CLIP tower; a base model + LoRA adapters) as the one
namespace their rules are written for. Nothing is read until a tensor is.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..lazy import torch

from ..errors import CheckpointError
from .base import TensorInfo, TensorSource


class CombinedSource:
    """Several sources under name prefixes (``""`` for none); names must not collide."""

    def __init__(self, parts: list[tuple[str, TensorSource]], path: Path | None = None):
        self.parts = parts
        self.path = path or parts[0][1].path
        self.format = "+".join(dict.fromkeys(s.format for _, s in parts))
        self._where: dict[str, tuple[TensorSource, str]] = {}
        for prefix, source in parts:
            for name in source.keys():
                full = prefix + name
                if full in self._where:
                    other = self._where[full][0].path
                    raise CheckpointError(f"tensor '{full}' is in both {other} and {source.path}",
                                          hint="pass only one of the checkpoints that hold it")
                self._where[full] = (source, name)

    def keys(self) -> list[str]:
        return list(self._where)

    def files(self) -> list[Path]:
        return [f for _, s in self.parts for f in s.files()]

    def info(self, name: str) -> TensorInfo:
        source, inner = self._where[name]
        return replace(source.info(inner), name=name)

    def read(self, name: str) -> torch.Tensor:
        source, inner = self._where[name]
        return source.read(inner)

    def locate(self, name: str) -> tuple[TensorSource, str]:
        """The part that holds ``name``, and the name there."""
        return self._where[name]

    def close(self) -> None:
        for _, source in self.parts:
            source.close()


class RenamedSource:
    """One source with names mapped through ``mapping`` (old -> new); unmapped names are hidden."""

    def __init__(self, source: TensorSource, mapping: dict[str, str]):
        self.source = source
        self.path = source.path
        self.format = source.format
        self._inner = {new: old for old, new in mapping.items()}

    def keys(self) -> list[str]:
        return list(self._inner)

    def files(self) -> list[Path]:
        return self.source.files()

    def info(self, name: str) -> TensorInfo:
        return replace(self.source.info(self._inner[name]), name=name)

    def read(self, name: str) -> torch.Tensor:
        return self.source.read(self._inner[name])

    def locate(self, name: str) -> tuple[TensorSource, str]:
        """The source that holds ``name``, and the name there."""
        return self.source, self._inner[name]

    def close(self) -> None:
        self.source.close()
