"""Reading and writing data files one row at a time.

Readers yield ``(where, row)`` pairs — ``where`` is "file:line" (CSV, TSV, JSONL) or
"file:#index" (JSON array, Parquet) — and never hold more than one row (or one Parquet
batch) in memory: a JSON array is parsed element by element from a sliding buffer.
Writers write JSON Lines, or a JSON array when the name ends in ``.json``, into a
temporary file beside the destination that is renamed into place only when the ``with``
block ends cleanly; text is written as is (``ensure_ascii=False``).

Example:
    >>> with RecordWriter(Path("out.jsonl")) as out:
    ...     for where, row in read_rows(Path("wukong_test.csv")):
    ...         out.write({"caption": row["text"]})
"""

from __future__ import annotations

import csv
import io
import json
import json.encoder
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .records import DataError

CHUNK = 1 << 20
PARQUET_BATCH = 1024


def _encoder() -> Callable[[object], str]:
    """``json.dumps(obj, ensure_ascii=False)``, made once. ``dumps`` builds an encoder on every call and
    ``JSONEncoder.encode`` its C scanner on every call; the scanner made once is 2x faster (the per-row cost of
    `data convert`). Without json's C accelerator: ``JSONEncoder.encode``, the same text."""
    encoder = json.JSONEncoder(ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    chunks = make(None, encoder.default, json.encoder.encode_basestring, None, encoder.key_separator,
                  encoder.item_separator, False, False, True)
    return lambda obj: "".join(chunks(obj, 0))


_ENCODE = _encoder()
WRITE_BLOCK = 1024  # lines per write() of the file


def encode(obj: dict) -> str:
    """One object as the JSON text ``RecordWriter`` writes (one line, ``ensure_ascii=False``)."""
    return _ENCODE(obj)


def _reader_kind(path: Path) -> str:
    name = path.name.lower()
    for suffix, kind in SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    raise DataError(f"{path}: unknown data file type (known: {', '.join(SUFFIXES)})",
                    hint="name the file with one of these extensions")


def _open_text(path: Path):
    try:
        return open(path, encoding="utf-8-sig", newline="")  # -sig: CSVs saved by Excel start with a BOM
    except FileNotFoundError:
        raise DataError(f"{path}: no such file", hint="check the path") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _read_delimited(path: Path, delimiter: str) -> Iterator[tuple[str, dict]]:
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        width, name = len(header), path.name
        for row in reader:
            if len(row) != width:
                if not row:
                    continue
                raise DataError(f"{path}:{reader.line_num}: {len(row)} fields where the header has {width} "
                                f"({', '.join(header)})",
                                hint="quote fields that contain the delimiter or a line break")
            yield f"{name}:{reader.line_num}", dict(zip(header, row))


def _read_csv(path: Path) -> Iterator[tuple[str, dict]]:
    return _read_delimited(path, ",")


def _read_tsv(path: Path) -> Iterator[tuple[str, dict]]:
    return _read_delimited(path, "\t")


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    name = path.name
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})",
                                hint="each line of a .jsonl file must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: a {type(row).__name__}, not a JSON object")
            yield f"{name}:{number}", row


def _read_json_array(path: Path) -> Iterator[tuple[str, dict]]:
    """The elements of a top-level JSON array, parsed one by one from a sliding buffer."""
    decoder = json.JSONDecoder()
    with _open_text(path) as f:
        buf, pos, eof, index = f.read(CHUNK), 0, False, 0
        pos = _skip(buf, pos)
        if pos >= len(buf):
            return
        if buf[pos] != "[":
            hint = "a .json data file is an array of records; use .jsonl for one record per line"
            raise DataError(f"{path}: expected a JSON array, found {buf[pos]!r} at the start", hint=hint)
        pos += 1
        while True:
            pos = _skip(buf, pos, ",")
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                if pos >= len(buf):
                    raise json.JSONDecodeError("buffer end", buf, pos)
                row, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if eof:
                    raise DataError(f"{path}: element #{index} is not valid JSON ({e.msg})",
                                    hint="check that the file is complete and not truncated") from None
                more = f.read(max(CHUNK, len(buf)))  # grow, so that a huge element costs O(n log n)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            if not isinstance(row, dict):
                raise DataError(f"{path}: element #{index} is a {type(row).__name__}, not a JSON object")
            yield f"{path.name}:#{index}", row
            index += 1
            pos = end
            if pos > CHUNK:  # keep the buffer bounded
                buf, pos = buf[pos:], 0


