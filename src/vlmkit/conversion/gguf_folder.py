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

from ..errors import ConfigError

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


def header(file: str | Path, *keys: str) -> dict:
    """The values of ``keys`` in a GGUF file's header (absent keys left out; no tensor data is read)."""
    import gguf

    fields = gguf.GGUFReader(file).fields
    return {k: fields[k].contents() for k in keys if k in fields}
