"""Row reads: a pass over a big matrix (new vocabulary rows' statistics) reads one slice at a time."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from vlmkit.families.llava.convert import EmbeddingDistribution
from vlmkit.tensors import open_source, row_reader
from vlmkit.tensors.views import CombinedSource, RenamedSource

EMBED = torch.randn(5000, 8, generator=torch.Generator().manual_seed(0)).half()  # crosses a 4096-row slice


def _no_whole_reads(source, monkeypatch):
    def refuse(name):
        raise AssertionError(f"read the whole of '{name}'")

    monkeypatch.setattr(source, "read", refuse)
    return source


@pytest.fixture(params=["safetensors", "bin"])
def stored(request, tmp_path):
    if request.param == "safetensors":
        save_file({"embed": EMBED, "other": torch.ones(3)}, tmp_path / "model.safetensors")
        return open_source(tmp_path / "model.safetensors")
    torch.save({"embed": EMBED, "other": torch.ones(3)}, tmp_path / "pytorch_model.bin")
    return open_source(tmp_path / "pytorch_model.bin")


def test_rows_are_read_from_their_own_bytes(stored, monkeypatch):
    read = row_reader(_no_whole_reads(stored, monkeypatch), "embed")
    assert torch.equal(read(0, 4096), EMBED[:4096])
    assert torch.equal(read(4096, 8192), EMBED[4096:])  # the last slice stops at the last row
    assert torch.equal(read(17, 18), EMBED[17:18])


def test_views_say_which_reader_holds_the_name(stored, monkeypatch):
    _no_whole_reads(stored, monkeypatch)
    combined = CombinedSource([("model.", stored)])
    renamed = RenamedSource(combined, {"model.embed": "language_model.embed"})
    assert torch.equal(row_reader(renamed, "language_model.embed")(100, 200), EMBED[100:200])


def test_a_reader_without_row_reads_is_read_whole_once():
    calls = []

    class Whole:
        def read(self, name):
            calls.append(name)
            return EMBED.clone()

    read = row_reader(Whole(), "embed")
    assert torch.equal(read(0, 10), EMBED[:10]) and torch.equal(read(4990, 5000), EMBED[4990:])
    assert calls == ["embed"]


def test_new_rows_are_the_same_from_slices_as_from_a_whole_read(stored, monkeypatch):
    class Whole:
        def info(self, name):
            return stored.info(name)

        def read(self, name):
            return EMBED.clone()

    expected = EmbeddingDistribution(Whole(), "embed")(EMBED, 64, torch.Generator().manual_seed(5))
    sliced = EmbeddingDistribution(_no_whole_reads(stored, monkeypatch), "embed")(
        EMBED, 64, torch.Generator().manual_seed(5))
    assert torch.equal(sliced, expected)