def _skip(buf: str, pos: int, extra: str = "") -> int:
    while pos < len(buf) and (buf[pos].isspace() or buf[pos] in extra):
        pos += 1
    return pos


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow", hint="pip install pyarrow") from None
    if not path.exists():
        raise DataError(f"{path}: no such file", hint="check the path")
    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH):
        for row in batch.to_pylist():
            yield f"{path.name}:#{index}", row
            index += 1


READERS: dict[str, Callable[[Path], Iterator[tuple[str, dict]]]] = {
    "csv": _read_csv, "tsv": _read_tsv, "jsonl": _read_jsonl, "json": _read_json_array, "parquet": _read_parquet,
}
SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
            ".parquet": "parquet"}


def read_rows(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, row)`` for each row of a CSV / TSV / JSONL / JSON-array / Parquet file.

    Raises:
        DataError: unknown extension, unreadable file, or a malformed row (naming file and line).
    """
    path = Path(path)
    return READERS[_reader_kind(path)](path)


class RecordWriter:
    """Write JSON objects to ``path`` (JSON Lines, or a JSON array for ``.json``), atomically.

    Args:
        path: the destination; refused when it exists unless ``force``.
        force: replace an existing destination (only when the write completes).
        sources: input files that must not be overwritten (the destination may not be one of them).
    """

    def __init__(self, path: str | os.PathLike, *, force: bool = False, sources: tuple = ()):
        self.path = Path(path)
        if _reader_kind(self.path) not in ("jsonl", "json"):
            raise DataError(f"{self.path}: records are written as .jsonl or .json",
                            hint="name the output FILE.jsonl (one record per line) or FILE.json (an array)")
        for source in sources:
            if Path(source).exists() and self.path.exists() and self.path.resolve() == Path(source).resolve():
                raise DataError(f"{self.path}: is the input; vlmkit never modifies its input",
                                hint="write the result to another file")
        if self.path.exists() and not force:
            raise DataError(f"{self.path}: already exists", hint="pass --force to replace it, or choose another name")
        self.array = self.path.name.lower().endswith(".json")
        self.count = 0
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._file: io.TextIOBase | None = None

    def __enter__(self) -> RecordWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "w", encoding="utf-8", newline="\n")
        if self.array:
            self._file.write("[")
        return self

    def write(self, obj: dict) -> None:
        """Write one object as one line (``ensure_ascii=False``: text stays as written)."""
        self.write_encoded((_ENCODE(obj),))

    def write_many(self, objects: Iterable[dict]) -> None:
        """Write each object, as ``write`` does, without a method call per object (the converters' hot loop)."""
        self.write_encoded(map(_ENCODE, objects))

    def write_encoded(self, texts: Iterable[str]) -> None:
        """Write objects already encoded by :func:`encode` (e.g. in worker processes), in blocks of lines."""
        block: list[str] = []
        for text in texts:
            block.append(text)
            if len(block) == WRITE_BLOCK:
                self._write_block(block)
                block = []
        if block:
            self._write_block(block)

    def _write_block(self, block: list[str]) -> None:
        if self.array:
            self._file.write(("\n" if not self.count else ",\n") + ",\n".join(block))
        else:
            self._file.write("\n".join(block) + "\n")
        self.count += len(block)

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None and self.array:
                self._file.write("\n]\n")
            self._file.close()
        finally:
            if kind is None:
                os.replace(self._tmp, self.path)
            else:
                self._tmp.unlink(missing_ok=True)

