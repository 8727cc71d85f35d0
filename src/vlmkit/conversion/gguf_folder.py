"""A folder of GGUF files as llama.cpp's multimodal tools take them: which file is the model, which the mmproj.

The role of a file is in its name, as llama.cpp names them: its converters write the vision
projector as ``mmproj-*.gguf`` (``convert_hf_to_gguf.py --mmproj``, the legacy
``convert_image_encoder_to_gguf.py``), and ``llama-server -hf`` finds it by that prefix. The GGUF
sink names the files it writes by the same rule (``GGUFFile.role``), so one function reads the
role of a file vlmkit is about to write, of one it wrote, and of one from elsewhere. Nothing
here knows a model family: a folder with one ``mmproj-*.gguf`` and one other ``.gguf`` is a pair.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, ConfigError

MODEL, MMPROJ = "model", "mmproj"
MMPROJ_PREFIX = "mmproj-"


def role(name: str | Path) -> str:
    """``"mmproj"`` for a vision projector file (``mmproj-*.gguf``), else ``"model"``."""
    return MMPROJ if Path(name).name.startswith(MMPROJ_PREFIX) else MODEL


def is_gguf_folder(path: str | Path) -> bool:
    """A folder holding GGUF files (what ``vlmkit convert --to gguf`` writes)."""
    path = Path(path)
    return path.is_dir() and any(path.glob("*.gguf"))


def gguf_pair(folder: str | Path) -> tuple[Path, Path]:
    """(model, mmproj) of a folder written by ``vlmkit convert --to gguf`` (or laid out as llama.cpp names them).

    Raises:
        ConfigError: not exactly one file of each role, naming the files found.
    """
    folder = Path(folder)
    models, mmproj = files(folder, MODEL), files(folder, MMPROJ)
    if len(mmproj) != 1 or len(models) != 1:
        raise ConfigError(f"{folder}: expected one language-model GGUF and one {MMPROJ_PREFIX}*.gguf, found "
                          f"{[p.name for p in models + mmproj]}",
                          hint="use the folder `vlmkit convert MODEL DST --to gguf` wrote")
    return models[0], mmproj[0]


def files(folder: str | Path, wanted_role: str | None = None) -> list[Path]:
    """The GGUF files of ``folder`` (of one role, if given), by name."""
    return [f for f in sorted(Path(folder).glob("*.gguf")) if wanted_role is None or role(f) == wanted_role]


# GGUF value types (ggml's docs/gguf.md, gguf-py's GGUFValueType): struct formats of the scalars; 8 string, 9 array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def header(file: str | Path, *keys: str) -> dict:
    """The values of ``keys`` in a GGUF file's header (absent keys left out; no tensor data is read).

    The key-value section is walked here, the values not asked for skipped: gguf-py's ``GGUFReader`` builds a numpy
    view per array element of every field, ~20 s for a 152k-token vocabulary (Qwen2's), and recognising a folder
    reads the header of each of its files.
    """
    import mmap
    import struct

    wanted, out = set(keys), {}
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF":
            raise CheckpointError(f"{file}: not a GGUF file (no GGUF magic)", hint="is it the right file?")
        # the version (2 or 3) read little-endian: a big-endian file's reads byte-swapped, its low half zero
        order = "<" if struct.unpack_from("<I", data, 4)[0] & 0xFFFF else ">"
        pos = 16  # magic, version, tensor count

        def take(fmt: str):
            nonlocal pos
            value = struct.unpack_from(order + fmt, data, pos)[0]
            pos += struct.calcsize(fmt)
            return value

        def string(keep: bool):
            nonlocal pos
            size = take("Q")
            pos += size
            return bytes(data[pos - size:pos]).decode("utf-8") if keep else None

        def value(kind: int, keep: bool):
            nonlocal pos
            if kind == _STRING:
                return string(keep)
            if kind == _ARRAY:
                item, count = take("I"), take("Q")
                if not keep and item in _SCALARS:  # fixed size: skipped at once
                    pos += count * struct.calcsize(_SCALARS[item])
                    return None
                items = [value(item, keep) for _ in range(count)]
                return items if keep else None
            if not keep:
                pos += struct.calcsize(_SCALARS[kind])
                return None
            return take(_SCALARS[kind])

        try:
            for _ in range(take("Q")):
                key = string(True)
                got = value(take("I"), key in wanted)
                if key in wanted:
                    out[key] = got
                    if len(out) == len(wanted):
                        break
        except (struct.error, KeyError, UnicodeDecodeError) as e:  # the header ends early, or an unknown value type
            raise CheckpointError(f"{file}: the GGUF header cannot be read ({type(e).__name__}: {e})",
                                  hint="a truncated or damaged file: write or download it again") from None
    return {k: out[k] for k in keys if k in out}
