"""The one protocol every checkpoint reader follows, and the dtype vocabulary.

A reader lists tensors (name, shape, dtype, file) from headers alone and reads the
bytes of one tensor when asked. Dtypes are spelled as safetensors spells them
("F32", "BF16", ...) because that is the on-disk vocabulary shared by the formats;
GGUF's quantised types keep their ggml names ("Q8_0").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_CODE: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def element_size(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    return torch.empty((), dtype=DTYPES[code]).element_size()


def dtype_code(dtype: torch.dtype | str) -> str:
    """Normalise ``torch.float16`` / ``"float16"`` / ``"fp16"`` / ``"F16"`` to ``"F16"``."""
    if isinstance(dtype, torch.dtype):
        return TORCH_TO_CODE[dtype]
    aliases = {
        "float32": "F32", "fp32": "F32", "f32": "F32",
        "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
        "bfloat16": "BF16", "bf16": "BF16",
        "float64": "F64", "f64": "F64",
    }
    key = dtype.strip()
    if key.upper() in DTYPES:
        return key.upper()
    if key.lower() in aliases:
        return aliases[key.lower()]
    raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")


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
    """A lazily read checkpoint: the listing is free, bytes are read per tensor."""

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
