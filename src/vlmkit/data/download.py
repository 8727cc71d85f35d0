"""``vlmkit data download``: a URL + caption list becomes local images and records pointing at them.

The downloading is img2dataset's (the standard tool for LAION-scale URL lists): threads
and processes, resizing, retries, and resuming (``incremental`` mode skips the shards a
previous run finished). vlmkit reads what it wrote — ``NNNNN/KEY.jpg`` files and one
``NNNNN.parquet`` of per-URL status per shard — and turns it into records (image paths
relative to the output folder, which is the training's ``--image-folder``) and a list of
the URLs that failed, with img2dataset's reason.

Example:
    >>> result = download("wukong_urls.csv", "wukong/", prompts=("为该图片生成标注。",))   # doctest: +SKIP
    >>> result.downloaded, result.failed, result.records
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .files import RecordWriter, read_rows
from .formats import get_format
from .records import DataError
from .tables import TableMapping

# img2dataset's input_format for each extension vlmkit reads.
INPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt"}
RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")
# img2dataset's distributors: processes on this machine, or the shards as tasks of a Spark / Ray cluster
DISTRIBUTORS = {"multiprocessing": None, "pyspark": "pyspark", "ray": "ray"}
FAILED_NAME = "failed.jsonl"
RECORDS_NAME = "records.jsonl"


@dataclass(frozen=True)
class DownloadResult:
    """What a download run left in the output folder."""

    folder: Path
    records_path: Path
    failed_path: Path
    downloaded: int
    failed: int
    records: int


def _input_format(path: Path) -> str:
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: img2dataset reads {', '.join(INPUT_FORMATS)} URL lists",
                        hint="convert the list to CSV (columns url, caption) first")
    return fmt


def _check_columns(path: Path, fmt: str, needed: list[str]) -> None:
    if fmt == "txt":
        return
    first = next(read_rows(path), None)
    if first is None:
        raise DataError(f"{path}: the URL list is empty")
    missing = [c for c in needed if c not in first[1]]
    if missing:
        raise DataError(f"{path}: no column {', '.join(missing)}; the columns are {', '.join(first[1])}",
                        hint="name them with --url-column / --caption-column / --id-column")


def download(url_list: str | os.PathLike, folder: str | os.PathLike, *, prompts: tuple[str, ...],
             url_column: str = "url", caption_column: str = "caption", id_column: str | None = None,
             placement: str = "before", seed: int = 0, image_size: int = 336, resize_mode: str = "border",
             encode_format: str = "jpg", processes: int = 1, threads: int = 16, timeout: int = 10,
             retries: int = 0, records: str | os.PathLike | None = None, to: str = "llava",
             quiet: bool = False, distributor: str = "multiprocessing", ray_address: str | None = None,
             shard_size: int = 10_000) -> DownloadResult:
    """Download the images of a URL list with img2dataset and write records for the ones that arrived.

    Args:
        url_list: CSV / TSV / JSONL / Parquet with a URL and a caption column (or a .txt of URLs).
        folder: where the images go (created; an earlier run's finished shards are kept, so a rerun resumes).
        prompts: the instruction(s) the captions answer (see ``tables.TableMapping``).
        url_column / caption_column / id_column: the columns; ids default to img2dataset's keys.
        placement / seed: ``<image>`` placement and the seed of the prompt choice.
        image_size / resize_mode: img2dataset's resizing ("border" pads to a square, "no" keeps the file).
        encode_format: "jpg", "png" or "webp".
        processes / threads / timeout / retries: img2dataset's parallelism and patience.
        records: the records file (default ``FOLDER/records.jsonl``); rewritten from all shards on each run.
        to: the records' format.
        quiet: keep img2dataset's progress output off the terminal.
        distributor: "multiprocessing" (``processes`` on this machine), "pyspark" (the active Spark session, else a
            local one) or "ray" (the cluster at ``ray_address``, else a local one of ``processes`` CPUs); each
            shard (``shard_size`` URLs) is one task. The output folder must be one that every
            worker writes to (a shared file system) for a cluster of several machines.
        ray_address: the Ray cluster for ``distributor="ray"``.
        shard_size: URLs per shard (img2dataset's ``number_sample_per_shard``): the unit of work of a distributor.

    Returns:
        Counts and the paths of the records and of ``failed.jsonl`` (url, error, key per failed URL).

    Raises:
        DataError: unreadable list, missing columns, img2dataset (or the distributor's package) not installed.
    """
    url_list, folder = Path(url_list), Path(folder)
    fmt = _input_format(url_list)
    if resize_mode not in RESIZE_MODES:
        raise DataError(f"--resize-mode {resize_mode!r} is unknown", hint=f"use one of: {', '.join(RESIZE_MODES)}")
    _check_columns(url_list, fmt, [c for c in (url_column, caption_column, id_column) if c])
    mapping = TableMapping(image_column="image", text_column="caption", id_column="id", prompts=prompts,
                           placement=placement, seed=seed)
    encode = get_format(to).encode  # fail on a bad --to before downloading anything
    if distributor not in DISTRIBUTORS:
        raise DataError(f"--distributor {distributor!r} is unknown", hint=f"use one of: {', '.join(DISTRIBUTORS)}")
    if DISTRIBUTORS[distributor] and importlib.util.find_spec(DISTRIBUTORS[distributor]) is None:
        raise DataError(f"--distributor {distributor} needs {DISTRIBUTORS[distributor]}, which is not installed",
                        hint=f"pip install {DISTRIBUTORS[distributor]}")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks the network at import otherwise
    try:
        import img2dataset
    except ImportError:
        raise DataError("vlmkit data download uses img2dataset, which is not installed",
                        hint="pip install img2dataset") from None
    folder.mkdir(parents=True, exist_ok=True)
    if distributor == "ray":
        from .distributed import start_ray

        start_ray(ray_address, processes)
    sink = open(os.devnull, "w") if quiet else sys.stderr
    with contextlib.redirect_stdout(sink):
        img2dataset.download(
            url_list=str(url_list), output_folder=str(folder), input_format=fmt, url_col=url_column,
            caption_col=caption_column if fmt != "txt" else None,
            save_additional_columns=[id_column] if id_column else None, output_format="files",
            image_size=image_size, resize_mode=resize_mode, encode_format=encode_format,
            processes_count=processes, thread_count=threads, timeout=timeout, retries=retries,
            number_sample_per_shard=shard_size, incremental_mode="incremental", enable_wandb=False, extract_exif=False,
            compute_hash=None,
            distributor=distributor)
    if quiet:
        sink.close()
    return _collect(folder, Path(records) if records else folder / RECORDS_NAME, mapping, encode, id_column,
                    encode_format)


def _collect(folder: Path, records_path: Path, mapping: TableMapping, encode, id_column: str | None,
             extension: str) -> DownloadResult:
    """Records for the downloaded images and failed.jsonl, from img2dataset's per-shard Parquet files."""
    to_record = mapping.bind(["image", "caption", "id"], str(folder))
    ok = failed = index = 0
    failed_path = folder / FAILED_NAME
    with RecordWriter(records_path, force=True) as out, RecordWriter(failed_path, force=True) as bad:
        for shard in sorted(folder.glob("[0-9]*.parquet")):
            for where, row in read_rows(shard):
                key = row.get("key")
                if row.get("status") != "success":
                    bad.write({"url": row.get("url"), "error": row.get("error_message"), "key": key,
                               **({"id": row.get(id_column)} if id_column else {})})
                    failed += 1
                    continue
                image = f"{shard.stem}/{key}.{extension}"
                record_id = row.get(id_column) if id_column else key
                table_row = {"image": image, "caption": row.get("caption"), "id": record_id}
                out.write(encode(to_record(where, table_row, index)))
                ok += 1
                index += 1
    return DownloadResult(folder, records_path, failed_path, ok, failed, out.count)
