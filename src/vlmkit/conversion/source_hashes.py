"""The sha256 of every source file, at little cost: the manifest and the card name the exact bytes converted.

Three ways, cheapest first:

- a file of a ``huggingface_hub`` snapshot is a symlink to ``blobs/<sha256>`` when it is an LFS file
  (every weight file): the name of the blob is its sha256 (the Hub checked it on download);
- a file hashed before, unchanged since, is looked up in ``source-hashes.json`` under the vlmkit cache
  (``$VLMKIT_CACHE``, else ``~/.cache/vlmkit``), keyed by path, inode, size and mtime_ns;
- the rest is hashed in a background thread started with the conversion, so its reads overlap the
  conversion's own (and share the page cache) instead of reading a multi-GB source a second time after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import uuid
from pathlib import Path

SHA256 = re.compile(r"[0-9a-f]{64}")
CACHE_FILE = "source-hashes.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
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


class SourceHashes:
    """Hashes ``files`` in a background thread from construction; ``result()`` waits for them."""

    def __init__(self, files: list[Path]):
        self.files = sorted({Path(f).absolute() for f in files})
        self._hashes: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vlmkit-source-hashes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            cache, new = _load_cache(), {}
            for f in self.files:
                key = _key(f)
                digest = hub_blob_sha256(f) or cache.get(key)
                if digest is None:
                    digest = new[key] = sha256_file(f)
                self._hashes[f] = digest
            if new:
                _save_cache(new)
        except BaseException as e:  # handed to the thread that asks for the result
            self._error = e

    def result(self) -> dict[Path, str]:
        """``{absolute path: sha256}`` of every file; re-raises what the hashing thread met (an unreadable file)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return dict(self._hashes)
