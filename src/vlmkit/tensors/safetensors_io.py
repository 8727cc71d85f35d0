"""safetensors: a validating lazy reader and a streaming sharded writer.

The format is an 8-byte little-endian header length, a JSON header mapping each
tensor to its dtype, shape and byte range, then raw data. Both sides are written by
hand here, for memory reasons the library cannot meet:

* reading: ``safe_open`` maps the whole file, and every page a conversion touches
  stays in the process's resident set while the handle is open, so peak RSS grows
  with the shard. ``os.preadv`` into a fresh buffer keeps it at one tensor.
  (Tests compare this reader with ``safe_open`` on the same files.)
* writing: ``safetensors.torch.save_file`` needs every tensor of a file in memory.
  Shapes are known from the plan, so the header is written first and tensors
  stream after it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..lazy import torch

from ..errors import CheckpointError, OutputError
from ._pages import copy_file_range, hash_file_range, pread_exact
from .base import DTYPES, TORCH_TO_CODE, TensorInfo, element_size

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_HASH_AHEAD = 2  # pieces written but not yet hashed


def read_header(path: Path) -> tuple[dict, dict[str, tuple[TensorInfo, int]]]:
    """Parse and validate one file's header.

    Returns:
        (metadata, {name: (TensorInfo, absolute byte offset of the data)}).

    Raises:
        CheckpointError: naming the file and the tensor for every inconsistency a
            truncated or corrupted file shows: a header length beyond the file size,
            unknown dtypes, byte ranges that overlap, leave the file or disagree with
            the shape.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > _MAX_HEADER:
            raise CheckpointError(
                f"{path}: header length {n} is beyond the file size {size}; the file is truncated or not safetensors",
                hint="download or copy the file again",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); the file is corrupted") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupted")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    entries: dict[str, tuple[TensorInfo, int]] = {}
    ranges = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: header entry for '{name}' lacks dtype/shape/data_offsets") from None
        if dtype not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor '{name}' has unknown dtype {dtype!r} (known: {', '.join(DTYPES)})"
            )
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: tensor '{name}' has an invalid shape {shape!r}")
        expected = math.prod(shape) * element_size(dtype)
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise CheckpointError(f"{path}: tensor '{name}' has invalid data offsets {[begin, end]}")
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor '{name}' occupies {end - begin} bytes but {dtype}{shape} needs {expected}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor '{name}' ends at byte {end} of a {data_size}-byte data section; the file is truncated",
                hint="download or copy the file again",
            )
        ranges.append((begin, end, name))
        entries[name] = (TensorInfo(name, tuple(shape), dtype, expected, path), data_start + begin)
    ranges.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise CheckpointError(
                f"{path}: tensors '{n0}' (bytes {b0}-{e0}) and '{n1}' (bytes {b1}-{e1}) overlap; the file is corrupted"
            )
    return metadata, entries


