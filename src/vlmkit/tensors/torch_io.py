"""PyTorch checkpoints (``.bin``, ``.pt``, ``.pth``), read only through the restricted unpickler.

``torch.load(weights_only=True, mmap=True)`` admits tensors, containers and numbers
and refuses every other global before it runs; with ``mmap`` it reads no tensor data
while unpickling, so listing a checkpoint is cheap. Legacy (pre-zip) files cannot be
mapped: they are read whole, still through the restricted unpickler.

Tensor bytes are then read with ``pread`` at their place in the file (located through
the mapping, checked against the zip's records): one copy, where copying out of the
mapping costs a page fault per 4 KB on top (2-3 x the CPU time per byte).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

from ..lazy import torch

from ..errors import CheckpointError, UnsafeCheckpointError
from . import _pages
from .base import TORCH_TO_CODE, TensorInfo

INDEX_NAME = "pytorch_model.bin.index.json"
# Containers that training code wraps a state dict in, tried in this order.
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "model_state")


def load_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Unpickle a checkpoint safely and return its flat ``{name: tensor}`` state dict.

    Returns:
        (state dict, mapped): ``mapped`` is True when the tensors are memory-mapped
        views of the file (zip format: no data read yet), False for legacy files.

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allow-list
            (e.g. ``os.system``); nothing in the file has run.
        CheckpointError: the file is truncated, corrupted, or holds no state dict.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        mapped = True
    except pickle.UnpicklingError as e:
        raise _unsafe(path, e) from None
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})",
                                  hint="the file may be truncated; download or copy it again") from None
        try:  # legacy format: no mapping possible, same restricted unpickler
            obj = torch.load(path, map_location="cpu", weights_only=True)
            mapped = False
        except pickle.UnpicklingError as e2:
            raise _unsafe(path, e2) from None
        except Exception as e2:  # noqa: BLE001 - anything torch raises on a broken file
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e2)})") from None
    except (EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None
    return _find_state_dict(path, obj), mapped


def _unsafe(path: Path, error: Exception) -> CheckpointError:
    text = str(error)
    match = re.search(r"GLOBAL ([\w.]+)", text)
    if match:
        return UnsafeCheckpointError(
            f"{path}: refused to load: the pickle asks for '{match.group(1)}', which is not a tensor or container; "
            "nothing from the file was run",
            hint="if you trust the file, re-save it as safetensors with the code that made it",
        )
    return CheckpointError(f"{path}: not a loadable checkpoint ({_first_line(error)})")


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)


def _find_state_dict(path: Path, obj) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}
    if not obj:
        return {}
    raise CheckpointError(
        f"{path}: found no tensors at the top level nor under {', '.join(WRAPPER_KEYS)}; "
        f"top-level keys are {', '.join(map(str, list(obj)[:10]))}"
    )


def file_offsets(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Where the bytes of each mapped, contiguous tensor of ``path`` start in the file.

    ``torch.load(weights_only=True, mmap=True)`` maps the file once and slices every storage out of that
    mapping, so a tensor's address minus the mapping's start is its file offset. The start
    is not exposed: exactly one start must put every storage where a stored (uncompressed)
    ``data/<key>`` record's bytes begin, with the record's size. Otherwise, or when the file
    was saved big-endian (torch swaps such bytes in memory), no offset is returned and
    reads go through the mapping.
    """
    records: dict[int, int] = {}  # offset of a data record's bytes -> its size
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            if info.filename.endswith("/byteorder") and archive.read(info).strip() != b"little":
                return {}
            if "/data/" not in info.filename or info.compress_type != zipfile.ZIP_STORED:
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                return {}
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            records[info.header_offset + 30 + name_len + extra_len] = info.file_size
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors.values() if t.numel()}
    if not storages or not records:
        return {}
    # the start must put both the first and the last storage on a record (other tensors of the
    # file, e.g. an optimizer's, may hold records too); then every storage, and only one start
    first, last = min(storages), max(storages)
    starts = {first - r for r in records} & {last - r for r in records}
    fits = [b for b in starts if all(records.get(p - b) == n for p, n in storages.items())]
    if len(fits) != 1:
        return {}
    return {name: t.data_ptr() - fits[0] for name, t in tensors.items() if t.numel() and t.is_contiguous()}


class TorchSource:
    """Lazy reader over one or more pickled checkpoints (optionally via an index)."""

    format = "pytorch"

    def __init__(self, path: Path, files: list[Path]):
        self.path = path
        self._files = files
        self._tensors: dict[str, torch.Tensor] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._mapped: set[Path] = set()
        self._offsets: dict[str, int] = {}
        self._fds: dict[Path, int] = {}
        for file in files:
            state_dict, mapped = load_state_dict(file)
            if mapped:
                self._mapped.add(file)
                self._offsets.update(file_offsets(file, state_dict))
            for name, tensor in state_dict.items():
                if name in self._infos:
                    raise CheckpointError(
                        f"tensor '{name}' is in both {self._infos[name].file.name} and {file.name}; "
                        "which one is meant is ambiguous",
                        hint="remove the stale shard, or point vlmkit at the index file",
                    )
                if tensor.dtype not in TORCH_TO_CODE:
                    raise CheckpointError(f"{file}: tensor '{name}' has unsupported dtype {tensor.dtype}")
                self._tensors[name] = tensor
                self._infos[name] = TensorInfo(
                    name, tuple(tensor.shape), TORCH_TO_CODE[tensor.dtype],
                    tensor.numel() * tensor.element_size(), file,
                )

    @classmethod
    def from_index(cls, index_path: Path) -> "TorchSource":
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid index file ({e!r})") from None
        folder = index_path.parent
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(
                f"{index_path.name} names shard(s) that do not exist: {', '.join(missing)}",
                hint="download the missing shard(s) again",
            )
        source = cls(folder, files)
        wrong = [n for n, f in weight_map.items() if n not in source._infos or source._infos[n].file.name != f]
        if wrong:
            raise CheckpointError(
                f"{index_path.name} disagrees with its shards for {len(wrong)} tensor(s), e.g. '{wrong[0]}'",
                hint="the index and the shards come from different saves; download them together",
            )
        return source

    def keys(self) -> list[str]:
        return list(self._infos)

    def files(self) -> list[Path]:
        return list(self._files)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def read(self, name: str) -> torch.Tensor:
        view = self._tensors[name]
        info = self._infos[name]
        offset = self._offsets.get(name)
        if offset is not None:
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            return _pages.pread_exact(fd, info.nbytes, offset, info.file, name).view(view.dtype).reshape(view.shape)
        tensor = view.clone()  # a private copy; the mapped pages can then be let go
        if self._infos[name].file in self._mapped:  # never on heap memory: that would zero it
            _pages.release(view.data_ptr(), view.numel() * view.element_size())
        return tensor

    def stored_at(self, name: str) -> tuple[Path, int] | None:
        """Where a tensor stored uncompressed, contiguous and little-endian starts in its file (else None)."""
        offset = self._offsets.get(name)
        return None if offset is None else (self._infos[name].file, offset)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of dim 0: only their bytes where the tensor lies contiguously in the file."""
        view, info = self._tensors[name], self._infos[name]
        offset = self._offsets.get(name)
        stop = min(stop, info.shape[0])
        if offset is None:
            return view[start:stop].clone()
        row = info.nbytes // info.shape[0]
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        data = _pages.pread_exact(fd, (stop - start) * row, offset + start * row, info.file, name)
        return data.view(view.dtype).reshape(stop - start, *view.shape[1:])

    def close(self) -> None:
        self._tensors.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
