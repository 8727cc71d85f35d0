"""Pickled ``nn.Module`` files (``torch.save(module)``), read without running anything from the file.

Some releases ship a whole pickled module instead of a state dict: OpenAI's DALL-E dVAE
``encoder.pkl`` (FLAVA's image codebook) is one. ``torch.load`` would import the classes
it names and run their code; ``torch.load(weights_only=True)`` refuses them. This reader
does neither: its unpickler admits only an allow-list of globals, and turns each admitted
module class into an inert ``ModuleRecord`` (a name and the attributes the pickle sets),
each tensor into a ``TensorRef`` (storage key, dtype, offset, shape, stride). Any other
global is refused with an error that names it. Tensor bytes are read only when asked for,
one tensor at a time.

Both on-disk forms of ``torch.save`` are read: the legacy stream (torch < 1.6 and
``_use_new_zipfile_serialization=False``; ``encoder.pkl`` is one) and the zip archive.

Example:
    >>> source = PickledModuleSource(Path("encoder.pkl"), DALLE_CLASSES)        # doctest: +SKIP
    >>> source.info("blocks.input.w").shape                                      # doctest: +SKIP
    (256, 3, 7, 7)
"""

from __future__ import annotations

import builtins
import collections
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..lazy import torch

from .. import dtypes
from ..errors import CheckpointError, UnsafeCheckpointError
from .base import TORCH_TO_CODE, TensorInfo

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

STORAGE_DTYPES = {  # storage class -> dtype code (vlmkit.dtypes)
    "FloatStorage": "F32", "DoubleStorage": "F64", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
    "BoolStorage": "BOOL", "UntypedStorage": "U8",
}
# Module classes of torch whose pickled form is plain data (no parameters of their own beyond
# ``_parameters`` / ``_buffers``): containers and stateless layers.
TORCH_MODULES = frozenset({
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.container", "ModuleList"),
    ("torch.nn.modules.container", "ModuleDict"), ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"), ("torch.nn.modules.linear", "Identity"),
    ("torch.nn.modules.conv", "Conv2d"), ("torch.nn.modules.linear", "Linear"),
})
# The DALL-E dVAE encoder (openai/DALL-E dall_e/encoder.py, dall_e/utils.py).
DALLE_CLASSES = frozenset({("dall_e.encoder", "Encoder"), ("dall_e.encoder", "EncoderBlock"),
                           ("dall_e.utils", "Conv2d")}) | TORCH_MODULES


@dataclass
class ModuleRecord:
    """An inert stand-in for one pickled module: its class name and the attributes the pickle set."""

    cls: str
    state: dict = field(default_factory=dict)

    def __setstate__(self, state) -> None:  # pickle's BUILD
        if isinstance(state, tuple):  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        self.state = dict(state)


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor's bytes are: storage key, element offset, shape and stride; no data."""

    key: str
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    numel: int


def _record_class(module: str, name: str):
    qualified = f"{module}.{name}"

    def new(cls, *args, **kwargs):  # NEWOBJ calls cls.__new__(cls, *args)
        return ModuleRecord(qualified)

    return type(name, (), {"__new__": new, "__module__": "vlmkit.inert"})


def _rebuild_tensor(storage, offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor whose storage is not a plain storage record")
    return TensorRef(storage.key, storage.dtype, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_):
    return data


def _device(*args):
    return str(args[0]) if args else "cpu"


class _Unpickler(pickle.Unpickler):
    """Admits containers, tensors and the allowed module classes (as records); refuses everything else."""

    SAFE = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): builtins.set, ("__builtin__", "set"): builtins.set,
        ("builtins", "frozenset"): builtins.frozenset, ("__builtin__", "frozenset"): builtins.frozenset,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "device"): _device,
    }

    def __init__(self, file, path: Path, modules: frozenset[tuple[str, str]], storages: dict[str, _Storage]):
        super().__init__(file)
        self.path, self.modules, self.storages = path, modules, storages

    def find_class(self, module: str, name: str):
        if (module, name) in self.SAFE:
            return self.SAFE[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return dtypes.torch_dtype(STORAGE_DTYPES[name])
        if (module, name) in self.modules:
            return _record_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refused to load: the pickle asks for '{module}.{name}', which is not on the allow-list "
            "of inert classes; nothing from the file was run",
            hint="if you trust the file, re-save its state_dict() with torch.save and pass that file instead",
        )

    def persistent_load(self, pid):
        kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":  # legacy files record each module class with its source code: ignore the source
            return pid[1]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        dtype, key, numel = pid[1], str(pid[2]), int(pid[4])
        view = pid[5] if len(pid) > 5 else None
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError("a storage without a known storage type")
        if view is not None:
            raise CheckpointError(f"{self.path}: storage views (torch < 1.0 files) are not supported")
        storage = self.storages.setdefault(key, _Storage(key, dtype, numel))
        return storage


