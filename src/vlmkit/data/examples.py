"""Records to training examples for a model, one at a time: what ``vlmkit data tokenize`` writes.

:func:`iter_examples` is the stream the training reads (an :class:`~.tokenize.Example`, or the
:class:`~.tokenize.RecordError` that says why a record is refused); :func:`tokenize_file`
writes it as JSON Lines: ``{"id", "input_ids", "labels"}`` or ``{"id", "error"}``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from PIL import Image

from .convert import open_records
from .files import RecordWriter, encode
from .model import DataModel
from .pool import chunked, ordered_map
from .records import Record
from .tokenize import Example, RecordError, tokenize


def _image_size(name: str, folder: Path | None) -> tuple[int, int] | None:
    path = Path(name) if Path(name).is_absolute() or folder is None else folder / name
    try:
        with Image.open(path) as im:  # the header only
            return im.size
    except (OSError, ValueError):
        return None


def iter_examples(records: Iterable[Record], model: DataModel, *, image_folder: str | os.PathLike | None = None,
                  strict: bool = False) -> Iterator[Example | RecordError]:
    """Tokenise each record as the model's training does; refused records come as their ``RecordError``.

    Args:
        records: e.g. ``open_records(path)``.
        model: see ``model.load_data_model``.
        image_folder: where the images are; needed for anyres models (features depend on the image size).
        strict: refuse the records the original trains on in its own way (``tokenize.QUIRKS``).
    """
    folder = Path(image_folder) if image_folder is not None else None
    for record in records:
        per_image = model.fixed_image_tokens
        if per_image is None and record.images and folder is not None:
            size = _image_size(record.images[0], folder)
            per_image = model.image_tokens(size) if size else None
        try:
            yield tokenize(record, model.template, model.encoder, max_length=model.max_length, image_tokens=per_image,
                           strict=strict)
        except RecordError as e:
            yield e


@dataclass(frozen=True)
class TokenizeResult:
    """What ``tokenize_file`` wrote."""

    destination: Path
    examples: int
    refused: int
    trained_tokens: int
    seconds: float

    @property
    def records_per_second(self) -> float:
        return (self.examples + self.refused) / self.seconds if self.seconds else 0.0


def encode_examples(model: DataModel, records: list[Record], *, image_folder: str | os.PathLike | None = None,
                    strict: bool = False) -> list[tuple[str, int | None]]:
    """The lines ``tokenize_file`` writes for ``records``, as ``(JSON text, trained tokens or None if refused)``:
    the record function, run in this process or in a worker of ``pool.ordered_map`` or of ``data tokenize --ray``."""
    lines = []
    for item in iter_examples(records, model, image_folder=image_folder, strict=strict):
        if isinstance(item, RecordError):
            lines.append((encode({"id": item.record_id, "error": item.message}), None))
        else:
            lines.append((encode(item.to_json()), item.trained))
    return lines


def tokenize_file(source: str | os.PathLike, destination: str | os.PathLike, model: DataModel, *,
                  image_folder: str | os.PathLike | None = None, source_format: str = "auto", force: bool = False,
                  strict: bool = False, workers: int = 1) -> TokenizeResult:
    """Write one JSON line per record of ``source``: ``{"id", "input_ids", "labels"}`` or ``{"id", "error"}``.

    Args:
        source: the records.
        destination: a .jsonl file (written atomically; refused if it exists unless ``force``).
        model: the model whose tokenizer, template and length apply.
        image_folder: where the images are (anyres models).
        source_format: "auto" or a format of ``formats.FORMATS``.
        force: replace an existing destination.
        strict: refuse the records the original trains on in its own way (``tokenize.QUIRKS``).
        workers: processes tokenising (``pool.ordered_map``); the output is the same for any number.
    """
    started = time.perf_counter()
    stream = open_records(source, source_format=source_format)
    with RecordWriter(destination, force=force, sources=(source,)) as out:
        counts = write_lines(out, ordered_map(partial(encode_examples, image_folder=image_folder, strict=strict),
                                              model, chunked(stream), workers=workers))
    return TokenizeResult(Path(destination), *counts, time.perf_counter() - started)


def write_lines(out: RecordWriter, results: Iterable[tuple[object, list[tuple[str, int | None]]]]) \
        -> tuple[int, int, int]:
    """Write the lines of ``encode_examples`` results in order; ``(examples, refused, trained tokens)``."""
    examples = refused = trained = 0
    for _, lines in results:
        out.write_encoded(text for text, _ in lines)
        for _, count in lines:
            if count is None:
                refused += 1
            else:
                examples += 1
                trained += count
    return examples, refused, trained
