"""Source hashes: a Hub snapshot's blob names, a cache keyed by (path, inode, size, mtime), a background thread."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from vlmkit.conversion import output, source_hashes


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def counting(monkeypatch) -> list[Path]:
    """Record every file ``source_hashes.sha256_file`` reads."""
    read, real = [], source_hashes.sha256_file

    def sha256_file(path):
        read.append(Path(path))
        return real(path)

    monkeypatch.setattr(source_hashes, "sha256_file", sha256_file)
    return read


def test_hashes_are_the_files_sha256_and_the_cache_skips_the_second_read(tmp_path, cache, monkeypatch):
    files = []
    for i in range(3):
        (tmp_path / f"part-{i}.bin").write_bytes(os.urandom(1000 + i))
        files.append(tmp_path / f"part-{i}.bin")
    read = counting(monkeypatch)
    hashes = source_hashes.SourceHashes(files).result()
    assert hashes == {f: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    assert sorted(read) == files and (cache / source_hashes.CACHE_FILE).is_file()

    read.clear()
    assert source_hashes.SourceHashes(files).result() == hashes
    assert read == []  # all from the cache

    files[1].write_bytes(b"changed")  # another size and mtime: hashed again
    again = source_hashes.SourceHashes(files).result()
    assert read == [files[1]] and again[files[1]] == hashlib.sha256(b"changed").hexdigest()


def test_a_rewritten_file_of_the_same_size_is_hashed_again(tmp_path, cache, monkeypatch):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 64)
    source_hashes.SourceHashes([f]).result()
    st = f.stat()
    f.write_bytes(b"b" * 64)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    read = counting(monkeypatch)
    assert source_hashes.SourceHashes([f]).result()[f] == hashlib.sha256(b"b" * 64).hexdigest() and read == [f]


def test_a_hub_snapshot_lfs_file_is_named_by_its_blob_and_not_read(tmp_path, cache, monkeypatch):
    """huggingface_hub's cache: snapshots/REV/FILE -> ../../blobs/SHA256 for LFS files, git sha1 for the others."""
    repo = tmp_path / "models--owner--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / ("1" * 40)).mkdir(parents=True)
    weights, config = os.urandom(4096), json.dumps({"a": 1}).encode()
    lfs = hashlib.sha256(weights).hexdigest()
    git = hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    (repo / "blobs" / lfs).write_bytes(weights)
    (repo / "blobs" / git).write_bytes(config)
    snapshot = repo / "snapshots" / ("1" * 40)
    (snapshot / "model.safetensors").symlink_to(Path("../../blobs") / lfs)
    (snapshot / "config.json").symlink_to(Path("../../blobs") / git)
    read = counting(monkeypatch)
    hashes = source_hashes.SourceHashes([snapshot / "model.safetensors", snapshot / "config.json"]).result()
    assert hashes[snapshot / "model.safetensors"] == lfs
    assert hashes[snapshot / "config.json"] == hashlib.sha256(config).hexdigest()
    assert read == [snapshot / "config.json"]  # the weights are not read


def test_an_unreadable_source_file_is_raised_to_the_caller(tmp_path, cache):
    hashing = source_hashes.SourceHashes([tmp_path / "gone.bin"])
    with pytest.raises(FileNotFoundError):
        hashing.result()


def test_conversion_hashes_the_source_in_the_background_and_records_it(tmp_path, cache, monkeypatch):
    """engine.run starts the hashing before it writes, and the manifest names every source file's true sha256."""
    from vlmkit.families.llava import tiny as llava_tiny

    from ..conftest import run_cli

    clip = llava_tiny.make_clip(tmp_path / "clip-tiny")
    started = []
    real = output.hash_sources
    monkeypatch.setattr(output, "hash_sources", lambda source: started.append(source) or real(source))
    assert run_cli("convert", clip, tmp_path / "out", "--quiet").code == 0
    assert len(started) == 1
    manifest = json.loads((tmp_path / "out" / output.MANIFEST).read_text())
    for f in manifest["source"]["files"]:
        assert f["sha256"] == hashlib.sha256(Path(f["path"]).read_bytes()).hexdigest()
    assert json.loads((cache / source_hashes.CACHE_FILE).read_text())  # the next run finds them


def test_a_conversion_hashes_its_files_from_the_start_each_once_and_a_dry_run_none(tmp_path, cache, monkeypatch):
    """The CLI starts hashing the checkpoint's and the tower's weight files before planning (not training state,
    not configs); the manifest's hashes reuse those; a dry run hashes nothing."""
    from vlmkit.families.llava import tiny as llava_tiny

    from ..conftest import run_cli

    clip = llava_tiny.make_clip(tmp_path / "clip-tiny")
    model = llava_tiny.make_llava15(tmp_path / "llava-v1.5-tiny", clip)
    (model / "training_args.bin").write_bytes(b"not weights")
    from vlmkit.families.llava import convert

    read, events = counting(monkeypatch), []
    start, plan = source_hashes.start, convert.conversion
    monkeypatch.setattr(source_hashes, "start", lambda files: events.append(("hash", len(files))) or start(files))
    monkeypatch.setattr(convert, "conversion", lambda *a: events.append(("plan",)) or plan(*a))
    assert run_cli("convert", model, tmp_path / "dry", "--vision-tower", clip, "--dry-run", "--quiet").code == 0
    assert read == [] and events == [("plan",)]
    events.clear()
    assert run_cli("convert", model, tmp_path / "out", "--vision-tower", clip, "--quiet").code == 0
    weights = sorted(p.absolute() for folder in (model, clip) for p in folder.iterdir()
                     if p.suffix in (".safetensors", ".bin") and p.name != "training_args.bin")
    assert events[:2] == [("hash", len(weights)), ("plan",)]  # the checkpoint's and the tower's weights, then planning
    assert sorted(read) == weights  # each once, though started early and asked for again by the manifest
    manifest = json.loads((tmp_path / "out" / output.MANIFEST).read_text())
    assert {Path(f["path"]) for f in manifest["source"]["files"]} <= set(weights)
