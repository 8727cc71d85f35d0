"""Tiny LLaVA models for the runtime tests: originals and their conversions (built once per session)."""

from __future__ import annotations

import pytest

from vlmkit.families.llava import tiny

from ..conftest import run_cli


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-models")
    clip = tiny.make_clip(root / "clip-vit-tiny")
    out = {"clip": clip, "v15": tiny.make_llava15(root / "llava-v1.5-tiny", clip),
           "next": tiny.make_llava_next(root / "llava-v1.6-mistral-tiny", clip)}
    for name, extra in (("v15", []), ("next", ["--vision-tower", str(clip)])):
        dst = root / f"{name}-hf"
        assert run_cli("convert", out[name], dst, "--quiet", *extra).code == 0
        out[f"{name}-hf"] = dst
    return out
