"""GGUF through gguf-py: ``GGUFReader`` for reading, ``GGUFWriter``'s staged API for streaming writes.

GGUF lists dimensions innermost first; everything vlmkit exposes is in torch order.
Quantised tensors are dequantised to float32 on read (their ``TensorInfo.dtype`` keeps
the ggml type name, e.g. ``"Q8_0"``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from ..lazy import torch

from ..errors import CheckpointError, OutputError
from . import _pages
from .base import TensorInfo

T = gguf.GGMLQuantizationType
# ggml types stored as plain numbers, with their safetensors dtype code
PLAIN_TYPES: dict[T, str] = {
    T.F32: "F32", T.F16: "F16", T.BF16: "BF16", T.F64: "F64",
    T.I8: "I8", T.I16: "I16", T.I32: "I32", T.I64: "I64",
}


class GGUFSource:
    """Lazy reader of one GGUF file. ``fields`` holds its metadata as plain values."""

    format = "gguf"

    def __init__(self, path: Path):
        self.path = path
        try:
            self._reader = gguf.GGUFReader(path)
        except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError/struct.error/IndexError on bad files
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})",
                                  hint="the file may be truncated; download or copy it again") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._infos = {
            t.name: TensorInfo(
                t.name,
                tuple(int(d) for d in reversed(t.shape.tolist())),
                PLAIN_TYPES.get(t.tensor_type, t.tensor_type.name),
                int(t.n_bytes),
                path,
            )
            for t in self._reader.tensors
        }

    @property
    def fields(self) -> dict[str, object]:
        """Metadata keys and their values (strings decoded, arrays as lists)."""
        return {name: field.contents() for name, field in self._reader.fields.items()
                if not name.startswith("GGUF.")}

    def keys(self) -> list[str]:
        return list(self._infos)

    def files(self) -> list[Path]:
        return [self.path]

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def ggml_type(self, name: str) -> T:
        return self._tensors[name].tensor_type

    def read(self, name: str) -> torch.Tensor:
        t = self._tensors[name]
        info = self._infos[name]
        if t.tensor_type == T.BF16:  # numpy has no bfloat16: keep the bits
            array = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16)
        elif t.tensor_type in PLAIN_TYPES:
            array = torch.from_numpy(np.array(t.data))
        else:
            array = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
        _pages.release(t.data.ctypes.data, int(t.n_bytes))
        return array.reshape(info.shape)

    def close(self) -> None:
        self._tensors.clear()


@dataclass(frozen=True)
class GGUFTensorSpec:
    """A tensor the GGUF writer will receive, in torch shape order."""

    name: str
    shape: tuple[int, ...]
    ggml_type: T

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        return int(np.prod(self.shape)) // block * type_size


class GGUFStreamWriter:
    """Writes one GGUF file: metadata first, then tensors one at a time in planned order.

    Use ``kv`` (the underlying ``gguf.GGUFWriter``) for the typed ``add_*`` metadata
    calls before ``begin()``.
    """

    def __init__(self, path: Path, arch: str, specs: list[GGUFTensorSpec]):
        self.path = path
        self.kv = gguf.GGUFWriter(path, arch)
        self.specs = list(specs)
        self._next = 0
        for spec in self.specs:
            if spec.ggml_type in PLAIN_TYPES:
                np_dtype = {T.BF16: np.uint16}.get(spec.ggml_type) or _numpy_dtype(spec.ggml_type)
                self.kv.add_tensor_info(spec.name, spec.shape, np.dtype(np_dtype), spec.nbytes,
                                        raw_dtype=spec.ggml_type if spec.ggml_type == T.BF16 else None)
            else:
                self.kv.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), spec.nbytes,
                                        raw_dtype=spec.ggml_type)

    def begin(self) -> None:
        self.kv.write_header_to_file(self.path)
        self.kv.write_kv_data_to_file()
        self.kv.write_ti_data_to_file()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Encode ``tensor`` (any float dtype) to the planned ggml type and append it."""
        if self._next >= len(self.specs):
            raise OutputError(f"tensor '{name}' arrived after every planned GGUF tensor was written")
        spec = self.specs[self._next]
        if name != spec.name:
            raise OutputError(f"tensor '{name}' arrived out of order; the GGUF layout expects '{spec.name}' next")
        if tuple(tensor.shape) != spec.shape:
            raise OutputError(f"tensor '{name}' is {tuple(tensor.shape)}, the plan said {spec.shape}")
        data = encode(tensor, spec.ggml_type)
        if spec.ggml_type == T.F16:
            _check_f16(name, tensor, data)
        self.kv.write_tensor_data(data)
        self._next += 1

    def close(self) -> dict[str, str]:
        if self._next != len(self.specs):
            raise OutputError(f"GGUF writer closed before tensor '{self.specs[self._next].name}' was written")
        self.kv.close()
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        return {self.path.name: digest.hexdigest()}


F16_MAX = float(np.finfo(np.float16).max)


def _check_f16(name: str, tensor: torch.Tensor, data: np.ndarray) -> None:
    """Refuse values float16 cannot hold (they would become inf) instead of writing them."""
    if np.isfinite(data).all():
        return
    peak = float(tensor.detach().float().abs().nan_to_num(0.0, 0.0, 0.0).max())
    if peak > F16_MAX:
        raise OutputError(f"tensor '{name}' holds values up to {peak:.4g}, beyond float16's {F16_MAX:.0f}; "
                          "F16 cannot hold it", hint="write this model with --dtype f32 or bf16")


def _numpy_dtype(ggml_type: T):
    return {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.I8: np.int8,
            T.I16: np.int16, T.I32: np.int32, T.I64: np.int64}[ggml_type]


def encode(tensor: torch.Tensor, ggml_type: T) -> np.ndarray:
    """Turn a torch tensor into the numpy bytes GGUF stores for ``ggml_type``."""
    if ggml_type == T.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if ggml_type in PLAIN_TYPES:
        return tensor.to(getattr(torch, np.dtype(_numpy_dtype(ggml_type)).name)).contiguous().numpy()
    return gguf.quants.quantize(tensor.to(torch.float32).contiguous().numpy(), ggml_type)
