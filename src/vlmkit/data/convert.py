"""``vlmkit data convert``: any supported input to records in any supported format, row by row.

Example:
    >>> mapping = TableMapping(image_column="dir", text_column="text", prompts=("为该图片生成标注。",))
    >>> convert("wukong_test.csv", "wukong.jsonl", mapping=mapping).count   # doctest: +SKIP
    3
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .files import RecordWriter, read_rows
from .formats import FORMATS, detect, get_format
from .records import DataError, Record
from .tables import TableMapping

SOURCE_FORMATS = ("auto", "table", *FORMATS)


@dataclass(frozen=True)
class RecordStream:
    """The records of one file, read lazily; ``format`` is what the file turned out to be."""

    path: Path
    format: str
    records: Iterator[Record]

    def __iter__(self) -> Iterator[Record]:
        return self.records


def open_records(path: str | os.PathLike, *, source_format: str = "auto",
                 mapping: TableMapping | None = None) -> RecordStream:
    """Read ``path`` as records, one at a time.

    Args:
        path: CSV / TSV / JSONL / JSON / Parquet.
        source_format: "auto" (from the first entry's keys), "table", or a chat format of ``FORMATS``.
        mapping: how a table's columns become records (required for tables).

    Raises:
        DataError: unknown format, a table without a mapping, or an entry that does not fit the format.
    """
    path = Path(path)
    if source_format not in SOURCE_FORMATS:
        raise DataError(f"--from {source_format!r} is unknown", hint=f"use one of: {', '.join(SOURCE_FORMATS)}")
    return records_of(path, read_rows(path), source_format=source_format, mapping=mapping)


def records_of(path: Path, rows: Iterator[tuple[str, dict]], *, source_format: str = "auto",
               mapping: TableMapping | None = None, start: int = 0) -> RecordStream:
    """The records of ``rows``: the ``(where, row)`` pairs of ``path``, or of a part of it that starts at row
    ``start`` (``data tokenize --ray``; a record without an id is named by its row number)."""
    first = next(rows, None)
    if first is None:
        return RecordStream(path, source_format, iter(()))
    fmt = detect(first[1]) if source_format == "auto" else source_format
    key = None if fmt == "table" else get_format(fmt).key
    if fmt == "table":
        if mapping is None:
            raise DataError(f"{path}: is a table (columns {', '.join(first[1])}), not chat records",
                            hint="turn it into records first: vlmkit data convert TABLE OUT.jsonl --prompt TEXT")
        decode = mapping.bind(list(first[1]), path.name)
    else:
        decode = get_format(fmt).decode
    all_rows = itertools.chain([first], rows)
    if key is None:  # a table: every row fits (bind checked the columns)
        return RecordStream(path, fmt, (decode(where, row, index)
                                        for index, (where, row) in enumerate(all_rows, start)))

    def records() -> Iterator[Record]:
        for index, (where, row) in enumerate(all_rows, start):
            if key not in row:
                raise DataError(f"{where}: no '{key}' field, unlike the first entry ({fmt} format)",
                                hint="one file holds one format; pass --from to say which")
            yield decode(where, row, index)

    return RecordStream(path, fmt, records())


@dataclass(frozen=True)
class ConvertResult:
    """What ``convert`` wrote."""

    source: Path
    source_format: str
    destination: Path
    format: str
    count: int
    seconds: float


def convert(source: str | os.PathLike, destination: str | os.PathLike, *, to: str = "llava",
            source_format: str = "auto", mapping: TableMapping | None = None, force: bool = False,
            limit: int | None = None) -> ConvertResult:
    """Convert ``source`` into records of format ``to`` at ``destination`` (.jsonl or .json), streaming.

    Args:
        source: the input file.
        destination: the output; written atomically, refused if it exists unless ``force``.
        to: output format: llava, sharegpt, messages or openai.
        source_format: see :func:`open_records`.
        mapping: column mapping and instruction for tables.
        force: replace an existing destination.
        limit: stop after this many records.

    Returns:
        How many records were written, where, and in how long.
    """
    started = time.perf_counter()
    encode = get_format(to).encode
    stream = open_records(source, source_format=source_format, mapping=mapping)
    records = itertools.islice(stream, limit) if limit is not None else stream
    with RecordWriter(destination, force=force, sources=(source,)) as out:
        out.write_many(map(encode, records))
    return ConvertResult(Path(source), stream.format, Path(destination), to, out.count,
                         time.perf_counter() - started)