@dataclass
class PickledModule:
    """What ``read_pickled_module`` found: the root record and where each storage's bytes are."""

    root: ModuleRecord
    storages: dict[str, _Storage]
    offsets: dict[str, int]  # legacy: byte offset in the file; zip: unused
    zip_names: dict[str, str]  # zip: storage key -> member name


def read_pickled_module(path: Path, modules: frozenset[tuple[str, str]]) -> PickledModule:
    """Unpickle a ``torch.save(module)`` file into inert records.

    Raises:
        UnsafeCheckpointError: the pickle names a global outside the allow-list (nothing ran).
        CheckpointError: the file is truncated, not a torch pickle, or does not hold a module.
    """
    result = _load(path, modules)
    if not isinstance(result.root, ModuleRecord):
        raise CheckpointError(f"{path}: holds a {type(result.root).__name__}, not a pickled module")
    return result


def _load(path: Path, modules: frozenset[tuple[str, str]]) -> PickledModule:
    storages: dict[str, _Storage] = {}
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pkl = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                if pkl is None:
                    raise CheckpointError(f"{path}: a zip archive without data.pkl; not a torch.save file")
                prefix = pkl[: -len("data.pkl")]
                with archive.open(pkl) as f:
                    root = _Unpickler(f, path, modules, storages).load()
                names = {k: f"{prefix}data/{k}" for k in storages}
                missing = [n for n in names.values() if n not in archive.namelist()]
                if missing:
                    raise CheckpointError(f"{path}: the archive lacks the tensor data {missing[0]} (truncated?)")
            return PickledModule(root, storages, {}, names)
        with open(path, "rb") as f:
            return _read_legacy(f, path, modules, storages)
    except (pickle.UnpicklingError, EOFError, ValueError, struct.error, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a readable torch.save file ({e})",
                              hint="the file may be truncated; download or copy it again") from None


WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "model_state")  # as torch_io tries them


def peek_state_dict(path: Path) -> dict[str, TensorRef] | None:
    """The tensor names (and shapes) of a pickled state dict, reading no tensor data in either format.

    For recognising a checkpoint cheaply: ``torch.load`` would read a legacy file's data whole.
    Looks at the top level, then under the usual wrapper keys (``{"model": state_dict}``).

    Returns:
        ``{name: TensorRef}``, or None when the file is not a readable torch pickle of plain
        containers and tensors (anything else, e.g. a pickled module, is refused, not run).
    """
    try:
        return _find_tensors(_load(path, frozenset()).root)
    except (CheckpointError, OSError, RecursionError):
        return None


def _find_tensors(obj) -> dict[str, TensorRef] | None:
    if not isinstance(obj, dict):
        return None
    if any(isinstance(v, TensorRef) for v in obj.values()):
        return {k: v for k, v in obj.items() if isinstance(v, TensorRef)}
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, TensorRef) for v in inner.values()):
            return {k: v for k, v in inner.items() if isinstance(v, TensorRef)}
    return None


