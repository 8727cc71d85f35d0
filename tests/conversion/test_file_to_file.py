"""Tensors that only move are copied file to file by the kernel; the output is the bytes a read-and-write makes."""

from __future__ import annotations

import errno
import hashlib
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

from vlmkit.conversion import Conversion, ResizeRows, identity, rename, run, transform
from vlmkit.conversion.rules import zero_rows
from vlmkit.errors import CheckpointError
from vlmkit.tensors import open_source

TENSORS = {f"w{i}": torch.randn(64 + i, 48, generator=torch.Generator().manual_seed(i)) for i in range(6)}
TENSORS.update(half=torch.randn(33, 7).half(), ids=torch.arange(9), empty=torch.zeros(0, 4))


@pytest.fixture
def kernel_copies(monkeypatch):
    """Every os.copy_file_range call: (bytes asked)."""
    calls, real = [], os.copy_file_range

    def copy(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", copy)
    return calls


def _by_reading(tmp_path, source_path, **kwargs):
    """The same conversion with every tensor read and written (the reader cannot say where bytes lie)."""
    source = open_source(source_path)
    source.stored_at = lambda name: None
    return run(identity(source), tmp_path / "read", **kwargs)


def _same_files(a, b):
    names = sorted(p.name for p in a.glob("model*.safetensors*"))
    assert names == sorted(p.name for p in b.glob("model*.safetensors*")) and names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_moved_tensors_are_copied_by_the_kernel_into_the_same_bytes(tmp_path, fmt, kernel_copies):
    (tmp_path / "src").mkdir()
    if fmt == "safetensors":
        save_file(TENSORS, tmp_path / "src" / "model.safetensors")
    else:
        torch.save(TENSORS, tmp_path / "src" / "pytorch_model.bin")
    result = run(identity(open_source(tmp_path / "src")), tmp_path / "out", max_shard_size=20_000)
    moved = sum(1 for t in TENSORS.values() if t.numel())
    assert len(kernel_copies) == moved
    assert sum(kernel_copies) == sum(t.numel() * t.element_size() for t in TENSORS.values())
    kernel_copies.clear()
    _by_reading(tmp_path, tmp_path / "src", max_shard_size=20_000)
    assert kernel_copies == []
    _same_files(tmp_path / "out", tmp_path / "read")
    for name, digest in result.files.items():  # hashed beside the copying, from the bytes where they lie
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == digest


def test_a_cast_or_an_op_is_not_a_move(tmp_path, kernel_copies):
    (tmp_path / "src").mkdir()
    save_file(TENSORS, tmp_path / "src" / "model.safetensors")
    source = open_source(tmp_path / "src")
    run(identity(source), tmp_path / "out", dtype="F16")
    # every float32 tensor is cast; the float16 one and the integer ids keep their bytes: they move
    assert sorted(kernel_copies) == sorted([TENSORS["ids"].numel() * 8, TENSORS["half"].numel() * 2])
    out = open_source(tmp_path / "out")
    assert torch.equal(out.read("w3"), TENSORS["w3"].half()) and torch.equal(out.read("ids"), TENSORS["ids"])


def test_a_filesystem_that_cannot_copy_falls_back_to_reading(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    save_file(TENSORS, tmp_path / "src" / "model.safetensors")
    tried = []

    def cannot(src, dst, count, offset_src=None, offset_dst=None):
        tried.append(count)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cannot)
    result = run(identity(open_source(tmp_path / "src")), tmp_path / "out")
    assert len(tried) == 1  # asked once, then read and written
    monkeypatch.undo()
    _by_reading(tmp_path, tmp_path / "src")
    _same_files(tmp_path / "out", tmp_path / "read")
    data = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert result.files["model.safetensors"] == hashlib.sha256(data).hexdigest()


def test_a_copy_that_fails_midway_leaves_nothing_and_no_thread(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    save_file(TENSORS, tmp_path / "src" / "model.safetensors")
    real, calls = os.copy_file_range, []

    def failing(src, dst, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", failing)
    with pytest.raises(KeyboardInterrupt):
        run(identity(open_source(tmp_path / "src")), tmp_path / "out", max_shard_size=20_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert not [t for t in threading.enumerate() if t.name in ("vlmkit-reader", "vlmkit-hash")]


def test_a_source_cut_short_after_opening_names_the_file_and_tensor(tmp_path):
    (tmp_path / "src").mkdir()
    file = tmp_path / "src" / "model.safetensors"
    save_file(TENSORS, file)
    source = open_source(file)
    os.truncate(file, file.stat().st_size - 100)  # the last tensor's bytes end early
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected end of file reading '\w+'"):
        run(identity(source), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


class _Drawn:
    """New rows drawn from the generator alone, like a distribution read elsewhere (EmbeddingDistribution)."""

    reads_rows = False

    def __call__(self, existing, n, generator):
        return torch.randn((n, existing.shape[1]), generator=generator).to(existing.dtype)


def _mean(existing, n, generator):  # reads the rows: they must be read
    return existing.float().mean(0, keepdim=True).expand(n, -1).to(existing.dtype)


@pytest.mark.parametrize("init, copied", [(zero_rows, True), (_Drawn(), True), (_mean, False)])
def test_grown_rows_are_appended_to_the_stored_bytes(tmp_path, kernel_copies, init, copied):
    """Vocabulary growth: the stored rows are copied file to file and only the new rows computed, when their init
    reads none of the old; the file is the one reading, concatenating and writing makes."""
    (tmp_path / "src").mkdir()
    save_file(TENSORS, tmp_path / "src" / "model.safetensors")
    rules = [transform("w2", "w2", ResizeRows(66, 130, init, seed=4)), rename("{rest:path}", "{rest:path}")]
    run(Conversion(open_source(tmp_path / "src"), rules), tmp_path / "out")
    w2 = TENSORS["w2"].numel() * 4
    assert (w2 in kernel_copies) == copied
    source = open_source(tmp_path / "src")
    source.stored_at = lambda name: None
    run(Conversion(source, rules), tmp_path / "read")
    _same_files(tmp_path / "out", tmp_path / "read")
    grown = open_source(tmp_path / "out").read("w2")
    assert grown.shape == (130, 48) and torch.equal(grown[:66], TENSORS["w2"])
