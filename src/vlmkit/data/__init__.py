"""Training data for LLaVA: convert, check, tokenize, download.

* ``records``   — :class:`Record` / :class:`Turn`, one training entry whatever its format;
* ``files``     — row-by-row readers (CSV, TSV, JSONL, JSON arrays, Parquet) and an atomic writer;
* ``formats``   — LLaVA, ShareGPT, messages and OpenAI layouts as a table of decoders / encoders;
* ``tables``    — image + caption tables (Wukong, LAION, CC3M) as records;
* ``convert``   — ``open_records`` and ``convert``;
* ``tokenize``  — THE implementation of LLaVA's tokenisation and label masking (training uses it);
* ``examples``  — records -> examples for a model, and ``tokenize_file``;
* ``check``     — validation and token statistics;
* ``pool``      — tokenising on every core, in order (``--workers``);
* ``distributed`` — ``data tokenize --ray``: the same record function on Ray Data over Parquet shards;
* ``download``  — URL lists -> images (img2dataset, on this machine, Spark or Ray) -> records;
* ``cli``       — ``add_data_command`` for the ``vlmkit`` command.

Example:
    >>> from vlmkit.data import TableMapping, check, convert, load_data_model, tokenize_file
    >>> convert("wukong_test.csv", "wukong.jsonl", mapping=TableMapping(prompts=("为该图片生成标注。",)))
    >>> model = load_data_model("llava-v1.5-7b")
    >>> check("wukong.jsonl", image_folder="images", model=model).errors
    >>> tokenize_file("wukong.jsonl", "wukong.tokens.jsonl", model)
"""

from __future__ import annotations

from .check import Report, check
from .convert import ConvertResult, RecordStream, convert, open_records
from .download import DownloadResult, download
from .encoders import Encoder, OriginalEncoder, TransformersEncoder
from .files import RecordWriter, read_rows
from .formats import FORMATS
from .records import DataError, Record, Turn
from .tables import TableMapping
from .tokenize import IGNORE_INDEX, Example, RecordError, tokenize

# Imported on first use (PEP 562): they import PIL and torch, which `vlmkit data convert` does not need.
_LAZY = {"TokenizeResult": "examples", "iter_examples": "examples", "tokenize_file": "examples",
         "DataModel": "model", "load_data_model": "model"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


__all__ = [
    "Record", "Turn", "DataError", "read_rows", "RecordWriter", "FORMATS", "TableMapping", "open_records",
    "RecordStream", "convert", "ConvertResult", "tokenize", "Example", "RecordError", "IGNORE_INDEX", "Encoder",
    "OriginalEncoder", "TransformersEncoder", "DataModel", "load_data_model", "iter_examples", "tokenize_file",
    "TokenizeResult", "check", "Report", "download", "DownloadResult",
]

