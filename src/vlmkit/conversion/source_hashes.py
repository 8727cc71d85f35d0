"""The sha256 of every source file, at little cost: the manifest and the card name the exact bytes converted.

Three ways, cheapest first:

- a file of a ``huggingface_hub`` snapshot is a symlink to ``blobs/<sha256>`` when it is an LFS file
  (every weight file): the name of the blob is its sha256 (the Hub checked it on download);
- a file hashed before, unchanged since, is looked up in ``source-hashes.json`` under the vlmkit cache
  (``$VLMKIT_CACHE``, else ``~/.cache/vlmkit``), keyed by path, inode, size and mtime_ns;
- the rest is hashed in a background thread started as soon as the conversion knows its files, so its
  reads overlap the conversion's planning and bring the files into the page cache the conversion copies
  from, instead of reading a multi-GB source a second time after it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import queue
import re
import threading
import uuid
from pathlib import Path

from ..tensors import hash_file_range

SHA256 = re.compile(r"[0-9a-f]{64}")
CACHE_FILE = "source-hashes.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    hash_file_range(digest, path, 0, path.stat().st_size)  # from the page cache, no copy
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("VLMKIT_CACHE") or Path.home() / ".cache" / "vlmkit")


def hub_blob_sha256(path: Path) -> str | None:
    """The sha256 a huggingface_hub snapshot file's blob is named after, or None (not an LFS blob link)."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and SHA256.fullmatch(target.name):
        return target.name
    return None


def _key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"


def _load_cache() -> dict[str, str]:
    try:
        data = json.loads((cache_dir() / CACHE_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(new: dict[str, str]) -> None:
    """Merge ``new`` into the cache file (atomic rename; a cache that cannot be written is only a lost speed-up)."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data = {**_load_cache(), **new}
        tmp = folder / f".{CACHE_FILE}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(data, indent=0))
        os.replace(tmp, folder / CACHE_FILE)
    except OSError:
        pass


_lock = threading.Lock()
_queue: queue.Queue = queue.Queue()
_digests: dict[str, concurrent.futures.Future] = {}  # _key(file) -> its sha256, once per process
_worker: threading.Thread | None = None


def _digest(path: Path) -> str:
    key = _key(path)
    digest = hub_blob_sha256(path) or _load_cache().get(key)
    if digest is None:
        digest = sha256_file(path)
        _save_cache({key: digest})
    return digest


def _work() -> None:
    while True:
        path, future = _queue.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(_digest(path))
            except BaseException as e:  # noqa: BLE001 - handed to whoever asks for the result
                future.set_exception(e)


def start(files) -> dict[Path, concurrent.futures.Future]:
    """Hash ``files`` in one background thread, in order, each version of a file once per process.

    A conversion starts it as soon as it knows its files (``prefetch``: before the seconds spent
    importing transformers and planning, on the core they leave idle); reading the files then also
    brings them into the page cache, from which the conversion copies them. The thread is a daemon:
    a command that fails first does not wait for it.
    """
    global _worker
    futures = {}
    with _lock:
        if _worker is None:
            _worker = threading.Thread(target=_work, name="vlmkit-source-hashes", daemon=True)
            _worker.start()
        for f in sorted({Path(f).absolute() for f in files}):
            try:
                key = _key(f)
            except OSError as e:  # raised by result(), where the caller asks
                futures[f] = concurrent.futures.Future()
                futures[f].set_exception(e)
                continue
            if key not in _digests:
                _digests[key] = concurrent.futures.Future()
                _queue.put((f, _digests[key]))
            futures[f] = _digests[key]
    return futures


def prefetch(*paths) -> None:
    """Start hashing the weight files under ``paths`` (files or folders; others ignored): see ``start``."""
    from ..tensors import weight_files

    start([f for p in paths if p is not None and Path(p).exists() for f in weight_files(Path(p))])


class SourceHashes:
    """The sha256 of ``files``, hashed in the background (``start``); ``result()`` waits for them."""

    def __init__(self, files: list[Path]):
        self.files = sorted({Path(f).absolute() for f in files})
        self._futures = start(self.files)

    def result(self) -> dict[Path, str]:
        """``{absolute path: sha256}`` of every file; re-raises what the hashing met (an unreadable file)."""
        return {f: future.result() for f, future in self._futures.items()}
