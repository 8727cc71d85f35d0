"""Atomic output folders and their manifests.

Everything is written into a hidden temporary folder beside the destination and
renamed into place only when the writing finished without an exception. An error,
Ctrl-C or SIGTERM removes the temporary folder: nothing appears under the destination
name, and an existing destination (replaced only with ``force``) is untouched until the
end. A temporary left by a run that could not clean up (SIGKILL, power loss) carries its
process id in its name; the next run into the same destination removes it once that
process is gone.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .._version import __version__
from ..errors import ManifestError, OutputError
from ..tensors import TensorInfo
from .source_hashes import SourceHashes, sha256_file

MANIFEST = "vlmkit-manifest.json"
CARD = "README.md"  # the model card: the name the Hub shows
# huggingface_hub's own bookkeeping inside a folder (``hf download --local-dir``, uploads): never model files;
# the Hub's first commit of a new repository adds .gitattributes (which files go to LFS), and downloads bring it
HUB_BOOKKEEPING = ".cache/huggingface/"
HUB_FILES = (".gitattributes",)
# the temporaries of ``rewrite_file`` (a crash before its renames leaves them): ``.NAME.vlmkit-tmp-TAG``
REWRITE_TEMPORARY = re.compile(r"\.(.+)\.vlmkit-tmp-[0-9a-f]{8}")


def check_destination(dst: Path, source_files: list[Path], *, force: bool) -> None:
    """Refuse a destination that exists (without ``force``) or whose replacement would touch the source."""
    dst = dst.resolve()
    for f in source_files:
        f = f.resolve()
        if f == dst or dst in f.parents:
            raise OutputError(f"destination {dst} contains the source file {f}; vlmkit never writes over its input",
                              hint="choose another destination")
    if dst.exists() and not force:
        raise OutputError(f"destination {dst} already exists", hint="pass --force to replace it, or choose another")


def source_fingerprint(infos: list[TensorInfo]) -> str:
    """A hash of the source listing (names, shapes, dtypes, file names and sizes); reads no data."""
    digest = hashlib.sha256()
    for i in sorted(infos, key=lambda i: i.name):
        digest.update(f"{i.name}|{list(i.shape)}|{i.dtype}|{i.file.name}\n".encode())
    for f in sorted({i.file for i in infos}):
        digest.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return digest.hexdigest()


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while writing: unwinds like Ctrl-C, so the temporary folder is removed."""

    signum = signal.SIGTERM


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread instead of killing the process
    outright (which would skip every cleanup); the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _temporary_name(dst: Path) -> str:
    return f".{dst.name}.vlmkit-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(dst: Path) -> list[Path]:
    """Remove the temporaries that killed runs left beside ``dst`` (their process is gone); returns them.

    A temporary whose process still runs is another conversion in progress and is left alone;
    one without a process id in its name (older vlmkit) is stale too.
    """
    pattern = re.compile(rf"\.{re.escape(dst.name)}\.vlmkit-tmp-(?:(\d+)-)?[0-9a-f]{{8}}")
    removed = []
    for path in dst.parent.glob(f".{glob.escape(dst.name)}.vlmkit-tmp-*"):
        m = pattern.fullmatch(path.name)
        if not m or (m.group(1) and _alive(int(m.group(1)))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_folder(dst: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``dst`` when the block exits cleanly.

    Raises:
        OutputError: ``dst`` exists and ``force`` is False, or the disk refuses a write
            (the temporary folder is removed first).
    """
    dst = Path(dst).absolute()
    if dst.exists() and not force:
        raise OutputError(f"destination {dst} already exists", hint="pass --force to replace it, or choose another")
    parent = dst.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(dst):
            print(f"removed {stale}, left by an earlier run that was killed", file=sys.stderr)
        tmp = parent / _temporary_name(dst)
        tmp.mkdir()
    except OSError as e:
        raise _os_error(e, parent) from None
    try:
        with _terminate_as_interrupt():
            yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(e, dst) from None
    except BaseException:  # including KeyboardInterrupt and SIGTERM: never leave a partial output
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if dst.exists() or dst.is_symlink():
            old = parent / f".{dst.name}.vlmkit-old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, old)
        os.replace(tmp, dst)
    except OSError as e:
        if old is not None and not dst.exists():
            os.replace(old, dst)
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(e, dst) from None
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _os_error(e: OSError, where: Path) -> OutputError:
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EFBIG: "a file grew beyond the allowed size (disk quota or file size limit)",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the file system is read-only",
        errno.EDQUOT: "the disk quota is exceeded",
    }.get(e.errno, e.strerror or str(e))
    return OutputError(f"could not write {where}: {reason}; nothing was left behind",
                       hint="free space or choose a writable destination, then run again")


def hash_sources(source) -> SourceHashes:
    """Start hashing ``source``'s files in the background (see ``source_hashes``); pass it to ``source_record``."""
    return SourceHashes(list(source.files()))


def source_record(source, hashes: SourceHashes | None = None) -> dict:
    """What the manifest and the card say about a source: path, format, listing fingerprint, and each file.

    Each file's sha256 comes from ``hashes`` (``hash_sources``, started with the conversion so its reads
    overlap the conversion's; a Hub snapshot's blob names and a cache make it cheap): a card names the
    exact bytes it came from, which a listing fingerprint cannot. The hub id is known when the source is
    a ``huggingface_hub`` snapshot, the license when the source's own README states one.
    """
    infos = [source.info(n) for n in source.keys()]
    files = sorted({f.absolute() for f in source.files()})
    digests = (hashes or hash_sources(source)).result()
    return {"path": str(Path(source.path).absolute()), "format": source.format,
            "fingerprint": source_fingerprint(infos),
            "files": [{"path": str(f), "bytes": f.stat().st_size, "sha256": digests[f]} for f in files],
            "hub_id": hub_id_of(Path(source.path)), "license": license_of(Path(source.path))}


def hub_id_of(path: Path) -> str | None:
    """``owner/name`` of a path inside the huggingface_hub cache (``models--owner--name/snapshots/...``)."""
    for part in Path(path).absolute().parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/", 1)
    return None


def license_of(path: Path) -> dict | None:
    """The ``license`` (and ``license_name`` / ``license_link``) of the README front matter beside a source."""
    import yaml

    readme = (path if path.is_dir() else path.parent) / CARD
    try:
        text = readme.read_text(encoding="utf-8")
        if not text.startswith("---"):
            return None
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except (OSError, UnicodeDecodeError, IndexError, yaml.YAMLError):
        return None
    if not isinstance(meta, dict) or not meta.get("license"):
        return None
    return {k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)}


def write_manifest(folder: Path, *, known_hashes: dict[str, str], source: dict, plan: dict | None,
                   provenance: dict | None = None,
                   assumptions: list[str] | None = None, card: Callable[[dict, Path], str] | None = None) -> dict:
    """Write ``vlmkit-manifest.json``: each file's sha256 and size, the source, the tool version, the plan.

    Args:
        known_hashes: hashes computed while writing (the big files); the rest are hashed here.
        provenance: how the folder was made (command, options); shown by the model card.
        assumptions: values no source file states that the output rests on (empty: none).
        card: renders the model card from the manifest and the folder; written as README.md
            and listed in the manifest like every other file.

    Returns:
        The manifest.
    """
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"sha256": known_hashes.get(rel) or sha256_file(path), "bytes": path.stat().st_size}
    manifest = {
        "vlmkit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "files": files,
        "assumptions": list(assumptions or []),
        "plan": plan,
    }
    if provenance is not None:
        manifest["provenance"] = provenance
    if card is not None:
        data = card(manifest, folder).encode("utf-8")
        (folder / CARD).write_bytes(data)
        files[CARD] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise ManifestError(f"{folder}: no {MANIFEST}; only folders written by vlmkit carry one")
    try:
        manifest = json.loads(path.read_text())
        manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e!r})") from None
    return manifest


