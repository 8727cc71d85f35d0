"""`rewrite_file` (the card of `verify --write-card`) leaves no temporary behind, and verify-files names old ones."""

from __future__ import annotations

import json
import os

import pytest

from vlmkit.conversion import output

from ..conftest import run_cli


@pytest.fixture
def folder(originals, tmp_path):
    dst = tmp_path / "clip-hf"
    assert run_cli("convert", originals["clip"], dst, "--quiet").code == 0
    return dst


def test_ctrl_c_before_the_renames_leaves_no_temporary(folder, monkeypatch):
    before = sorted(p.name for p in folder.iterdir())
    manifest = output.read_manifest(folder)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        output.rewrite_file(folder, manifest, output.CARD, b"# new card\n")
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == before
    assert run_cli("verify-files", folder).code == 0


def test_verify_files_names_a_temporary_an_older_run_left_and_passes(folder):
    (folder / ".README.md.vlmkit-tmp-0123abcd").write_text("# half a card\n")
    r = run_cli("verify-files", folder)
    assert r.code == 0, r.err
    assert "note: ignored .README.md.vlmkit-tmp-0123abcd, a temporary left by an interrupted vlmkit run" in r.err
    assert json.loads(run_cli("verify-files", folder, "--json").out)["leftovers"] == [".README.md.vlmkit-tmp-0123abcd"]