class SafetensorsSource:
    """Lazy reader over one file, an indexed shard set, or a folder of ``*.safetensors``."""

    format = "safetensors"

    def __init__(self, path: Path, files: list[Path]):
        self.path = path
        self._files = files
        self._entries: dict[str, tuple[TensorInfo, int]] = {}
        self.metadata: dict[Path, dict] = {}
        for file in files:
            metadata, entries = read_header(file)
            self.metadata[file] = metadata
            for name, entry in entries.items():
                if name in self._entries:
                    other = self._entries[name][0].file.name
                    raise CheckpointError(
                        f"tensor '{name}' is in both {other} and {file.name}; which one is meant is ambiguous",
                        hint="remove the stale shard, or point vlmkit at the index file",
                    )
                self._entries[name] = entry
        self._fds: dict[Path, int] = {}

    @classmethod
    def from_index(cls, index_path: Path) -> "SafetensorsSource":
        """Open the shards an index names, checking that they exist and agree with it."""
        weight_map = _load_weight_map(index_path)
        folder = index_path.parent
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f for f in files if not f.exists()]
        if missing:
            lost = sorted(n for n, f in weight_map.items() if folder / f in missing)
            raise CheckpointError(
                f"{index_path.name} names shard(s) that do not exist: {', '.join(f.name for f in missing)} "
                f"(holding {len(lost)} tensor(s), e.g. '{lost[0]}')",
                hint="download the missing shard(s) again",
            )
        source = cls(index_path.parent, files)
        wrong = [n for n, f in weight_map.items() if n not in source._entries or source._entries[n][0].file.name != f]
        if wrong:
            raise CheckpointError(
                f"{index_path.name} disagrees with its shards for {len(wrong)} tensor(s), e.g. '{wrong[0]}'",
                hint="the index and the shards come from different saves; download them together",
            )
        return source

    def keys(self) -> list[str]:
        return list(self._entries)

    def files(self) -> list[Path]:
        return list(self._files)

    def info(self, name: str) -> TensorInfo:
        return self._entries[name][0]

    def read(self, name: str) -> torch.Tensor:
        info, offset = self._entries[name]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=DTYPES[info.dtype])
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        return pread_exact(fd, info.nbytes, offset, info.file, name).view(DTYPES[info.dtype]).reshape(info.shape)

    def stored_at(self, name: str) -> tuple[Path, int]:
        info, offset = self._entries[name]
        return info.file, offset

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of dim 0, reading only their bytes."""
        info, offset = self._entries[name]
        stop = min(stop, info.shape[0])
        row = info.nbytes // info.shape[0]
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        data = pread_exact(fd, (stop - start) * row, offset + start * row, info.file, name)
        return data.view(DTYPES[info.dtype]).reshape(stop - start, *info.shape[1:])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _load_weight_map(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid index file ({e!r})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: 'weight_map' is not an object")
    return weight_map


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the writer will receive: known from the plan before any data."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


@dataclass
class Shard:
    file: str
    tensors: list[TensorSpec] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def layout_shards(specs: list[TensorSpec], max_shard_size: int) -> list[Shard]:
    """Group tensors, in order, into shards of at most ``max_shard_size`` bytes.

    A tensor larger than the limit gets a shard of its own. Names follow transformers:
    ``model.safetensors`` for one shard, ``model-0000i-of-0000N.safetensors`` otherwise,
    known up front because every size is.
    """
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return [Shard(SINGLE_NAME, groups[0])]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def _header_bytes(tensors: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the library does
    return struct.pack("<Q", len(raw)) + raw


@dataclass(frozen=True)
class FileBytes:
    """A tensor that moves unchanged: its bytes, as stored at ``offset`` of ``file`` (see ``TensorSource``)."""

    file: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


class _ShardHash:
    """The sha256 of one file, computed in its own thread from the pieces written, in order.

    Hashing (about 1.5 GB/s a core) then overlaps the writing instead of following it; at most
    ``_HASH_AHEAD`` pieces wait, so the tensors they keep alive stay bounded.
    """

    def __init__(self):
        self._digest = hashlib.sha256()
        self._pieces: queue.Queue = queue.Queue(maxsize=_HASH_AHEAD)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vlmkit-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (piece := self._pieces.get()) is not None:
            if self._error is not None:
                continue  # drain: the writer learns of the error when it asks for the digest
            try:
                if isinstance(piece, FileBytes):
                    hash_file_range(self._digest, piece.file, piece.offset, piece.nbytes)
                else:
                    self._digest.update(piece)
            except BaseException as e:  # noqa: BLE001 - raised in the writer's thread
                self._error = e

    def update(self, piece) -> None:
        """A bytes-like object (kept alive until hashed) or ``FileBytes`` (hashed where it lies)."""
        self._pieces.put(piece)

    def hexdigest(self) -> str:
        self.stop()
        if self._error is not None:
            raise self._error
        return self._digest.hexdigest()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._pieces.put(None)
            self._thread.join()


class SafetensorsWriter:
    """Writes a planned shard layout tensor by tensor, hashing as it goes.

    The writer is a small state machine: tensors must arrive in layout order with the
    planned shape and dtype; ``close()`` refuses to finish with tensors missing. A tensor
    that moves unchanged can arrive as ``FileBytes``: the kernel copies it from file to file
    (``copy_file_range``, as ``cp`` does), no byte passes through this process; where the
    filesystem cannot, it is read and written. Each file's sha256 is computed beside the writing.

    Example:
        >>> shards = layout_shards([TensorSpec("w", (2, 2), "F32")], 1 << 30)
        >>> with SafetensorsWriter(folder, shards) as w:   # doctest: +SKIP
        ...     w.write("w", torch.zeros(2, 2))
    """

    def __init__(self, folder: Path, shards: list[Shard], metadata: dict[str, str] | None = None):
        self.folder = folder
        self.shards = shards
        self.metadata = {"format": "pt", **(metadata or {})}
        self.hashes: dict[str, str] = {}
        self._shard = -1
        self._pos = 0
        self._file = None
        self._hash: _ShardHash | None = None
        self._sources: dict[Path, int] = {}  # open descriptors of the files FileBytes come from
        self._kernel_copy = True
        self._open_next()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        if self._hash is not None:
            self._hash.stop()
        if self._file is not None:
            self._file.close()  # the atomic output folder removes the partial file
        self._close_sources()

    def _open_next(self) -> None:
        if self._file is not None:
            self._finish_file()
        self._shard += 1
        self._pos = 0
        while self._shard < len(self.shards) and not self.shards[self._shard].tensors:
            self._shard += 1
        if self._shard >= len(self.shards):
            return
        shard = self.shards[self._shard]
        self._file = open(self.folder / shard.file, "wb", buffering=0)  # raw: copy_file_range moves its position
        self._hash = _ShardHash()
        self._emit(memoryview(_header_bytes(shard.tensors, self.metadata)))

    def _emit(self, data: memoryview) -> None:
        done = 0
        while done < len(data):  # a raw write may be short (Linux writes at most 2 GiB at once)
            done += self._file.write(data[done:])
        self._hash.update(data)

    def _copy(self, name: str, piece: FileBytes) -> None:
        fd = self._sources.get(piece.file)
        if fd is None:
            fd = self._sources[piece.file] = os.open(piece.file, os.O_RDONLY)
        if self._kernel_copy:
            start = self._file.tell()
            try:
                copy_file_range(fd, self._file.fileno(), piece.offset, piece.nbytes, piece.file, name)
                self._hash.update(piece)
                return
            except OSError:  # this filesystem cannot: read and write from here on
                self._kernel_copy = False
                os.lseek(self._file.fileno(), start, os.SEEK_SET)
        tensor = pread_exact(fd, piece.nbytes, piece.offset, piece.file, name)
        self._emit(memoryview(tensor.numpy()))

    def _finish_file(self) -> None:
        self._file.close()
        self.hashes[self.shards[self._shard].file] = self._hash.hexdigest()
        self._file = None
        self._hash = None

    def _close_sources(self) -> None:
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()

    @property
    def expected(self) -> TensorSpec | None:
        """The next tensor the layout expects, or None when all are written."""
        if self._shard >= len(self.shards):
            return None
        return self.shards[self._shard].tensors[self._pos]

    def write(self, name: str, tensor: "torch.Tensor | FileBytes | list[torch.Tensor | FileBytes]") -> None:
        """The next tensor of the layout: a tensor, stored bytes (``FileBytes``), or pieces stacked along
        dim 0 (e.g. a stored embedding and the rows appended to it)."""
        spec = self.expected
        if spec is None:
            raise OutputError(f"tensor '{name}' arrived after every planned tensor was written")
        if name != spec.name:
            raise OutputError(f"tensor '{name}' arrived out of order; the layout expects '{spec.name}' next")
        pieces = tensor if isinstance(tensor, list) else [tensor]
        codes = {p.dtype if isinstance(p, FileBytes) else TORCH_TO_CODE.get(p.dtype) for p in pieces}
        shapes = [tuple(p.shape) for p in pieces]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(pieces) > 1 else shapes[0]
        if shape != spec.shape or codes != {spec.dtype} or any(s[1:] != shapes[0][1:] for s in shapes):
            raise OutputError(f"tensor '{name}' is {' + '.join(map(str, shapes))} {'/'.join(sorted(map(str, codes)))}, "
                              f"the plan said {spec.shape} {spec.dtype}")
        for piece in pieces:
            if isinstance(piece, FileBytes):
                if piece.nbytes:
                    self._copy(name, piece)
            elif piece.numel():
                self._emit(memoryview(piece.contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._pos += 1
        if self._pos == len(self.shards[self._shard].tensors):
            self._open_next()

    def close(self) -> dict[str, str]:
        """Finish, write the index for sharded layouts, and return ``{file: sha256}``."""
        spec = self.expected
        if spec is not None:
            raise OutputError(f"writer closed before tensor '{spec.name}' was written")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.shards)},
                "weight_map": {t.name: s.file for s in self.shards for t in s.tensors},
            }
            data = (json.dumps(index, indent=2) + "\n").encode()
            (self.folder / INDEX_NAME).write_bytes(data)
            self.hashes[INDEX_NAME] = hashlib.sha256(data).hexdigest()
        self._close_sources()
        return dict(self.hashes)
