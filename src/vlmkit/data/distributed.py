"""``vlmkit data tokenize --ray``: the record function of ``data tokenize`` on Ray Data, over Parquet shards.

The unit of work is one row group of one Parquet shard (``path``, ``row_group``, and the number of
its first row, which names the records without an id and the rows in messages as a single-process
run does). Each of ``workers`` actors loads the model once (``DataModel.spec``) and runs
``examples.encode_examples`` on its row groups; Ray Data keeps the units in order, and the driver
writes the lines through the same ``RecordWriter``: the file is byte for byte the one ``data tokenize``
writes without ``--ray``, shard after shard.

Example:
    >>> tokenize_on_ray("shards/", "tokens.jsonl", load_data_model("llava-v1.5-7b"), workers=8)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .examples import TokenizeResult, encode_examples, write_lines
from .files import RecordWriter, read_rows
from .formats import detect
from .model import DataModel
from .pool import chunked
from .records import DataError


def parquet_shards(source: str | os.PathLike) -> list[Path]:
    """A Parquet file, or the ``*.parquet`` files of a folder in name order."""
    source = Path(source)
    shards = sorted(source.glob("*.parquet")) if source.is_dir() else [source]
    if not shards or any(p.suffix.lower() != ".parquet" or not p.is_file() for p in shards):
        raise DataError(f"{source}: --ray reads a Parquet file or a folder of Parquet shards",
                        hint="write the records as Parquet (e.g. pyarrow.parquet.write_table), or leave out --ray")
    return shards


def start_ray(address: str | None, cpus: int) -> None:
    """Join the Ray cluster at ``address``, or start a local one of ``cpus`` CPUs (unless this process has one)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=cpus if address is None else None, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)


def _units(shards: list[Path]) -> list[dict]:
    import pyarrow.parquet as pq

    units = []
    for path in shards:
        metadata = pq.ParquetFile(path).metadata
        first = 0
        for group in range(metadata.num_row_groups):
            units.append({"path": str(path), "row_group": group, "first": first})
            first += metadata.row_group(group).num_rows
    return units


class _Tokenizer:
    """A Ray Data actor: the model loaded once, then row groups -> lines."""

    def __init__(self, spec: tuple, source_format: str, image_folder: str | None, strict: bool):
        from .pool import _load

        _load(spec)
        self.source_format, self.image_folder, self.strict = source_format, image_folder, strict

    def __call__(self, batch: dict) -> dict:
        import pyarrow.parquet as pq

        from . import pool
        from .convert import records_of

        texts, trained = [], []
        for path, group, first in zip(batch["path"], batch["row_group"], batch["first"]):
            path, first = Path(str(path)), int(first)
            rows = pq.ParquetFile(path).read_row_group(int(group)).to_pylist()
            where = ((f"{path.name}:#{first + k}", row) for k, row in enumerate(rows))
            records = records_of(path, where, source_format=self.source_format, start=first)
            for text, count in encode_examples(pool._model, list(records), image_folder=self.image_folder,
                                               strict=self.strict):
                texts.append(text)
                trained.append(-1 if count is None else count)
        return {"text": texts, "trained": trained}


def tokenize_on_ray(source: str | os.PathLike, destination: str | os.PathLike, model: DataModel, *,
                    image_folder: str | os.PathLike | None = None, source_format: str = "auto", force: bool = False,
                    strict: bool = False, workers: int = 1, address: str | None = None) -> TokenizeResult:
    """``examples.tokenize_file`` on Ray Data: the same lines, from ``workers`` actors.

    Args:
        source: a Parquet file or a folder of Parquet shards (read in name order).
        address: a Ray cluster's address; None: a local cluster of ``workers`` CPUs (or the one this
            process already started).
        The rest: as ``tokenize_file``.

    Raises:
        DataError: not Parquet, Ray not installed, or a model built by hand (the actors load it by path).
    """
    started = time.perf_counter()
    shards = parquet_shards(source)
    if model.spec is None:
        raise DataError("--ray: the actors load the model by its path; this one was built by hand",
                        hint="load it with vlmkit.data.load_data_model")
    if source_format == "auto":  # as a single-process run: the format of the first entry
        first = next(read_rows(shards[0]), None)
        source_format = "llava" if first is None else detect(first[1])
    try:
        import ray
    except ImportError:
        raise DataError("data tokenize --ray needs Ray Data", hint="pip install 'ray[data]'") from None
    with RecordWriter(destination, force=force, sources=tuple(shards)) as out:
        start_ray(address, workers)
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # the lines in the order of the shards
        context.enable_progress_bars = False
        lines = ray.data.from_items(_units(shards)).map_batches(
            _Tokenizer, fn_constructor_args=(model.spec, source_format,
                                             str(image_folder) if image_folder is not None else None, strict),
            batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
        rows = ((str(row["text"]), None if row["trained"] < 0 else int(row["trained"])) for row in lines.iter_rows())
        counts = write_lines(out, ((None, chunk) for chunk in chunked(rows, 1024)))
    return TokenizeResult(Path(destination), *counts, time.perf_counter() - started)
