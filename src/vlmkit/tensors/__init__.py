"""Where tensors come from and go to.

``open_source(path)`` picks the reader for a file, a folder or a hub id; every reader
follows the ``TensorSource`` protocol (``keys``, ``info``, ``read``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

from ..errors import CheckpointError, HubError
from ._pages import hash_file_range, return_freed_buffers
from .base import DTYPES, FLOAT_CODES, TensorInfo, TensorSource, dtype_code, element_size
from .safetensors_io import INDEX_NAME as SAFETENSORS_INDEX
from .safetensors_io import SafetensorsSource
from .torch_io import INDEX_NAME as TORCH_INDEX
from .torch_io import TorchSource

__all__ = [
    "DTYPES", "FLOAT_CODES", "TensorInfo", "TensorSource", "dtype_code", "element_size",
    "open_source", "resolve", "row_reader", "weight_files", "stored_at", "hash_file_range", "return_freed_buffers", "GGUFSource", "SafetensorsSource", "TorchSource",
]


def __getattr__(name: str):
    if name == "GGUFSource":  # gguf-py is imported when a GGUF file is read, not with every command
        from .gguf_io import GGUFSource

        return GGUFSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Pickles that sit beside weights in training outputs but hold no model weights.
NOT_WEIGHTS = re.compile(r"^(training_args|optimizer|scheduler|rng_state|scaler|trainer_state).*")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a conversion needs from a hub repository: configs, tokenizer, weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.gguf", "*.jinja", "*.tiktoken"]


def resolve(path: str | Path, *, allow_patterns: list[str] | None = None) -> Path:
    """Turn a local path or a hub id into a local path.

    A string that is not an existing path and looks like ``owner/name`` is fetched
    with ``huggingface_hub.snapshot_download`` (only ``allow_patterns``).

    Raises:
        CheckpointError: the path does not exist and is not a hub id.
        HubError: the hub id cannot be fetched (offline, unknown, gated).
    """
    local = Path(path).expanduser()
    if local.exists():
        return local
    text = str(path)
    if not HUB_ID.match(text):
        raise CheckpointError(f"{text}: no such file or folder")
    patterns = allow_patterns or HUB_PATTERNS
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - hub errors are many types; all mean "cannot fetch"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubError(
            f"'{text}' is not a local path and could not be fetched from the hub "
            f"(files {', '.join(patterns)}): {reason}",
            hint="download it where you have network (`hf download " + text + " --local-dir DIR`) and pass DIR",
        ) from None


def open_source(path: str | Path) -> TensorSource:
    """Open a checkpoint lazily: nothing but headers is read.

    Accepts a ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` / ``.gguf`` file, an index
    JSON, a folder (index first, then ``*.safetensors``, then pickles, then one GGUF),
    or a hub id.

    Example:
        >>> src = open_source("llava-v1.5-7b")            # doctest: +SKIP
        >>> src.info("lm_head.weight").shape               # doctest: +SKIP
        (32000, 4096)
    """
    path = resolve(path)
    if path.is_file():
        return _open_file(path)
    for index, cls in ((SAFETENSORS_INDEX, SafetensorsSource), (TORCH_INDEX, TorchSource)):
        if (path / index).exists():
            return cls.from_index(path / index)
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return SafetensorsSource(path, safetensors)
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and not NOT_WEIGHTS.match(p.name))
    if pickles:
        return TorchSource(path, pickles)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        from .gguf_io import GGUFSource

        return GGUFSource(ggufs[0])
    if ggufs:
        raise CheckpointError(f"{path}: holds {len(ggufs)} GGUF files; name the one to read",
                              hint=f"e.g. {ggufs[0]}")
    raise CheckpointError(f"{path}: no weights found (*.safetensors, *.bin, *.pt, *.pth or *.gguf)")


def row_reader(source: TensorSource, name: str) -> Callable[[int, int], "torch.Tensor"]:
    """A function ``(start, stop) -> rows [start, stop)`` of tensor ``name``, for passes over a big matrix.

    Readers that know where a tensor's bytes lie (safetensors; ``.bin`` files stored uncompressed)
    read only the rows asked for, so a pass over a 262 MB embedding holds one slice at a time;
    views (combined, renamed sources) say which reader holds the name (``locate``). Any other
    reader is read whole once and sliced.
    """
    while hasattr(source, "locate"):
        source, name = source.locate(name)
    if hasattr(source, "read_rows"):
        return lambda start, stop: source.read_rows(name, start, stop)
    whole = source.read(name)
    return lambda start, stop: whole[start:stop]


def weight_files(path: Path) -> list[Path]:
    """The files that may hold weights at a local ``path``: the file itself, or a folder's safetensors, pickles
    (not training state) and GGUF files; no header is read."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".gguf") or (p.suffix in PICKLE_SUFFIXES and not NOT_WEIGHTS.match(p.name))))


def stored_at(source: TensorSource, name: str) -> tuple[Path, int] | None:
    """``(file, offset)`` where tensor ``name``'s bytes lie exactly as a safetensors file stores them
    (contiguous, little-endian), when its reader knows: then they can be copied file to file as they are."""
    while hasattr(source, "locate"):
        source, name = source.locate(name)
    where = getattr(source, "stored_at", None)
    return where(name) if where is not None else None


def _open_file(path: Path) -> TensorSource:
    name = path.name
    if name.endswith(".safetensors"):
        return SafetensorsSource(path, [path])
    if name == SAFETENSORS_INDEX or name.endswith(".safetensors.index.json"):
        return SafetensorsSource.from_index(path)
    if name.endswith(".index.json"):
        return TorchSource.from_index(path)
    if path.suffix in PICKLE_SUFFIXES:
        return TorchSource(path, [path])
    if path.suffix == ".gguf":
        from .gguf_io import GGUFSource

        return GGUFSource(path)
    raise CheckpointError(f"{path}: unknown checkpoint format '{path.suffix}'",
                          hint="vlmkit reads .safetensors, .bin, .pt, .pth, .ckpt and .gguf")