def rewrite_file(folder: Path, manifest: dict, name: str, data: bytes) -> None:
    """Replace one file of a checked folder and its manifest entry, each by an atomic rename.

    The file is renamed into place first, then the manifest: a crash between the two leaves a
    folder whose ``verify-files`` names that one file, never a manifest vouching for bytes it
    did not hash.
    """
    folder = Path(folder)
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    tag = uuid.uuid4().hex[:8]
    tmp_file, tmp_manifest = folder / f".{name}.vlmkit-tmp-{tag}", folder / f".{MANIFEST}.vlmkit-tmp-{tag}"
    try:
        tmp_file.write_bytes(data)
        tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp_file, folder / name)
        os.replace(tmp_manifest, folder / MANIFEST)
    except OSError as e:
        raise _os_error(e, folder / name) from None
    finally:  # also on Ctrl-C: no temporary is left in the folder (a renamed one is gone already)
        for p in (tmp_file, tmp_manifest):
            p.unlink(missing_ok=True)


def verify_files(folder: Path) -> dict:
    """Re-hash every file named in the folder's manifest.

    Hub bookkeeping (``.cache/huggingface/``, ``.gitattributes``) is not a model file and is ignored;
    so are the temporaries an interrupted ``rewrite_file`` left, which the result names.

    Returns:
        ``{"checked": n, "bytes": total}`` when everything matches, with ``"leftovers"``: the
        temporaries ignored, if any.

    Raises:
        ManifestError: listing every missing, changed or unlisted file.
    """
    folder = Path(folder)
    files = read_manifest(folder)["files"]
    problems = []
    total = 0
    for rel, entry in files.items():
        p = folder / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = p.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{rel}: {size} bytes, the manifest says {entry['bytes']}")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{rel}: content changed (sha256 differs)")
        total += size
    leftovers = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or p.name == MANIFEST or rel in files or rel in HUB_FILES or rel.startswith(HUB_BOOKKEEPING):
            continue
        if REWRITE_TEMPORARY.fullmatch(p.name):
            leftovers.append(rel)
        else:
            problems.append(f"{rel}: not in the manifest")
    if problems:
        raise ManifestError(f"{folder}: {len(problems)} file(s) do not match {MANIFEST}:\n"
                            + "\n".join(f"  - {p}" for p in problems),
                            hint="copy or download the folder again, or re-run the conversion")
    return {"checked": len(files), "bytes": total, **({"leftovers": leftovers} if leftovers else {})}


def provenance(options, command: str | None = None) -> dict:
    """How a conversion was asked for (``LoadOptions`` and the command line), as the manifest records it."""
    def absolute(p):
        return str(Path(p).absolute()) if p and Path(p).exists() else p

    return {"command": command, "vision_tower": absolute(options.vision_tower),
            "model_base": absolute(options.model_base), "seed": options.seed, "template": options.template,
            "dtype": options.dtype, "config_override": options.config}