def _read_legacy(f, path: Path, modules, storages) -> PickledModule:
    header = _Unpickler(f, path, frozenset(), {})
    if header.load() != LEGACY_MAGIC:
        raise CheckpointError(f"{path}: not a torch.save file (no legacy magic number, not a zip archive)")
    if header.load() != LEGACY_PROTOCOL:
        raise CheckpointError(f"{path}: unknown torch legacy protocol version")
    header.load()  # sys_info: byte order and type sizes (little-endian assumed, as torch writes on x86/arm)
    root = _Unpickler(f, path, modules, storages).load()
    keys = _Unpickler(f, path, frozenset(), {}).load()
    offsets = {}
    end = path.stat().st_size
    for key in keys:
        storage = storages.get(str(key))
        if storage is None:
            raise CheckpointError(f"{path}: storage {key} is listed but used by no tensor")
        (count,) = struct.unpack("<q", f.read(8))
        nbytes = count * torch.empty((), dtype=storage.dtype).element_size()
        offsets[storage.key] = f.tell()
        if f.tell() + nbytes > end:
            raise CheckpointError(f"{path}: the data of storage {key} runs past the end of the file (truncated?)",
                                  hint="download or copy the file again")
        f.seek(nbytes, 1)
    return PickledModule(root, storages, offsets, {})


def module_tensors(root: ModuleRecord, path: Path) -> dict[str, TensorRef]:
    """The state-dict names of a record tree (``blocks.input.w``) -> their tensors, as ``state_dict()`` lists them."""
    out: dict[str, TensorRef] = {}

    def walk(record: ModuleRecord, prefix: str) -> None:
        state = record.state
        hidden = set(state.get("_non_persistent_buffers_set") or ())
        for kind in ("_parameters", "_buffers"):
            for name, tensor in (state.get(kind) or {}).items():
                if tensor is None or name in hidden:
                    continue
                if not isinstance(tensor, TensorRef):
                    raise CheckpointError(f"{path}: {record.cls}.{name} is not a tensor")
                out[prefix + name] = tensor
        for name, child in (state.get("_modules") or {}).items():
            if child is None:
                continue
            if not isinstance(child, ModuleRecord):
                raise CheckpointError(f"{path}: submodule {prefix + name} is not a module record")
            walk(child, f"{prefix}{name}.")

    walk(root, "")
    return out


class PickledModuleSource:
    """A ``TensorSource`` over a pickled module: names from its record tree, bytes read per tensor."""

    format = "pickled-module"

    def __init__(self, path: Path, modules: frozenset[tuple[str, str]]):
        self.path = path
        self.module = read_pickled_module(path, modules)
        self.root_class = self.module.root.cls
        self._refs = module_tensors(self.module.root, path)
        self._infos = {}
        for name, ref in self._refs.items():
            if ref.dtype not in TORCH_TO_CODE:
                raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {ref.dtype}")
            numel = math.prod(ref.shape)
            self._infos[name] = TensorInfo(name, ref.shape, TORCH_TO_CODE[ref.dtype],
                                           numel * torch.empty((), dtype=ref.dtype).element_size(), path)

    def keys(self) -> list[str]:
        return list(self._infos)

    def files(self) -> list[Path]:
        return [self.path]

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def read(self, name: str) -> torch.Tensor:
        ref = self._refs[name]
        storage = self.module.storages[ref.key]
        size = torch.empty((), dtype=storage.dtype).element_size()
        if self.module.zip_names:
            with zipfile.ZipFile(self.path) as archive:
                raw = archive.read(self.module.zip_names[ref.key])
        else:
            with open(self.path, "rb") as f:
                f.seek(self.module.offsets[ref.key])
                raw = f.read(storage.numel * size)
        if len(raw) != storage.numel * size:
            raise CheckpointError(f"{self.path}: tensor '{name}' is cut short (truncated file?)")
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) if all(ref.shape) else -1
        if ref.offset < 0 or last >= max(storage.numel, 1) or any(s < 0 for s in ref.stride):
            raise CheckpointError(f"{self.path}: tensor '{name}' points outside its storage (corrupted file?)")
        flat = torch.frombuffer(bytearray(raw), dtype=storage.dtype) if raw else torch.empty(0, dtype=storage.dtype)
        return flat.as_strided(ref.shape, ref.stride, ref.offset).clone()

    def close(self) -> None:
        self._refs.clear()
