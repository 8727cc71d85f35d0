"""The one protocol every checkpoint reader follows.

A reader lists tensors (name, shape, dtype, file) from headers alone and reads the
bytes of one tensor when asked. Dtypes are spelled as safetensors spells them
("F32", "BF16", ...; ``vlmkit.dtypes``) because that is the on-disk vocabulary shared by
the formats; GGUF's quantised types keep their ggml names ("Q8_0").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Protocol

if TYPE_CHECKING:
    import torch

from .. import dtypes
from ..dtypes import FLOAT_CODES, element_size  # noqa: F401 - re-exported: the vocabulary lives in vlmkit.dtypes
from ..dtypes import code as dtype_code  # noqa: F401


class _TorchDtypes(Mapping):
    """safetensors code -> ``torch.dtype``; membership and listing need no torch, lookups import it."""

    def __getitem__(self, code: str):
        if code not in dtypes.CODES:
            raise KeyError(code)
        return dtypes.torch_dtype(code)

    def __contains__(self, code) -> bool:
        return code in dtypes.CODES

    def __iter__(self):
        return iter(dtypes.CODES)

    def __len__(self) -> int:
        return len(dtypes.CODES)


class _TorchToCode(Mapping):
    """``torch.dtype`` -> safetensors code (the inverse of ``DTYPES``)."""

    def __getitem__(self, dtype) -> str:
        key = str(dtype).removeprefix("torch.")
        for code, (name, _) in dtypes.CODES.items():
            if name == key:
                return code
        raise KeyError(dtype)

    def __iter__(self):
        return iter(DTYPES.values())

    def __len__(self) -> int:
        return len(dtypes.CODES)


DTYPES: Mapping = _TorchDtypes()
TORCH_TO_CODE: Mapping = _TorchToCode()


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor; no data is read to build it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, or a ggml type name for quantised GGUF tensors
    nbytes: int
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class TensorSource(Protocol):
    """A lazily read checkpoint: the listing is free, bytes are read per tensor.

    Optional, where a reader can: ``stored_at(name) -> (file, offset) | None`` (the bytes lie there as
    safetensors stores them: copied file to file, ``tensors.stored_at``), ``read_rows(name, start, stop)``
    (a slice of dim 0, ``tensors.row_reader``); views answer ``locate(name) -> (source, name)``.
    """

    path: Path
    format: str

    def keys(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str) -> torch.Tensor: ...

    def files(self) -> list[Path]: ...

    def close(self) -> None: ...


def iter_infos(source: TensorSource) -> Iterator[TensorInfo]:
    for name in source.keys():
        yield source.info(name)
